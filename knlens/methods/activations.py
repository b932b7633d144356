"""The activations of a set of neurons at every token of a fact's prompts (the report's token view).

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-gpt2")
>>> acts = token_activations(model, Fact(["the capital of france is"], " paris"), NeuronSet([(1, 3)]))
>>> list(acts[0].to_frame().columns)
['position', 'token', 'L1.N3']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.run.engine import chunks
from knlens.core.facts import Fact
from knlens.run.hooks import capture, hook_name, hooked
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode

__all__ = ["TokenActivations", "token_activations"]


@dataclass(frozen=True, eq=False)
class TokenActivations:
    """Activations of ``neurons`` (at the locate hook point) at every token of one prompt.

    ``values[t, j]`` is neuron ``j`` of ``neurons`` at token ``t``; ``target_position`` is the token whose
    activation integrated gradients used (the last prompt token, or ``[MASK]``).
    """

    prompt: str
    tokens: tuple[str, ...]
    neurons: NeuronSet
    values: Float[Tensor, "pos neuron"]
    target_position: int

    def to_frame(self) -> pd.DataFrame:
        """One row per token (``position, token``) and one column per neuron (``"L3.N17"``)."""
        frame = pd.DataFrame(self.values.double().numpy(), columns=[str(n) for n in self.neurons])
        frame.insert(0, "token", list(self.tokens))
        frame.insert(0, "position", range(len(self.tokens)))
        return frame

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "tokens": list(self.tokens), "neurons": [list(n) for n in self.neurons],
                "values": self.values.double().tolist(), "target_position": self.target_position}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenActivations:
        neurons = NeuronSet(tuple(n) for n in d["neurons"])
        values = torch.tensor(d["values"], dtype=torch.float32).reshape(len(d["tokens"]), len(neurons))
        return cls(d["prompt"], tuple(d["tokens"]), neurons, values, int(d["target_position"]))


@torch.no_grad()
def token_activations(model: Any, fact: Fact, neurons: NeuronSet, *, hook_point: str = "hook_post",
                      batch_size: int = 64) -> list[TokenActivations]:
    """The activations of ``neurons`` at every token of each prompt of ``fact`` (one batched forward).

    The prompts are run as :func:`knlens.encode` builds them (BOS, and ``[MASK]`` for a masked LM), right-
    padded; a caching hook per layer keeps only the requested neurons.

    >>> from knlens import load_model, Fact, NeuronSet
    >>> model = load_model("tiny-gpt2")
    >>> acts = token_activations(model, Fact(["the capital of france is"], " paris"), NeuronSet([(1, 3)]))
    >>> acts[0].tokens, acts[0].values.shape
    (('[BOS]', 'the', 'capital', 'of', 'france', 'is'), torch.Size([6, 1]))
    """
    neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    q = encode(model, list(fact.prompts), fact.target)
    q = q.select((q.token_index == 0).nonzero()[:, 0])  # one row per prompt, without teacher-forced tokens
    by_layer = neurons.by_layer()
    columns = {n: j for j, n in enumerate(neurons)}
    values = torch.zeros(len(q), q.tokens.shape[1], len(neurons))
    for s in chunks(len(q), batch_size):
        sub = q.select(torch.arange(len(q))[s])
        seen: dict[int, list[Tensor]] = {l: [] for l in by_layer}
        with hooked(model, [(hook_name(l, hook_point), capture(seen[l], neurons=idx)) for l, idx in by_layer.items()]):
            model(sub.tokens, attention_mask=sub.attention_mask)
        for l, idx in by_layer.items():
            act = seen[l][0]  # [rows, pos, len(idx)]
            values[s, :act.shape[1], [columns[(l, i)] for i in idx]] = act.float().cpu()
    out = []
    for i in range(len(q)):
        n = int(q.attention_mask[i].sum())
        ids = q.tokens[i, :n]
        out.append(TokenActivations(prompt=q.prompts[int(q.prompt_index[i])],
                                    tokens=tuple(str(t) for t in model.to_str_tokens(ids)),
                                    neurons=neurons, values=values[i, :n].clone(),
                                    target_position=int(q.position[i])))
    return out
