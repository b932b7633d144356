"""From attribution scores to knowledge neurons: coarse, refined and generic neurons (docs/methods.md, knowledge-neuron selection).

* coarse neurons of one prompt: score ≥ t · max (Dai: t = 0.2) or > t · max (EleutherAI: t = 0.3);
* refined neurons of a fact: coarse in at least ``max(p·n, min_count)`` of its n prompts (Dai: p = 0.7,
  min_count = 3, with p moved by ±0.05 for up to 6 rounds until the mean is 2–5 neurons per fact),
  or in more than p·n prompts (EleutherAI: p = 0.5, fixed);
* generic neurons: refined for more than 10 % of a relation's facts; removed before editing.

Where ``p`` is adapted, one ``p`` is shared by the facts refined together: :func:`refined_neurons` adapts it
for one fact alone, :func:`refine_facts` for a list of facts (Dai adapted it per relation:
:func:`refine_by_relation`), and the ``niu`` preset (Niu et al.: t = 0.2, p = 0.7 ± 0.05 for up to 20
rounds, count ≥ p·n with no floor) is meant for one pooled prompt set, e.g. all sentences of one BLiMP
phenomenon given to :func:`refined_neurons` as one list. :func:`refinement` also returns the final ``p`` and
the number of prompts a neuron had to be coarse in.

>>> import torch
>>> scores = torch.tensor([[1.0, 0.25, 0.1], [0.2, -3.0, 0.3]])
>>> sorted(coarse(scores, threshold=0.2))
[Neuron(layer=0, index=0), Neuron(layer=0, index=1), Neuron(layer=1, index=0), Neuron(layer=1, index=2)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.methods.attribution.result import Attribution
from knlens.core.errors import SelectionError
from knlens.core.neurons import NeuronSet

__all__ = ["SelectionPreset", "PRESETS", "Refinement", "get_preset", "coarse", "refine", "min_prompts", "refinement",
           "refine_facts", "refine_by_relation", "refined_neurons", "best_by_mean", "generic_neurons", "drop_generic"]

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
    "niu": SelectionPreset(threshold=0.2, strict_threshold=False, p=0.7, min_count=0, strict_count=False,
                           adaptive=True, max_rounds=20),
}


def get_preset(preset: str | SelectionPreset) -> SelectionPreset:
    """The preset of that name (a :class:`SelectionPreset` passes through); unknown names raise
    :class:`~knlens.core.errors.SelectionError`."""
    if isinstance(preset, SelectionPreset):
        return preset
    if preset not in PRESETS:
        raise SelectionError(f"unknown selection preset {preset!r}; choose one of {', '.join(PRESETS)}")
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


def min_prompts(n: int, p: float, *, min_count: int = 3, strict: bool = False) -> int:
    """The number of a fact's ``n`` prompts a neuron must be coarse in to be refined.

    ``⌈max(p·n, min_count)⌉``, or ``⌊p·n⌋ + 1`` with ``strict`` (count > p·n). It can exceed ``n``: then no
    neuron can be refined (e.g. Dai's ``min_count = 3`` with 2 prompts).

    >>> min_prompts(4, 0.7), min_prompts(3, 0.7), min_prompts(2, 0.7), min_prompts(4, 0.5, strict=True)
    (3, 3, 3, 3)
    """
    if strict:
        return math.floor(p * n + 1e-9) + 1
    return math.ceil(max(p * n, min_count) - 1e-9)


def refine(coarse_sets: Sequence[NeuronSet], p: float = 0.7, *, min_count: int = 3,
           strict: bool = False) -> NeuronSet:
    """Neurons coarse in ≥ ``max(p·n, min_count)`` of the n prompts' sets (``> p·n`` with ``strict``)."""
    need = min_prompts(len(coarse_sets), p, min_count=min_count, strict=strict)
    counts = Counter(nr for s in coarse_sets for nr in s)
    keep = [nr for nr, c in counts.items() if c >= need]
    return NeuronSet(sorted(keep, key=lambda nr: (-counts[nr], nr)))


@dataclass(frozen=True)
class Refinement:
    """Refined neurons of facts refined together, with the ``p`` they share and what it demanded."""

    sets: tuple[NeuronSet, ...]  # one per fact
    p: float  # the final share (after adaptation)
    rounds: int  # adaptation rounds that moved p (0 for a fixed preset)
    n_prompts: tuple[int, ...]  # per fact: its number of prompts n
    min_prompts: tuple[int, ...]  # per fact: prompts a neuron had to be coarse in (may exceed n)


def refinement(facts: Sequence[Sequence[Scores]], preset: str | SelectionPreset = "dai") -> Refinement:
    """Refined neurons of several facts (each a list of per-prompt scores) that share one ``p``.

    With an adaptive preset, ``p`` starts at the preset's value and moves by ``p_step`` (down when the
    mean number of neurons per fact is below ``target[0]``, up when above ``target[1]``) for at most
    ``max_rounds`` rounds. Moving ``p`` cannot lower the requirement below ``min_count`` prompts.

    >>> import torch
    >>> r = refinement([[torch.tensor([[1.0, 0.5]]), torch.tensor([[1.0, 0.0]])]], "eleuther")
    >>> list(r.sets[0]), r.p, r.min_prompts
    ([Neuron(layer=0, index=0)], 0.5, (2,))
    """
    cfg = get_preset(preset)
    if not facts or any(len(f) == 0 for f in facts):
        raise SelectionError("refinement needs at least one fact, each with at least one prompt's scores")
    coarse_sets = [[coarse(s, cfg.threshold, strict=cfg.strict_threshold) for s in fact] for fact in facts]

    def run(p: float) -> list[NeuronSet]:
        return [refine(c, p, min_count=cfg.min_count, strict=cfg.strict_count) for c in coarse_sets]

    p, rounds = cfg.p, 0
    result = run(p)
    lo, hi = cfg.target
    while cfg.adaptive and rounds < cfg.max_rounds:
        mean = sum(map(len, result)) / len(result)
        if lo <= mean <= hi:
            break
        p = round(min(1.0, max(0.0, p + (cfg.p_step if mean > hi else -cfg.p_step))), 10)
        rounds += 1
        result = run(p)
    n = tuple(len(c) for c in coarse_sets)
    return Refinement(sets=tuple(result), p=p, rounds=rounds, n_prompts=n,
                      min_prompts=tuple(min_prompts(k, p, min_count=cfg.min_count, strict=cfg.strict_count)
                                        for k in n))


def refine_facts(facts: Sequence[Sequence[Scores]], preset: str | SelectionPreset = "dai") -> list[NeuronSet]:
    """Refined neurons of several facts sharing one adapted ``p`` (the sets of :func:`refinement`)."""
    return list(refinement(facts, preset).sets)


def refine_by_relation(facts: Sequence[Sequence[Scores]], relations: Sequence[str | None],
                       preset: str | SelectionPreset = "dai") -> list[NeuronSet]:
    """Refined neurons with one ``p`` per relation, as Dai et al. adapted it: the facts of a relation share
    ``p``, moved until their mean is 2–5 neurons per fact. ``relations[i]`` is the relation of ``facts[i]``
    (facts with relation ``None`` form one group). Sets come back in the order of ``facts``.

    >>> import torch
    >>> one = [torch.tensor([[1.0, 0.9, 0.8]])] * 3           # three prompts, neurons 0-2 coarse in all
    >>> [len(s) for s in refine_by_relation([one, one[:1]], ["a", "b"])]
    [3, 0]
    """
    if len(facts) != len(relations):
        raise SelectionError(f"{len(facts)} facts but {len(relations)} relations: give one relation per fact")
    out: list[NeuronSet] = [NeuronSet()] * len(facts)
    for rel in dict.fromkeys(relations):
        idx = [i for i, r in enumerate(relations) if r == rel]
        for i, s in zip(idx, refinement([facts[i] for i in idx], preset).sets):
            out[i] = s
    return out


def refined_neurons(attributions: Sequence[Scores], preset: str | SelectionPreset = "dai") -> NeuronSet:
    """Refined neurons of one fact from its prompts' attributions, ``p`` adapted for this fact alone (see
    :func:`refinement`; :func:`refine_by_relation` shares it across a relation's facts as Dai did)."""
    return refinement([attributions], preset).sets[0]


def best_by_mean(attributions: Sequence[Attribution], k: int) -> NeuronSet:
    """The ``k`` neurons with the highest mean score over the prompts' attributions, best first (what is
    tested when refinement keeps no neuron).

    >>> from knlens import load_model, attribute
    >>> attrs = attribute(load_model("tiny-llama"), ["the capital of france is"], " paris", steps=2)
    >>> len(best_by_mean(attrs, 3))
    3
    """
    mean = torch.stack([a.scores for a in attributions]).mean(0)
    layers, d = attributions[0].layers, mean.shape[1]
    best = mean.flatten().topk(min(k, mean.numel())).indices.tolist()
    return NeuronSet((layers[i // d], i % d) for i in best)


def generic_neurons(sets: Sequence[NeuronSet], max_share: float = 0.1) -> NeuronSet:
    """Neurons that occur in more than ``max_share`` of the sets (e.g. the facts of one relation)."""
    counts = Counter(nr for s in sets for nr in s)
    limit = max_share * len(sets)
    return NeuronSet(sorted((nr for nr, c in counts.items() if c > limit), key=lambda nr: (-counts[nr], nr)))


def drop_generic(sets: Sequence[NeuronSet], max_share: float = 0.1) -> list[NeuronSet]:
    """Each set without the :func:`generic_neurons` of the collection."""
    generic = generic_neurons(sets, max_share)
    return [s - generic for s in sets]
