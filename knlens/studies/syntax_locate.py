"""Localise one prompt set the way Niu et al. did for syntax and for facts, and describe the result with the same
numbers for both, so that they can stand in one table (docs/methods.md, syntax and the KN thesis critique).

:func:`locate_prompt_set` attributes every prompt (integrated gradients, its own target), pools the prompts as one
set and refines with the ``niu`` preset (t = 0.2; p = 0.7 moved by ±0.05 for up to 20 rounds until 2–5 neurons;
:func:`~knlens.methods.selection.refinement`), and measures the localisation similarity (σ₁² − 1)/(n − 1) of the
row-normalised attribution vectors (:func:`~knlens.stats.sets.niu_similarity`), also on random subsets of a fixed
size ``n`` so that sets of different sizes compare (the measure is normalised by n, but a few vectors still
scatter more than many).

>>> from knlens import load_model
>>> from knlens.studies.syntax_effects import Prompt
>>> loc = locate_prompt_set(load_model("tiny-llama"), [Prompt("a", "x", "this dog is", " paris"),
...                                                  Prompt("b", "x", "the cat is", " rome")], steps=2, subset=2)
>>> sorted(loc.summary)[:3], loc.magnitude.shape
(['coarse in at least', 'coarse per prompt', 'completeness error (median)'], torch.Size([2, 48]))
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import InsufficientDataError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.methods.attribution.ig import attribute_facts
from knlens.methods.attribution.result import Attribution
from knlens.methods.selection import coarse, get_preset, refinement
from knlens.stats.sets import niu_similarity
from knlens.studies.syntax_effects import Prompt

__all__ = ["Localisation", "locate_prompt_set", "subset_similarity"]


@dataclass(frozen=True)
class Localisation:
    """A prompt set's neurons, the summary numbers of :func:`locate_prompt_set`, the per-neuron table rows and the
    mean |activation| per neuron over the prompts (for matched random controls)."""

    neurons: NeuronSet
    summary: dict[str, Any]
    neuron_rows: list[dict[str, Any]]
    magnitude: Float[Tensor, "layer d"]


def subset_similarity(attrs: Sequence[Attribution] | Tensor, n: int, *, draws: int = 20, seed: int = 0) -> float:
    """Mean :func:`~knlens.stats.sets.niu_similarity` over ``draws`` random subsets of ``n`` of the vectors (all of
    them when there are no more than ``n``).

    >>> import torch
    >>> subset_similarity(torch.eye(4), 2)
    0.0
    """
    if len(attrs) < 2 or n < 2:
        raise InsufficientDataError(f"similarity needs subsets of at least two of at least two vectors, got {n} of "
                                    f"{len(attrs)}")
    vectors = attrs if isinstance(attrs, Tensor) else torch.stack([a.scores for a in attrs])
    if len(vectors) <= n:
        return niu_similarity(vectors)
    rng = random.Random(seed)
    return float(np.mean([niu_similarity(vectors[rng.sample(range(len(vectors)), n)]) for _ in range(draws)]))


def locate_prompt_set(model: Any, prompts: Sequence[Prompt], *, steps: int = 8, subset: int = 4, draws: int = 20,
                      seed: int = 0, preset: str = "niu") -> Localisation:
    """Attribute every prompt to its ``good`` token (``steps`` Gauss–Legendre nodes), refine the pooled set with
    ``preset``, and summarise: neurons, their layers, the final p and rounds, coarse neurons per prompt, the
    similarity of all vectors and of random subsets of ``subset`` of them, and the completeness error."""
    if len(prompts) < 2:
        raise InsufficientDataError(f"a prompt set needs at least two prompts, got {len(prompts)}")
    facts = [Fact([p.prompt], p.good, name=p.name) for p in prompts]
    attrs = [a for group in attribute_facts(model, facts, steps=steps, grid="gauss-legendre", tolerance=None)
             for a in group]
    ref = refinement([attrs], preset)
    neurons = ref.sets[0]
    cfg = get_preset(preset)
    coarse_sets = [coarse(a, cfg.threshold, strict=cfg.strict_threshold) for a in attrs]
    scores = torch.stack([a.scores for a in attrs]).float()  # [prompt, layer, d]
    rows = [{"neuron": str(n), "layer": n.layer, "index": n.index,
             "coarse in": float(np.mean([n in c for c in coarse_sets])),
             "mean score": float(scores[:, n.layer, n.index].mean()),
             "mean activation": float(torch.stack([a.activations[n.layer, n.index] for a in attrs]).mean())}
            for n in neurons]
    layers = [n.layer for n in neurons]
    summary = {"prompts": len(attrs), "neurons": len(neurons), "p": ref.p, "rounds": ref.rounds,
               "coarse in at least": ref.min_prompts[0], "in 2-5": cfg.target[0] <= len(neurons) <= cfg.target[1],
               "layers": " ".join(map(str, sorted(set(layers)))),
               "mean layer": float(np.mean(layers)) if layers else float("nan"),
               "coarse per prompt": float(np.mean([len(c) for c in coarse_sets])),
               "similarity": niu_similarity(attrs),
               f"similarity (n={subset})": subset_similarity(attrs, subset, draws=draws, seed=seed),
               "completeness error (median)": float(np.median([a.relative_completeness_error for a in attrs]))}
    magnitude = torch.stack([a.activations.abs().float() for a in attrs]).mean(0)
    return Localisation(neurons, summary, rows, magnitude)
