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

from knlens.run.engine import chunks, forward
from knlens.core.facts import Fact
from knlens.run.hooks import capture, hook_name
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.results.contract import Result

__all__ = ["TokenActivations", "TokenActivationsSettings", "token_activations"]


@dataclass(frozen=True)
class TokenActivationsSettings:
    """The model and the hook point the activations were read at."""

    model: str = "?"
    hook_point: str = "hook_post"


@dataclass(frozen=True, eq=False)
class TokenActivations(Result):
    """Activations of ``neurons`` (at the locate hook point) at every token of one prompt.

    ``values[t, j]`` is neuron ``j`` of ``neurons`` at token ``t``; ``target_position`` is the token whose
    activation integrated gradients used (the last prompt token, or ``[MASK]``).
    """

    study = "token_activations"

    prompt: str
    tokens: tuple[str, ...]
    neurons: NeuronSet
    values: Float[Tensor, "pos neuron"]
    target_position: int
    settings: TokenActivationsSettings = TokenActivationsSettings()

    def to_frame(self) -> pd.DataFrame:
        """One row per token (``position, token``) and one column per neuron (``"L3.N17"``)."""
        frame = pd.DataFrame(self.values.double().numpy(), columns=[str(n) for n in self.neurons])
        frame.insert(0, "token", list(self.tokens))
        frame.insert(0, "position", range(len(self.tokens)))
        return frame

    def plot(self, ax: Any = None) -> Any:
        """Token × neuron heatmap of the activations (the target position starred); returns the figure."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(3, 0.5 * len(self.neurons) + 2), 0.3 * len(self.tokens) + 1.2)) \
            if ax is None else (ax.figure, ax)
        v = self.values.double().numpy()
        vmax = float(abs(v).max()) if v.size else 1.0
        im = ax.imshow(v, aspect="auto", cmap="RdBu_r", vmin=-(vmax or 1.0), vmax=vmax or 1.0)
        ax.set_yticks(range(len(self.tokens)), [f"{t!r}*" if i == self.target_position else repr(t)
                                                for i, t in enumerate(self.tokens)], fontsize=8)
        ax.set_xticks(range(len(self.neurons)), [str(n) for n in self.neurons], fontsize=8, rotation=90)
        fig.colorbar(im, ax=ax, label="activation")
        return fig


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
        forward(model, sub.tokens, [(hook_name(l, hook_point), capture(seen[l], neurons=idx))
                                    for l, idx in by_layer.items()], attention_mask=sub.attention_mask)
        for l, idx in by_layer.items():
            act = seen[l][0]  # [rows, pos, len(idx)]
            values[s, :act.shape[1], [columns[(l, i)] for i in idx]] = act.float().cpu()
    settings = TokenActivationsSettings(getattr(model.cfg, "model_name", "?"), hook_point)
    out = []
    for i in range(len(q)):
        n = int(q.attention_mask[i].sum())
        ids = q.tokens[i, :n]
        out.append(TokenActivations(prompt=q.prompts[int(q.prompt_index[i])],
                                    tokens=tuple(str(t) for t in model.to_str_tokens(ids)),
                                    neurons=neurons, values=values[i, :n].clone(),
                                    target_position=int(q.position[i]), settings=settings))
    return out
