"""NA-ICA / QRNCA: query-relevant neurons by neuron attribution and inverse cluster attribution (Chen, Dejl, Toni,
2024; docs/methods.md, Query-relevant neurons).

For queries ``q`` (each asked by several multiple-choice templates, :mod:`.multiple_choice`):

* ``na_q(n) = Σ_templates IG_t(n) / Z_q`` with the option letter as target; ``Z_q = Σ_n |Σ_t IG_t(n)|`` (the
  paper's "total score"; the absolute value keeps Z positive when scores of both signs cancel);
* the cluster of ``q``: the neurons with ``na_q(n) > threshold · max_n na_q(n)`` (threshold 0.2);
* ``ica(n) = log(|C| / (#clusters containing n + 1))`` (``|C|`` = number of queries);
* score ``na_q(n) · ica(n)``; the query-relevant neurons are its ``top_v`` = 20, after removing the *common*
  neurons, those in more than ``common_share`` = 30 % of the clusters. (The authors' released filter compares a
  string with a list and never removes anything; this one does, see the tests.)

>>> import torch
>>> clusters = torch.tensor([[[True, True, False]], [[True, False, False]], [[True, False, True]]])  # 3 queries
>>> inverse_cluster_attribution(clusters)          # log(3/4), log(3/2), log(3/2)
tensor([[-0.2877,  0.4055,  0.4055]])
>>> common_neurons(clusters, share=0.3).tolist()   # neuron 0 is in 3/3 clusters, 1 and 2 in 1/3 > 0.3
[[True, True, True]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.neurons import NeuronSet
from knlens.methods.attribution.result import Attribution
from knlens.results.contract import Result

__all__ = ["QRNCASettings", "QRNCA", "neuron_attribution", "clusters_of", "inverse_cluster_attribution",
           "common_neurons", "query_relevant_neurons", "top_neurons", "density"]


def neuron_attribution(attributions: Sequence[Sequence[Attribution]]) -> Float[Tensor, "query layer neuron"]:
    """``na`` of every query: its templates' IG scores summed, divided by the sum of their absolute values.

    >>> import torch
    >>> from types import SimpleNamespace as A
    >>> na = neuron_attribution([[A(scores=torch.tensor([[1.0, 3.0]])), A(scores=torch.tensor([[1.0, -1.0]]))]])
    >>> na.tolist()                                # (2, 2) / 4
    [[[0.5, 0.5]]]
    """
    if not attributions or any(not a for a in attributions):
        raise InsufficientDataError("neuron attribution needs at least one query, each with at least one template")
    summed = torch.stack([torch.stack([a.scores.float() for a in attrs]).sum(0) for attrs in attributions])
    z = summed.abs().flatten(1).sum(1).clamp_min(1e-30)
    return summed / z[:, None, None]


def clusters_of(na: Float[Tensor, "query layer neuron"], threshold: float = 0.2) -> Bool[Tensor, "query layer neuron"]:
    """The cluster of each query: neurons with ``na > threshold · max na`` of that query.

    >>> clusters_of(torch.tensor([[[0.1, 1.0, 0.3]]]), 0.2).tolist()
    [[[False, True, True]]]
    """
    if not 0.0 <= threshold < 1.0:
        raise SettingsError(f"the cluster threshold is a fraction of the maximum in [0, 1), got {threshold}")
    top = na.flatten(1).max(1).values
    return na > threshold * top[:, None, None]


def inverse_cluster_attribution(clusters: Bool[Tensor, "query layer neuron"]) -> Float[Tensor, "layer neuron"]:
    """``ica(n) = log(|C| / (#clusters containing n + 1))``: high for neurons of few clusters, negative for a
    neuron of every cluster."""
    return torch.log(clusters.shape[0] / (clusters.sum(0).float() + 1.0))


def common_neurons(clusters: Bool[Tensor, "query layer neuron"], share: float = 0.3) -> Bool[Tensor, "layer neuron"]:
    """Neurons in more than ``share`` of the clusters (the paper's common neurons, 30 %)."""
    if not 0.0 <= share <= 1.0:
        raise SettingsError(f"the common-neuron share is a fraction in [0, 1], got {share}")
    return clusters.float().mean(0) > share


def top_neurons(scores: Float[Tensor, "layer neuron"], k: int, exclude: Bool[Tensor, "layer neuron"] | None = None,
                layers: Sequence[int] | None = None) -> NeuronSet:
    """The ``k`` highest ``scores`` (best first), never an ``exclude`` d neuron; ``layers`` names the rows.

    >>> top_neurons(torch.tensor([[0.1, 0.9], [0.5, 0.7]]), 2, exclude=torch.tensor([[False, True], [False, False]]))
    NeuronSet([L1.N1, L1.N0])
    """
    flat = scores.float().flatten()
    keep = torch.arange(flat.numel()) if exclude is None else (~exclude.flatten()).nonzero()[:, 0]
    idx = keep[flat[keep].argsort(descending=True, stable=True)][:k].tolist()
    rows = list(layers) if layers is not None else list(range(scores.shape[0]))
    return NeuronSet((rows[i // scores.shape[1]], i % scores.shape[1]) for i in idx)


@dataclass(frozen=True)
class QRNCASettings:
    """QRNCA's settings (the paper's defaults): cluster ``threshold`` × max, ``top_v`` neurons per query, common
    neurons in more than ``common_share`` of the clusters."""

    threshold: float = 0.2
    top_v: int = 20
    common_share: float = 0.3


@dataclass(frozen=True, eq=False)
class QRNCA(Result):
    """Query-relevant neurons of ``queries``: ``na``, ``clusters``, ``ica``, ``scores`` (= na × ica), the ``common``
    neurons removed and each query's ``neurons`` (top-v by score, common ones excluded)."""

    study = "qrnca"

    queries: tuple[str, ...]
    na: Float[Tensor, "query layer neuron"]
    clusters: Bool[Tensor, "query layer neuron"]
    ica: Float[Tensor, "layer neuron"]
    scores: Float[Tensor, "query layer neuron"]
    common: NeuronSet
    neurons: tuple[NeuronSet, ...]
    settings: QRNCASettings = QRNCASettings()
    layers: tuple[int, ...] = field(default=())

    def to_frame(self) -> pd.DataFrame:
        """One row per (query, neuron) of the query-relevant sets: ``query, rank, layer, neuron, na, ica, score``."""
        rows = []
        for q, (name, ns) in enumerate(zip(self.queries, self.neurons)):
            for rank, n in enumerate(ns):
                r = self.layers.index(n.layer)
                rows.append({"query": name, "rank": rank, "layer": n.layer, "neuron": n.index,
                             "na": float(self.na[q, r, n.index]), "ica": float(self.ica[r, n.index]),
                             "score": float(self.scores[q, r, n.index])})
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None) -> Any:
        """Layer × neuron-bin density of the query-relevant neurons of all queries."""
        from knlens.results.figures import neuron_heatmap

        d = self.na.shape[2]
        dens = density(NeuronSet(n for ns in self.neurons for n in ns), len(self.layers), d, layers=self.layers)
        return neuron_heatmap(dens.float(), layers=self.layers, ax=ax, title="query-relevant neurons (count per bin)")


def query_relevant_neurons(attributions: Sequence[Sequence[Attribution]], queries: Sequence[str] | None = None,
                           settings: QRNCASettings = QRNCASettings()) -> QRNCA:
    """QRNCA over the queries whose template attributions are ``attributions[q]`` (same layers for all).

    >>> from types import SimpleNamespace as A
    >>> scores = [torch.tensor([[5.0, 1.0, 0.0, 0.0]]), torch.tensor([[5.0, 0.0, 1.0, 0.0]]),
    ...           torch.tensor([[5.0, 0.0, 0.0, 1.0]])]          # neuron 0 strong in every query: common
    >>> r = query_relevant_neurons([[A(scores=s, layers=(0,))] for s in scores], settings=QRNCASettings(top_v=1))
    >>> [str(n) for ns in r.neurons for n in ns], list(r.common)
    (['L0.N1', 'L0.N2', 'L0.N3'], [Neuron(layer=0, index=0)])
    """
    if settings.top_v < 1:
        raise SettingsError(f"top_v must be at least 1, got {settings.top_v}")
    layers = tuple(attributions[0][0].layers) if attributions and attributions[0] else ()
    if any(tuple(a.layers) != layers for attrs in attributions for a in attrs):
        raise SettingsError("every attribution of a QRNCA run must cover the same layers")
    na = neuron_attribution(attributions)
    clusters = clusters_of(na, settings.threshold)
    ica = inverse_cluster_attribution(clusters)
    scores = na * ica
    common = common_neurons(clusters, settings.common_share)
    neurons = tuple(top_neurons(s, settings.top_v, common, layers) for s in scores)
    names = tuple(queries) if queries is not None else tuple(f"query{i}" for i in range(len(attributions)))
    return QRNCA(names, na, clusters, ica, scores, top_neurons(common.float(), int(common.sum()), None, layers),
                 neurons, settings, layers)


def density(neurons: NeuronSet, n_layers: int, d_mlp: int, *, bins: int = 32,
            layers: Sequence[int] | None = None) -> Float[Tensor, "layer bin"]:
    """How many of ``neurons`` fall in each (layer, neuron-index bin): the "localized regions" plot's counts.

    >>> density(NeuronSet([(0, 1), (0, 2), (1, 9)]), 2, 10, bins=2).tolist()
    [[2.0, 0.0], [0.0, 1.0]]
    """
    rows = list(layers) if layers is not None else list(range(n_layers))
    out = torch.zeros(len(rows), bins)
    for n in neurons:
        out[rows.index(n.layer), n.index * bins // d_mlp] += 1
    return out
