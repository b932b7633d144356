"""Clusters of located neurons over their structural distances: 0-dimensional persistent homology as Chen et
al. (2024) use it, and the baselines they compare (average linkage, DBSCAN, k-means; docs/methods.md, topology clustering).

**Persistence clustering.** Every neuron is born alone at distance 0; edges enter in order of distance and join
components (single-linkage filtration, a union-find; ``scipy.sparse.csgraph.connected_components`` here). The
paper's rules: keep the edges below the ``edge_quantile`` (0.2) quantile of the finite distances, and of those
the shortest ``union_share`` (half); the components they form with more than one neuron are the candidate
clusters. A cluster's **birth** is the distance of its shortest edge (when it first exists), its **death** the
distance at which it joins anything outside it (the shortest edge leaving it; infinite when none is finite),
its **persistence** death − birth. A cluster is kept when its persistence exceeds the ``birth_quantile`` (median)
of the candidates' births.

>>> import numpy as np
>>> d = np.full((5, 5), 9.0); d[0, 1] = d[1, 0] = 1.0; d[2, 3] = d[3, 2] = 1.2; np.fill_diagonal(d, np.inf)
>>> [c.tolist() for c in persistence_clusters(d, union_share=1.0).clusters]
[[0, 1], [2, 3]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from scipy.sparse import csr_array
from scipy.sparse.csgraph import connected_components

from knlens.core.errors import SettingsError, TooFewNeuronsError

__all__ = ["Clustering", "persistence_clusters", "baseline_clusters", "BASELINES", "MIN_NEURONS"]

BASELINES: tuple[str, ...] = ("average", "dbscan", "kmeans")
MIN_NEURONS = 3  # fewer located neurons than this cannot be split into clusters of size > 1


@dataclass(frozen=True)
class Clustering:
    """``clusters``: index arrays into the neurons (kept clusters only, largest first); ``table``: every
    candidate cluster (``members``, ``size``, ``birth``, ``death``, ``persistence``, ``kept``); ``method``."""

    clusters: tuple[Int[np.ndarray, "_"], ...]
    table: pd.DataFrame
    method: str


def _check(dist: np.ndarray, min_neurons: int) -> np.ndarray:
    n = dist.shape[0]
    if dist.ndim != 2 or dist.shape[1] != n:
        raise SettingsError(f"distances must be a square matrix, got shape {dist.shape}")
    if n < min_neurons:
        raise TooFewNeuronsError(f"{n} located neurons: clustering needs at least {min_neurons} (clusters have more "
                                 f"than one neuron and there must be something outside them)")
    if not np.allclose(np.where(np.isfinite(dist), dist, -1), np.where(np.isfinite(dist.T), dist.T, -1)):
        raise SettingsError("distances must be symmetric")
    return np.where(np.eye(n, dtype=bool), np.inf, dist)


def _finite_pairs(dist: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(dist.shape[0], 1)
    vals = dist[iu]
    return vals[np.isfinite(vals)]


def persistence_clusters(dist: Float[np.ndarray, "n n"], *, edge_quantile: float = 0.2, union_share: float = 0.5,
                         birth_quantile: float = 0.5, min_neurons: int = MIN_NEURONS) -> Clustering:
    """Persistence clusters of a symmetric distance matrix (infinite = no edge); see the module docstring.
    Fewer than ``min_neurons`` neurons, or no finite distance, is a
    :class:`~knlens.core.errors.TooFewNeuronsError` naming the count and the threshold."""
    if not 0 < edge_quantile <= 1 or not 0 < union_share <= 1 or not 0 <= birth_quantile <= 1:
        raise SettingsError(f"edge_quantile and union_share must be in (0, 1], birth_quantile in [0, 1]; got "
                            f"{edge_quantile}, {union_share}, {birth_quantile}")
    d = _check(dist, min_neurons)
    finite = _finite_pairs(d)
    if not len(finite):
        raise TooFewNeuronsError(f"{d.shape[0]} located neurons but no finite structural distance between any two "
                                 f"(all in one layer or more than the span apart): nothing to cluster")
    below = np.sort(finite[finite <= np.quantile(finite, edge_quantile)])
    cut = below[max(1, int(np.ceil(union_share * len(below)))) - 1]
    adj = np.isfinite(d) & (d <= cut)
    _, labels = connected_components(csr_array(adj.astype(np.int8)), directed=False)
    rows = []
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        if len(members) < 2:
            continue
        inside = d[np.ix_(members, members)]
        outside = np.delete(d[members], members, axis=1)
        birth = float(inside[np.isfinite(inside)].min())
        death = float(outside.min()) if outside.size else np.inf
        rows.append({"members": members, "size": len(members), "birth": birth, "death": death,
                     "persistence": death - birth})
    table = pd.DataFrame(rows, columns=["members", "size", "birth", "death", "persistence"])
    threshold = float(table["birth"].quantile(birth_quantile)) if len(table) else np.nan
    table["kept"] = table["persistence"] > threshold
    table = table.sort_values(["kept", "size", "birth"], ascending=[False, False, True], ignore_index=True)
    kept = tuple(m for m, k in zip(table["members"], table["kept"]) if k)
    return Clustering(kept, table, "persistence")


def _finite_filled(d: np.ndarray) -> np.ndarray:
    """Infinite distances replaced by twice the largest finite one (the baselines need a finite metric)."""
    finite = _finite_pairs(d)
    big = 2.0 * float(finite.max()) if len(finite) else 1.0
    out = np.where(np.isfinite(d), d, big)
    np.fill_diagonal(out, 0.0)
    return out


def baseline_clusters(dist: Float[np.ndarray, "n n"], method: Literal["average", "dbscan", "kmeans"], *,
                      n_clusters: int = 2, eps_quantile: float = 0.2, seed: int = 0,
                      min_neurons: int = MIN_NEURONS) -> Clustering:
    """Clusters of size > 1 by a baseline: ``"average"`` linkage cut into ``n_clusters``, ``"dbscan"`` (eps = the
    ``eps_quantile`` quantile of the finite distances, 2 neurons per core) or ``"kmeans"`` (``n_clusters``, on a
    classical multidimensional scaling of the distances). Infinite distances count as twice the largest finite one.

    >>> import numpy as np
    >>> d = np.full((5, 5), 9.0); d[0, 1] = d[1, 0] = 1.0; d[2, 3] = d[3, 2] = 1.2; np.fill_diagonal(d, np.inf)
    >>> sorted(c.tolist() for c in baseline_clusters(d, "dbscan").clusters)
    [[0, 1], [2, 3]]
    """
    from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

    if method not in BASELINES:
        raise SettingsError(f"unknown baseline {method!r}; choose from {list(BASELINES)}")
    d = _finite_filled(_check(dist, min_neurons))
    n = d.shape[0]
    k = min(n_clusters, n)
    if method == "average":
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(d)
    elif method == "dbscan":
        eps = float(np.quantile(d[np.triu_indices(n, 1)], eps_quantile))
        labels = DBSCAN(eps=max(eps, 1e-12), min_samples=2, metric="precomputed").fit_predict(d)
    else:
        centred = -0.5 * (np.eye(n) - 1.0 / n) @ (d ** 2) @ (np.eye(n) - 1.0 / n)
        vals, vecs = np.linalg.eigh(centred)
        coords = vecs[:, vals > 1e-9] * np.sqrt(vals[vals > 1e-9])
        coords = coords if coords.size else np.zeros((n, 1))
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(coords)
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels) if lab >= 0]
    groups = sorted((g for g in groups if len(g) > 1), key=lambda g: (-len(g), g.tolist()))
    table = pd.DataFrame({"members": groups, "size": [len(g) for g in groups]}, columns=["members", "size"])
    return Clustering(tuple(groups), table.assign(kept=True), method)
