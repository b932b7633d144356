"""Degenerate knowledge neurons (DKN) of a fact: its located neurons clustered by weight topology, and the
clusters that pass the functional filter (Chen et al., 2024; docs/methods.md, degenerate components).

Per fact: the ``top`` (20) neurons by mean integrated-gradients attribution over its prompts
(:func:`~knlens.methods.selection.best_by_mean`), their structural distances
(:func:`~knlens.methods.structure.topology.neuron_distances`), clusters
(:func:`~knlens.methods.structure.clustering.persistence_clusters`, or a baseline). Each cluster is suppressed
alone (set to 0 at the target position, :func:`~knlens.methods.interventions.intervene`), then all of them
together. P is the mean over the prompts of P(whole target | prompt); a drop is ``1 − P_suppressed / P_clean``.
A cluster is a **degenerate component** when its own drop is below ``single_max`` (5 %) while the drop of all
clusters together is at least ``removes_min`` (50 %: "removes the fact" is read as halving P), and the fact has two
clusters or more (one cluster alone has nothing to stand in for it). A fact has DKNs
when at least one component is degenerate; its DKN set is the union of its degenerate components.

>>> import pandas as pd
>>> effects = pd.DataFrame({"component": [0, 1, 2], "drop_alone": [0.01, 0.03, 0.2]})
>>> functional_filter(effects, drop_all=0.8)["degenerate"].tolist()
[True, True, False]
>>> functional_filter(effects, drop_all=0.3)["degenerate"].tolist()      # all together do not remove the fact
[False, False, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries, encode
from knlens.methods.attribution import Attribution, attribute
from knlens.methods.interventions import intervene, per_prompt
from knlens.methods.selection import best_by_mean
from knlens.methods.structure.clustering import BASELINES, Clustering, baseline_clusters, persistence_clusters
from knlens.methods.structure.topology import MAX_SPAN, Mode, neuron_distances
from knlens.results.contract import TableResult
from knlens.run.engine import Engine

__all__ = ["functional_filter", "degenerate_components", "component_drops", "DegenerateComponents",
           "ComponentSettings", "cluster", "SINGLE_MAX", "REMOVES_MIN", "METHODS"]

SINGLE_MAX, REMOVES_MIN = 0.05, 0.5
METHODS: tuple[str, ...] = ("persistence", *BASELINES)


def functional_filter(effects: pd.DataFrame, drop_all: float, *, single_max: float = SINGLE_MAX,
                      removes_min: float = REMOVES_MIN) -> pd.DataFrame:
    """``effects`` (a ``drop_alone`` column, one row per cluster) with ``degenerate``: the cluster's own drop below
    ``single_max``, ``drop_all`` (all clusters suppressed together) at least ``removes_min``, two clusters or more."""
    if not 0.0 < single_max <= 1.0 or not 0.0 < removes_min <= 1.0:
        raise SettingsError(f"single_max and removes_min must be in (0, 1], got {single_max}, {removes_min}")
    return effects.assign(degenerate=(effects["drop_alone"] < single_max) & (drop_all >= removes_min) & (len(effects) >= 2))


def component_drops(model: Any, q: Queries, sets: Sequence[NeuronSet], *, engine: Engine = "reference",
                    batch_size: int = 64) -> tuple[float, list[float]]:
    """P(target) of ``q`` (mean over prompts) unchanged, and the relative drop with each of ``sets`` at 0."""
    p = per_prompt(intervene(model, q, [NeuronSet(), *sets], 0.0, engine=engine, batch_size=batch_size).cpu(),
                   q).mean(-1)
    clean = float(p[0])
    return clean, [1.0 - float(x) / clean if clean > 0 else float("nan") for x in p[1:]]


@dataclass(frozen=True)
class ComponentSettings:
    """What produced the components: located neurons, distance mode and span, clustering method and its
    quantiles, the functional filter's thresholds, IG steps, engine, model."""

    top: int = 20
    mode: str = "sensitivity"
    max_span: int = MAX_SPAN
    method: str = "persistence"
    edge_quantile: float = 0.2
    union_share: float = 0.5
    birth_quantile: float = 0.5
    single_max: float = SINGLE_MAX
    removes_min: float = REMOVES_MIN
    steps: int = 8
    engine: str = "reference"
    hook_point: str = "hook_post"
    model: str = ""


