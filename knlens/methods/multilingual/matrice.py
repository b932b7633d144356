"""MATRICE-style selection: one fact's attributions over the query × language grid, aggregated with an explicit
uncertainty penalty (Cao et al., 2024; their formula is not public: the estimator below is knlens' own, see
docs/methods.md, MATRICE).

Each cell c of the grid (one paraphrased query in one language) has attributions ``A_c`` ``[layer, neuron]``.
With ``v_c = A_c / max |A_c|`` (every cell counts alike, whatever its scale) and cell weights ``w_c`` summing
to 1 (uniform, or the model's confidence P(target) of the query: ``weighting="confidence"``),

    mean = Σ_c w_c v_c,    std = sqrt(Σ_c w_c (v_c − mean)²),    score = mean − k · std   (k = 1)

and the selected neurons are those with ``score ≥ threshold · max score`` (0.3; none when no score is
positive). A neuron strong in some cells and absent in others is penalised by its spread; plain intersection
(LIKN) instead demands it pass a threshold in every language. :func:`resample_stability` compares the two on
halves of each language's queries, and :func:`heldout_language_effects` measures the sets chosen without one
language on that language.

>>> import torch
>>> cells = torch.tensor([[[2.0, 1.0, 0.0]], [[2.0, 0.0, 1.0]]])     # 2 cells, 1 layer, 3 neurons
>>> [round(x, 4) for x in matrice_scores(cells, k=1.0)[0].tolist()]   # v = cells / 2; mean − std
[1.0, 0.0, 0.0]
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import HookShapeError, SettingsError
from knlens.core.neurons import NeuronSet
from knlens.data.multilingual import MultilingualFact
from knlens.methods.interventions import measure
from knlens.methods.multilingual.likn import language_set, split_languages
from knlens.methods.multilingual.likn_result import LanguageAttributions
from knlens.methods.selection import coarse

__all__ = ["Weighting", "matrice_scores", "matrice_neurons", "matrice_sets", "intersection_sets",
           "resample_stability", "heldout_language_effects"]

Weighting = Literal["uniform", "confidence"]


def matrice_scores(cells: Float[Tensor, "cell layer neuron"], weights: Float[Tensor, "cell"] | None = None,
                   k: float = 1.0) -> Float[Tensor, "layer neuron"]:
    """``mean − k·std`` over the cells of each cell's scores divided by its largest |score|, weighted by
    ``weights`` (normalised to sum 1; uniform when None)."""
    if cells.ndim != 3 or cells.shape[0] < 1:
        raise HookShapeError(f"cells must be [cell, layer, neuron] with at least one cell, got {tuple(cells.shape)}")
    if k < 0:
        raise SettingsError(f"k must be >= 0 (a penalty on the spread), got {k}")
    v = cells.float() / cells.float().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    w = torch.ones(len(cells)) if weights is None else weights.float().cpu()
    if w.shape != (len(cells),) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise SettingsError(f"weights must be {len(cells)} non-negative numbers, not all zero")
    w = (w / w.sum()).to(v.device)[:, None, None]
    mean = (w * v).sum(0)
    std = (w * (v - mean) ** 2).sum(0).sqrt()
    return mean - k * std


def matrice_neurons(scores: Float[Tensor, "layer neuron"], layers: Sequence[int] | None = None,
                    threshold: float = 0.3) -> NeuronSet:
    """The neurons with ``score ≥ threshold · max score`` (``layers`` names the rows; 0..L−1 by default).

    >>> sorted(matrice_neurons(torch.tensor([[1.0, 0.2], [0.5, -1.0]]), layers=[3, 7]))
    [Neuron(layer=3, index=0), Neuron(layer=7, index=0)]
    """
    found = coarse(scores, threshold)
    rows = list(range(scores.shape[0])) if layers is None else list(layers)
    return NeuronSet((rows[n.layer], n.index) for n in found)


def _cells(attrs: LanguageAttributions, key: str, languages: Sequence[str], pick: dict[str, list[int]] | None
           ) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    chosen = [a for l in languages for i, a in enumerate(attrs.of(key, l)) if pick is None or i in pick[l]]
    return (torch.stack([a.scores for a in chosen]), torch.tensor([a.clean_value for a in chosen]),
            chosen[0].layers)


def matrice_sets(attrs: LanguageAttributions, *, languages: Sequence[str] | None = None, k: float = 1.0,
                 threshold: float = 0.3, weighting: Weighting = "uniform",
                 pick: dict[str, dict[str, list[int]]] | None = None) -> dict[str, NeuronSet]:
    """Each fact's MATRICE set over the queries of ``languages`` (all by default); ``pick[key][lang]`` keeps
    only those prompt indices (for resampling)."""
    if weighting not in ("uniform", "confidence"):
        raise SettingsError(f"unknown weighting {weighting!r}; use 'uniform' or 'confidence'")
    langs = list(attrs.languages if languages is None else languages)
    out = {}
    for key in attrs.by_fact:
        cells, conf, layers = _cells(attrs, key, langs, None if pick is None else pick[key])
        scores = matrice_scores(cells, conf if weighting == "confidence" else None, k)
        out[key] = matrice_neurons(scores, layers, threshold)
    return out


def intersection_sets(attrs: LanguageAttributions, *, languages: Sequence[str] | None = None, threshold: float = 0.3,
                      p: float = 0.5, pick: dict[str, dict[str, list[int]]] | None = None) -> dict[str, NeuronSet]:
    """Each fact's plain intersection (LIKN) over ``languages``, from the same attributions (``pick`` as above)."""
    langs = list(attrs.languages if languages is None else languages)
    out = {}
    for key in attrs.by_fact:
        sets = {l: language_set([a for i, a in enumerate(attrs.of(key, l)) if pick is None or i in pick[key][l]],
                                threshold, p) for l in langs}
        out[key] = split_languages(sets)[0]
    return out


