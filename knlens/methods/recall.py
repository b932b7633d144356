"""The recall score of a set of knowledge neurons while a model reads a text (Wang et al., EMNLP 2024;
docs/methods.md, factual recall in reasoning).

The **reference** of a neuron set is its activation pattern when the model answers the single-hop prompt: each
neuron's activation at the target position (the last prompt token), averaged over the hop's prompts, ``a*``.
The **recall score** at a position t of another text (the two-hop question, a chain of thought) is that
position's activations projected on the reference and normalised by it::

    score(t) = Σ_n sign(a*_n) · a_n(t) / Σ_n |a*_n|

so it is 1 where every neuron is as active as on the single-hop prompt, 0 where none is, and negative where the
neurons push the other way; neurons whose single-hop activation is negative (common in gated MLPs) count when
they are negative again. A text's **peak** is the largest score over its positions (the BOS token left out),
and :data:`RECALL_RULE` says when it counts as recalled. For a left-to-right model a position's activations
depend only on the text up to it, so one forward over a finished chain of thought gives the score of every
generated step.

>>> import torch
>>> recall_scores(torch.tensor([[0.0, 0.0], [2.0, -1.0], [1.0, 0.0]]), torch.tensor([2.0, -1.0])).mul(3).tolist()
[0.0, 3.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.methods.activations import token_activations

__all__ = ["RECALL_RULE", "RecallProfile", "recall_scores", "reference_levels", "recall_profile", "recalled"]

RECALL_RULE = "recalled when the peak recall score over the text's positions (BOS left out) is >= threshold (0.5)"


def recall_scores(values: Float[Tensor, "pos neuron"], reference: Float[Tensor, "neuron"]) -> Float[Tensor, "pos"]:
    """``Σ_n sign(a*_n) a_n(t) / Σ_n |a*_n|`` at every position t (see the module docstring)."""
    if values.shape[-1] != reference.shape[-1]:
        raise SettingsError(f"{values.shape[-1]} neurons read but a reference of {reference.shape[-1]}")
    norm = float(reference.abs().sum())
    if norm == 0.0:
        raise SettingsError("the reference activations are all 0: the neurons are silent on the single-hop prompt, "
                            "so no recall can be measured against it")
    return (values.float() * reference.sign().float()).sum(-1) / norm


def reference_levels(model: Any, hop: Fact, neurons: NeuronSet, *, hook_point: str = "hook_post"
                     ) -> Float[Tensor, "neuron"]:
    """``a*``: each neuron's activation at the target position of each of ``hop``'s prompts, averaged over them
    (neurons in ``neurons``' order).

    >>> from knlens import load_model, Fact, NeuronSet
    >>> reference_levels(load_model("tiny-llama"), Fact(["the capital of france is"], " paris"),
    ...                  NeuronSet([(1, 3), (0, 2)])).shape
    torch.Size([2])
    """
    acts = token_activations(model, hop, neurons, hook_point=hook_point)
    return torch.stack([a.values[a.target_position] for a in acts]).mean(0)


@dataclass(frozen=True)
class RecallProfile:
    """The recall score of one neuron set at every token of ``text`` (``scores[t]`` for ``tokens[t]``);
    ``skip`` marks positions left out of the peak (the BOS token)."""

    text: str
    tokens: tuple[str, ...]
    scores: Float[Tensor, "pos"]
    skip: tuple[bool, ...]

    def peak(self, start: int = 0) -> float:
        """The largest score at positions ``>= start`` (negative ``start`` counts from the end), BOS left out."""
        start = start % len(self.tokens) if start < 0 else start
        kept = [float(s) for i, (s, k) in enumerate(zip(self.scores, self.skip)) if i >= start and not k]
        return max(kept) if kept else float("nan")

    def peak_position(self, start: int = 0) -> int:
        """The position of :meth:`peak`."""
        best = self.peak(start)
        return next(i for i, (s, k) in enumerate(zip(self.scores, self.skip))
                    if i >= (start % len(self.tokens) if start < 0 else start) and not k and float(s) == best)


def recall_profile(model: Any, text: str, neurons: NeuronSet, reference: Float[Tensor, "neuron"], *,
                   hook_point: str = "hook_post") -> RecallProfile:
    """The recall score of ``neurons`` (single-hop activations ``reference``) at every token of ``text``.

    >>> from knlens import load_model, Fact, NeuronSet
    >>> model = load_model("tiny-llama")
    >>> kn = NeuronSet([(1, 3), (1, 7)])
    >>> ref = reference_levels(model, Fact(["the capital of france is"], " paris"), kn)
    >>> p = recall_profile(model, "the capital of france is", kn, ref)
    >>> p.tokens[-1], round(float(p.scores[-1]), 4)               # the single-hop prompt itself scores 1
    ('is', 1.0)
    """
    target = model.to_str_tokens(model.to_tokens(text, prepend_bos=False)[0, -1:])[0]
    acts = token_activations(model, Fact([text], target), neurons, hook_point=hook_point)[0]
    bos = {getattr(model.tokenizer, "bos_token", None), "[BOS]"}
    skip = tuple(i == 0 and t in bos for i, t in enumerate(acts.tokens))
    return RecallProfile(text, acts.tokens, recall_scores(acts.values, reference), skip)


def recalled(peak: float, threshold: float = 0.5) -> bool:
    """:data:`RECALL_RULE`: the peak score reaches ``threshold`` of the single-hop level.

    >>> recalled(0.62), recalled(0.2), recalled(float("nan"))
    (True, False, False)
    """
    return bool(peak >= threshold)