@dataclass(frozen=True, eq=False)
class DegenerateComponents(TableResult):
    """One fact's clusters: ``frame`` one row per cluster (``component``, ``neurons`` as ``"L3.N57 L4.N9"``,
    ``size``, ``layers``, ``drop_alone``, ``degenerate``); ``located`` the clustered neurons (best first);
    ``distances`` their structural distance matrix; ``p_clean`` and ``drop_all`` (all clusters suppressed)."""

    study = "degenerate-components"

    fact: Fact
    frame: pd.DataFrame
    located: NeuronSet
    distances: Float[Tensor, "n n"]
    p_clean: float
    drop_all: float
    settings: ComponentSettings = field(default_factory=ComponentSettings)

    @property
    def dkn(self) -> NeuronSet:
        """The union of the degenerate components (empty when the fact has none)."""
        return NeuronSet(nr for s in self.frame[self.frame.degenerate]["neurons"] for nr in _parse(s))

    @property
    def components(self) -> list[NeuronSet]:
        return [NeuronSet(_parse(s)) for s in self.frame["neurons"]]

    def plot(self) -> Any:
        """The distance matrix of the located neurons (finite part, log scale), clusters outlined."""
        import matplotlib.pyplot as plt

        dist = self.distances.numpy()
        d = np.where(np.isfinite(dist), dist, np.nan)
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        im = ax.imshow(np.log10(d), cmap="viridis_r")
        labels = [str(nr) for nr in self.located]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        for i, comp in enumerate(self.components):
            idx = [labels.index(str(nr)) for nr in comp]
            ax.scatter(idx, idx, s=30, marker="s", facecolors="none",
                       edgecolors="red" if self.frame["degenerate"].iloc[i] else "white", label=f"c{i}")
        fig.colorbar(im, ax=ax, label="log10 distance")
        ax.set_title(f"{self.fact.name or self.fact.prompts[0]}: {len(self.frame)} clusters, "
                     f"{int(self.frame['degenerate'].sum())} degenerate", fontsize=8)
        fig.tight_layout()
        return fig


def _parse(text: str) -> list[tuple[int, int]]:
    return [(int(t[1:].split(".N")[0]), int(t.split(".N")[1])) for t in text.split()]


def cluster(dist: Float[np.ndarray, "n n"], method: str, **kwargs: Any) -> Clustering:
    """Clusters of ``dist`` by ``method`` (``"persistence"`` or a baseline; baselines ignore the quantiles)."""
    if method == "persistence":
        return persistence_clusters(dist, **kwargs)
    if method not in METHODS:
        raise SettingsError(f"unknown clustering method {method!r}; choose from {list(METHODS)}")
    return baseline_clusters(dist, method)  # type: ignore[arg-type]


def degenerate_components(model: Any, fact: Fact, *, top: int = 20, mode: Mode = "sensitivity",
                          max_span: int = MAX_SPAN, method: str = "persistence", edge_quantile: float = 0.2,
                          union_share: float = 0.5, birth_quantile: float = 0.5, single_max: float = SINGLE_MAX,
                          removes_min: float = REMOVES_MIN, steps: int = 8, engine: Engine = "reference",
                          attributions: Sequence[Attribution] | None = None,
                          batch_size: int = 64) -> DegenerateComponents:
    """The degenerate components of ``fact`` (see the module docstring). ``attributions`` (one per prompt, from
    :func:`~knlens.methods.attribution.attribute`) are computed with ``steps`` Gauss-Legendre nodes when not given.
    Too few located neurons to cluster raise :class:`~knlens.core.errors.TooFewNeuronsError`.

    >>> from knlens import load_model, Fact
    >>> m = load_model("tiny-llama")
    >>> res = degenerate_components(m, Fact(["the capital of france is"], " paris"), top=12, steps=2)
    >>> list(res.frame.columns)
    ['component', 'neurons', 'size', 'layers', 'drop_alone', 'degenerate']
    """
    attrs = attributions if attributions is not None else attribute(model, fact, steps=steps, grid="gauss-legendre",
                                                                     tolerance=None)
    located = best_by_mean(attrs, top)
    q = encode(model, list(fact.prompts), fact.target)
    dist = neuron_distances(model, located, mode=mode, q=q, max_span=max_span)
    kw = {"edge_quantile": edge_quantile, "union_share": union_share, "birth_quantile": birth_quantile}
    found = cluster(dist, method, **(kw if method == "persistence" else {}))
    items = list(located)
    sets = [NeuronSet(items[i] for i in members) for members in found.clusters]
    everything = NeuronSet.union(sets) if sets else NeuronSet()
    clean, drops = component_drops(model, q, [*sets, everything], engine=engine, batch_size=batch_size)
    frame = pd.DataFrame({"component": range(len(sets)), "neurons": [" ".join(map(str, s)) for s in sets],
                          "size": [len(s) for s in sets], "layers": [" ".join(map(str, sorted(set(s.layers))))
                                                                       for s in sets],
                          "drop_alone": drops[:-1]}, columns=["component", "neurons", "size", "layers", "drop_alone"])
    drop_all = drops[-1] if sets else 0.0
    frame = functional_filter(frame.astype({"drop_alone": "float64"}), drop_all, single_max=single_max,
                              removes_min=removes_min).astype({"degenerate": "bool"})
    settings = ComponentSettings(top=top, mode=mode, max_span=max_span, method=method, edge_quantile=edge_quantile,
                                 union_share=union_share, birth_quantile=birth_quantile, single_max=single_max,
                                 removes_min=removes_min, steps=steps, engine=engine,
                                 model=str(getattr(model.cfg, "model_name", "")))
    return DegenerateComponents(fact, frame, located, torch.from_numpy(dist), clean, float(drop_all), settings)
