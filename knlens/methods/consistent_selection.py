"""Consistency-aware selection (Chen et al., ICLR 2025): neurons with a high mean and a low spread of
normalised attribution across paraphrases (β₁·mean − β₂·std), and the selections of equal size it is
compared with (the query's own top neurons, the top mean attribution).

>>> import torch
>>> v = torch.zeros(3, 2, 4)
>>> v[:, 0, 1] = 1.0                        # high on every paraphrase
>>> v[0, 1, 2] = 2.0                        # highest, but on one paraphrase only
>>> sorted(consistency_aware_neurons(v, 1)), sorted(equal_size_selections(v, 1)["query"])
([Neuron(layer=0, index=1)], [Neuron(layer=1, index=2)])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.neurons import NeuronSet
from knlens.stats.sets import Vectors

__all__ = ["consistency_aware_scores", "consistency_aware_neurons", "equal_size_selections"]


def _values(values: Vectors) -> Float[Tensor, "n layer neuron"]:
    v = values.detach().float() if isinstance(values, Tensor) else torch.stack(
        [a.scores.detach().float() for a in values])
    if v.ndim != 3 or v.shape[0] < 2:
        raise SettingsError(f"expected [paraphrase ≥ 2, layer, neuron] values, got shape {tuple(v.shape)}")
    return v


def consistency_aware_scores(values: Vectors, *, beta1: float = 1.0, beta2: float = 1.0
                             ) -> Float[Tensor, "layer neuron"]:
    """β₁·mean − β₂·std across paraphrases of each neuron's normalised value.

    ``values`` are per-paraphrase attribution scores (``[n, layer, neuron]`` or Attributions); each
    paraphrase's values are divided by its largest absolute value first, so every paraphrase counts alike.
    """
    v = _values(values)
    v = v / v.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None]
    return beta1 * v.mean(0) - beta2 * v.std(0, unbiased=False)


def _top(scores: Float[Tensor, "layer neuron"], k: int, *, layers: Sequence[int] | None,
         exclude: NeuronSet | None, exact: bool) -> NeuronSet:
    """The ``k`` neurons with the highest positive score, best first, skipping ``exclude``; with ``exact``,
    fewer than ``k`` raises :class:`InsufficientDataError`."""
    layer_ids = list(layers) if layers is not None else list(range(scores.shape[0]))
    d, flat = scores.shape[1], scores.flatten()
    picked = []
    for i in flat.argsort(descending=True).tolist():
        nr = (layer_ids[i // d], i % d)
        if len(picked) == k or float(flat[i]) <= 0:
            break
        if exclude is None or nr not in exclude:
            picked.append(nr)
    if exact and len(picked) < k:
        raise InsufficientDataError(f"only {len(picked)} neurons have a positive score; {k} were asked for")
    return NeuronSet(picked)


def consistency_aware_neurons(values: Vectors, k: int, *, beta1: float = 1.0, beta2: float = 1.0,
                              layers: Sequence[int] | None = None, exclude: NeuronSet | None = None) -> NeuronSet:
    """The ``k`` neurons with the highest positive consistency-aware score, best first (fewer if fewer
    are positive), skipping ``exclude``."""
    return _top(consistency_aware_scores(values, beta1=beta1, beta2=beta2), k, layers=layers, exclude=exclude,
                exact=False)


def equal_size_selections(values: Vectors, k: int, *, query: int = 0, beta1: float = 1.0, beta2: float = 1.0,
                          layers: Sequence[int] | None = None, exclude: NeuronSet | None = None
                          ) -> dict[str, NeuronSet]:
    """Three selections of exactly ``k`` neurons from the paraphrases' attributions ``values``:

    ``query`` — the query's own top ``k``; ``mean`` — top ``k`` of the mean normalised attribution (β₂ = 0);
    ``consistency-aware`` — top ``k`` of β₁·mean − β₂·std. Raises :class:`InsufficientDataError` when a
    selection has fewer than ``k`` neurons with a positive score.
    """
    v = _values(values)
    if not 0 <= query < v.shape[0]:
        raise SettingsError(f"query {query} outside the {v.shape[0]} paraphrases")
    scores = {"query": v[query], "mean": consistency_aware_scores(v, beta1=1.0, beta2=0.0),
              "consistency-aware": consistency_aware_scores(v, beta1=beta1, beta2=beta2)}
    return {name: _top(s, k, layers=layers, exclude=exclude, exact=True) for name, s in scores.items()}
