"""Fact checking with a relation's degenerate knowledge neurons, as Chen et al. (AAAI 2024) do it
(docs/methods.md, fact checking with degenerate neurons).

The facts of one relation are split at random into a calibration half and a test half. The **frequent neurons**
are those in the neuron sets (DKN sets) of the calibration facts more often than ``share`` (0.7) × the largest
count. Every fact is then paired with its true object and with ``wrong`` objects of other facts of the relation;
a pair's **score** is the mean integrated-gradients attribution of the candidate object over the frequent
neurons, averaged over the fact's prompts. A pair is **flagged false** when its score is below a threshold,
chosen on the calibration pairs as the one that maximises F1 of the flag (a midpoint between two sorted
scores); precision and recall of the flag are read on the test pairs.

>>> import numpy as np
>>> scores, is_false = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.05]), np.array([False, False, True, True, False, True])
>>> t = choose_threshold(scores, is_false)
>>> round(t, 3), flag_metrics(scores, is_false, t)["precision"]
(0.45, 1.0)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float
from sklearn.metrics import f1_score, precision_score, recall_score

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.methods.attribution import attribute

__all__ = ["frequent_neurons", "choose_threshold", "flag_metrics", "candidate_scores", "fact_check"]


def frequent_neurons(sets: Sequence[NeuronSet], share: float = 0.7) -> NeuronSet:
    """Neurons whose count over ``sets`` exceeds ``share`` × the largest count (most frequent first).

    >>> frequent_neurons([NeuronSet([(1, 2), (3, 4)]), NeuronSet([(1, 2)]), NeuronSet([(5, 6)])])
    NeuronSet([L1.N2])
    """
    counts = Counter(nr for s in sets for nr in s)
    if not counts:
        return NeuronSet()
    top = max(counts.values())
    return NeuronSet(sorted((nr for nr, c in counts.items() if c > share * top), key=lambda nr: (-counts[nr], nr)))


def choose_threshold(scores: Float[np.ndarray, "pair"], is_false: Bool[np.ndarray, "pair"]) -> float:
    """The threshold (flag when score < t) that maximises F1 of the flag on these pairs; ties: the lowest."""
    if len(scores) < 2 or is_false.all() or not is_false.any():
        raise InsufficientDataError(f"choosing a threshold needs true and false pairs, got {int(is_false.sum())} false "
                                    f"of {len(scores)}")
    s = np.unique(scores)
    cuts = np.concatenate([[s[0] - 1.0], (s[1:] + s[:-1]) / 2, [s[-1] + 1.0]])
    f1 = [f1_score(is_false, scores < t, zero_division=0) for t in cuts]
    return float(cuts[int(np.argmax(f1))])


def flag_metrics(scores: Float[np.ndarray, "pair"], is_false: Bool[np.ndarray, "pair"], threshold: float
                 ) -> dict[str, float]:
    """Precision, recall and F1 of flagging ``score < threshold`` as false, with the counts."""
    flagged = scores < threshold
    return {"n_pairs": len(scores), "n_false": int(is_false.sum()), "n_flagged": int(flagged.sum()),
            "precision": float(precision_score(is_false, flagged, zero_division=0)),
            "recall": float(recall_score(is_false, flagged, zero_division=0)),
            "f1": float(f1_score(is_false, flagged, zero_division=0))}


def candidate_scores(model: Any, fact: Fact, candidates: Sequence[str], neurons: NeuronSet, *, steps: int = 4
                     ) -> list[float]:
    """The mean IG attribution of each candidate object over ``neurons`` (only their layers are integrated),
    averaged over ``fact``'s prompts."""
    layers = sorted(set(neurons.layers))
    out = []
    for cand in candidates:
        attrs = attribute(model, replace(fact, target=cand), layers=layers, steps=steps, grid="gauss-legendre",
                          tolerance=None)
        out.append(float(np.mean([[a.scores[a.layers.index(nr.layer), nr.index].item() for nr in neurons]
                                  for a in attrs])))
    return out


def fact_check(model: Any, facts: Sequence[Fact], sets: Sequence[NeuronSet], *, wrong: int = 1,
               share: float = 0.7, calibration: float = 0.5, steps: int = 4, seed: int = 0
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fact checking on ``facts`` (one relation) with their neuron sets ``sets`` (see the module docstring).
    Returns the pairs (``fact``, ``split``, ``candidate``, ``is_false``, ``score``, ``flagged``) and the metrics
    table (one row per split, with ``threshold`` and the number of frequent neurons)."""
    if len(facts) != len(sets):
        raise SettingsError(f"{len(facts)} facts but {len(sets)} neuron sets: give one set per fact")
    if wrong < 1 or not 0 < calibration < 1:
        raise SettingsError(f"wrong must be at least 1 and calibration in (0, 1), got {wrong}, {calibration}")
    objects = sorted({f.target for f in facts})
    if len(facts) < 4 or len(objects) < 2:
        raise InsufficientDataError(f"fact checking needs at least 4 facts with 2 objects or more (a calibration "
                                    f"and a test half), got {len(facts)} facts, {len(objects)} objects")
    rng = random.Random(seed)
    order = rng.sample(range(len(facts)), len(facts))
    n_cal = min(len(facts) - 2, max(2, round(calibration * len(facts))))
    split = {i: ("calibration" if k < n_cal else "test") for k, i in enumerate(order)}
    frequent = frequent_neurons([sets[i] for i in order[:n_cal]], share)
    if not len(frequent):
        raise InsufficientDataError(f"the {n_cal} calibration facts have no neuron in their sets: no frequent neurons")
    rows = []
    for i, fact in enumerate(facts):
        others = [o for o in objects if o != fact.target]
        cands = [fact.target, *rng.sample(others, min(wrong, len(others)))]
        for cand, score in zip(cands, candidate_scores(model, fact, cands, frequent, steps=steps)):
            rows.append({"fact": fact.name or fact.prompts[0], "split": split[i], "candidate": cand,
                         "is_false": cand != fact.target, "score": score})
    pairs = pd.DataFrame(rows)
    cal = pairs[pairs.split == "calibration"]
    threshold = choose_threshold(cal["score"].to_numpy(), cal["is_false"].to_numpy())
    pairs["flagged"] = pairs["score"] < threshold
    metrics = pd.DataFrame([{"split": name, "threshold": threshold, "n_frequent": len(frequent),
                             **flag_metrics(sub["score"].to_numpy(), sub["is_false"].to_numpy(), threshold)}
                            for name, sub in pairs.groupby("split", sort=True)])
    return pairs, metrics
