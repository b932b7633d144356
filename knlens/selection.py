"""From attribution scores to knowledge neurons: coarse, refined and generic neurons (methods.md §1).

* coarse neurons of one prompt: score ≥ t · max (Dai: t = 0.2) or > t · max (EleutherAI: t = 0.3);
* refined neurons of a fact: coarse in at least ``max(p·n, min_count)`` of its n prompts (Dai: p = 0.7,
  min_count = 3, with p moved by ±0.05 for up to 6 rounds until the mean is 2–5 neurons per fact),
  or in more than p·n prompts (EleutherAI: p = 0.5, fixed);
* generic neurons: refined for more than 10 % of a relation's facts; removed before editing.

>>> import torch
>>> scores = torch.tensor([[1.0, 0.25, 0.1], [0.2, -3.0, 0.3]])
>>> sorted(coarse(scores, threshold=0.2))
[Neuron(layer=0, index=0), Neuron(layer=0, index=1), Neuron(layer=1, index=0), Neuron(layer=1, index=2)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from jaxtyping import Float
from torch import Tensor

from .attribution.result import Attribution
from .neurons import NeuronSet

__all__ = ["SelectionPreset", "PRESETS", "coarse", "refine", "refine_facts", "refined_neurons",
           "generic_neurons", "drop_generic"]

Scores = Union[Attribution, Float[Tensor, "layer neuron"]]


@dataclass(frozen=True)
class SelectionPreset:
    """Thresholds of a published neuron-selection procedure."""

    threshold: float  # t of the coarse step, relative to the prompt's maximum score
    strict_threshold: bool  # ">" instead of "≥"
    p: float  # share of prompts in which a neuron must be coarse
    min_count: int  # ... and at least this many prompts
    strict_count: bool  # count > p·n instead of count ≥ max(p·n, min_count)
    adaptive: bool  # move p until the mean number of neurons per fact is in ``target``
    p_step: float = 0.05
    max_rounds: int = 6
    target: tuple[int, int] = (2, 5)


PRESETS: dict[str, SelectionPreset] = {
    "dai": SelectionPreset(threshold=0.2, strict_threshold=False, p=0.7, min_count=3, strict_count=False,
                           adaptive=True),
    "eleuther": SelectionPreset(threshold=0.3, strict_threshold=True, p=0.5, min_count=0, strict_count=True,
                                adaptive=False),
}


def _preset(preset: str | SelectionPreset) -> SelectionPreset:
    if isinstance(preset, SelectionPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown selection preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def coarse(scores: Scores, threshold: float = 0.2, *, strict: bool = False) -> NeuronSet:
    """Neurons whose score is ≥ ``threshold`` × the maximum score (``>`` with ``strict``), best first."""
    if isinstance(scores, Attribution):
        layers: Sequence[int] = scores.layers
        s = scores.scores.detach().float()
    else:
        layers, s = range(scores.shape[0]), scores.detach().float()
    cut = threshold * s.max()
    keep = (s > cut) if strict else (s >= cut)
    if float(s.max()) <= 0:  # no positive evidence at all: nothing is a knowledge neuron
        return NeuronSet()
    idx = keep.nonzero()
    order = s[keep].argsort(descending=True)
    return NeuronSet((layers[int(idx[i, 0])], int(idx[i, 1])) for i in order)


def refine(coarse_sets: Sequence[NeuronSet], p: float = 0.7, *, min_count: int = 3,
           strict: bool = False) -> NeuronSet:
    """Neurons coarse in ≥ ``max(p·n, min_count)`` of the n prompts' sets (``> p·n`` with ``strict``)."""
    n = len(coarse_sets)
    counts = Counter(nr for s in coarse_sets for nr in s)
    if strict:
        keep = [nr for nr, c in counts.items() if c > p * n]
    else:
        need = max(p * n, min_count)
        keep = [nr for nr, c in counts.items() if c >= need - 1e-9]
    return NeuronSet(sorted(keep, key=lambda nr: (-counts[nr], nr)))


def refine_facts(facts: Sequence[Sequence[Scores]], preset: str | SelectionPreset = "dai") -> list[NeuronSet]:
    """Refined neurons of several facts (each a list of per-prompt scores), with the preset's adaptive ``p``.

    With an adaptive preset, ``p`` starts at the preset's value and moves by ``p_step`` (down when the
    mean number of neurons per fact is below ``target[0]``, up when above ``target[1]``) for at most
    ``max_rounds`` rounds.
    """
    cfg = _preset(preset)
    coarse_sets = [[coarse(s, cfg.threshold, strict=cfg.strict_threshold) for s in fact] for fact in facts]
    p = cfg.p

    def run(p: float) -> list[NeuronSet]:
        return [refine(c, p, min_count=cfg.min_count, strict=cfg.strict_count) for c in coarse_sets]

    result = run(p)
    if not cfg.adaptive:
        return result
    lo, hi = cfg.target
    for _ in range(cfg.max_rounds):
        mean = sum(map(len, result)) / max(1, len(result))
        if lo <= mean <= hi:
            break
        p = min(1.0, max(0.0, p + (cfg.p_step if mean > hi else -cfg.p_step)))
        result = run(p)
    return result


def refined_neurons(attributions: Sequence[Scores], preset: str | SelectionPreset = "dai") -> NeuronSet:
    """Refined neurons of one fact from its prompts' attributions (see :func:`refine_facts`)."""
    return refine_facts([attributions], preset)[0]


def generic_neurons(sets: Sequence[NeuronSet], max_share: float = 0.1) -> NeuronSet:
    """Neurons that occur in more than ``max_share`` of the sets (e.g. the facts of one relation)."""
    counts = Counter(nr for s in sets for nr in s)
    limit = max_share * len(sets)
    return NeuronSet(sorted((nr for nr, c in counts.items() if c > limit), key=lambda nr: (-counts[nr], nr)))


def drop_generic(sets: Sequence[NeuronSet], max_share: float = 0.1) -> list[NeuronSet]:
    """Each set without the :func:`generic_neurons` of the collection."""
    generic = generic_neurons(sets, max_share)
    return [s - generic for s in sets]