def resample_stability(attrs: LanguageAttributions, *, n_resamples: int = 10, seed: int = 0, k: float = 1.0,
                       threshold: float = 0.3, p: float = 0.5, weighting: Weighting = "uniform") -> pd.DataFrame:
    """How stable each selection is when the queries change: ``n_resamples`` times, every language keeps a
    random half of its prompts (at least one), and both MATRICE and plain intersection select from that half.
    One row per fact and method: ``stability`` (mean Jaccard similarity of the resamples' sets, two empty sets
    counting as 1), ``mean_size``, ``empty`` (resamples with an empty set). Facts with one prompt in some
    language cannot be resampled and get ``stability`` NaN, ``note`` saying so."""
    if n_resamples < 2:
        raise SettingsError(f"n_resamples must be at least 2 to compare resamples, got {n_resamples}")
    rng = random.Random(seed)
    picks = []
    for _ in range(n_resamples):
        picks.append({key: {l: sorted(rng.sample(range(len(a)), max(1, len(a) // 2))) for l, a in per.items()}
                      for key, per in attrs.by_fact.items()})
    runs = {"matrice": [matrice_sets(attrs, k=k, threshold=threshold, weighting=weighting, pick=pk) for pk in picks],
            "intersection": [intersection_sets(attrs, threshold=threshold, p=p, pick=pk) for pk in picks]}
    rows = []
    for key, per in attrs.by_fact.items():
        single = [l for l, a in per.items() if len(a) < 2]
        for method, sets in runs.items():
            mine = [s[key] for s in sets]
            sims = [a.jaccard(b) if (a or b) else 1.0 for a, b in itertools.combinations(mine, 2)]
            rows.append({"fact": key, "method": method,
                         "stability": float("nan") if single else sum(sims) / len(sims),
                         "mean_size": sum(map(len, mine)) / len(mine), "empty": sum(not s for s in mine),
                         "note": f"one prompt in {', '.join(single)}: nothing to resample" if single else ""})
    return pd.DataFrame(rows)


def heldout_language_effects(model: Any, facts: Sequence[MultilingualFact], attrs: LanguageAttributions,
                             held_out: str, *, k: float = 1.0, threshold: float = 0.3, p: float = 0.5,
                             weighting: Weighting = "uniform", **kwargs: Any) -> pd.DataFrame:
    """Select with MATRICE and with plain intersection on every language but ``held_out``, then suppress and
    enhance each set on ``held_out``'s prompts beside random sets (:func:`~knlens.methods.interventions.measure`,
    ``kwargs`` passed on). One row per method and action with the tests of
    :meth:`~knlens.methods.interventions.InterventionResult.tests`, the mean set size and the facts whose set
    was empty (not measured)."""
    if held_out not in attrs.languages or len(attrs.languages) < 3:
        raise SettingsError(f"held_out must be one of {', '.join(attrs.languages)}, with two languages left to "
                            f"select on")
    rest = [l for l in attrs.languages if l != held_out]
    chosen = {"matrice": matrice_sets(attrs, languages=rest, k=k, threshold=threshold, weighting=weighting),
              "intersection": intersection_sets(attrs, languages=rest, threshold=threshold, p=p)}
    out = []
    for method, sets in chosen.items():
        pairs = [(replace(m[held_out], name=f"{m.key}/{held_out}"), sets[m.key]) for m in facts if sets[m.key]]
        empty = len(facts) - len(pairs)
        if not pairs:
            out.append(pd.DataFrame([{"method": method, "facts_without_set": empty, "mean_size": 0.0}]))
            continue
        tests = measure(model, [f for f, _ in pairs], [s for _, s in pairs], **kwargs).tests()
        out.append(tests.assign(method=method, facts_without_set=empty,
                                mean_size=sum(len(s) for _, s in pairs) / len(pairs)))
    table = pd.concat(out, ignore_index=True)
    return table[["method", *[c for c in table.columns if c != "method"]]]
