"""Query localization (Chen et al., ICLR 2025): is a fact's set of knowledge neurons a property of the
fact, or of the query that asks for it? The study's instruments, each a composition of shared methods:

* **query-KN mapping** — suppress on query i its own neurons S_i, a paraphrase's S_j, S_i ∩ S_j, and random
  sets with the layers and size of S_j, optionally after removing the relation's generic neurons from
  every set (:func:`query_kn_mapping`); per-fact permutation tests of own versus paraphrase and of each
  against its random control (:func:`mapping_tests`);
* **consistency-aware selection** (:mod:`knlens.methods.consistent_selection`) against the query's own top
  neurons and the top mean attribution at the same set size, on reliability, generality (prompts used for
  the selection and held-out ones) and locality (:func:`compare_selections`);
* **attention versus MLP at the neuron level** — :mod:`knlens.methods.attention`;
* **entity versus relation** — causal traces with the corruption on the subject or on the relation
  tokens (:func:`entity_vs_relation`);
* the consistency of neurons across paraphrases — :mod:`knlens.studies.consistency`.

>>> from knlens import load_model, Fact, NeuronSet
>>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
>>> m = query_kn_mapping(load_model("tiny-llama"), fact, [NeuronSet([(1, 3)]), NeuronSet([(0, 2)])])
>>> sorted(m.frame.relation)
['intersection', 'intersection', 'own', 'own', 'paraphrase', 'paraphrase']
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.methods.controls import random_control
from knlens.methods.interventions import intervene, per_prompt
from knlens.methods.tracing.result import Trace
from knlens.methods.tracing.trace import trace
from knlens.results.contract import Result, TableResult
from knlens.run.engine import target_probs
from knlens.stats.tests import paired_group_test

__all__ = [
    "MAPPING_RELATIONS", "MappingSettings", "QueryKNMapping", "query_kn_mapping", "mapping_summary", "mapping_tests",
    "ComparisonSettings", "SelectionComparison", "compare_selections", "EntityRelationSettings", "EntityRelation",
    "entity_vs_relation",
]

MAPPING_RELATIONS = ("own", "own-random", "paraphrase", "paraphrase-random", "intersection")


# ------------------------------------------------------------------------------- query-KN mapping

@dataclass(frozen=True)
class MappingSettings:
    """The per-prompt neuron sets of :func:`query_kn_mapping` (before ``exclude``), the factor, the excluded
    (generic) neurons and the random draws per set."""

    sets: tuple[NeuronSet, ...]
    factor: float = 0.0
    exclude: NeuronSet | None = None
    n_random: int = 0
    seed: int = 0


@dataclass(frozen=True, eq=False)
class QueryKNMapping(TableResult):
    """One fact's query-KN mapping: ``frame`` has one row per (query, source, relation, draw), see
    :func:`query_kn_mapping`; :meth:`summary` and :meth:`tests` are :func:`mapping_summary` and
    :func:`mapping_tests` of it (pool many facts with ``pd.concat([m.frame for m in mappings])``)."""

    study = "query_kn_mapping"

    fact: Fact
    frame: pd.DataFrame
    settings: MappingSettings


    def summary(self) -> pd.DataFrame:
        """:func:`mapping_summary` of the frame."""
        return mapping_summary(self.frame)

    def tests(self, *, n_permutations: int = 10000, seed: int = 0) -> pd.DataFrame:
        """:func:`mapping_tests` of the frame (one fact: every test has n = 1)."""
        return mapping_tests(self.frame, n_permutations=n_permutations, seed=seed)

    def plot(self) -> Any:
        """Mean relative change of P(target) per relation (own, paraphrase, their random controls, ...)."""
        import matplotlib.pyplot as plt

        s = self.summary()
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(s)), 3))
        ax.bar(range(len(s)), s["relative"] * 100, color="0.5")
        ax.set_xticks(range(len(s)), s["relation"], fontsize=8)
        ax.set_ylabel("mean ΔP(target) / P (%)")
        ax.axhline(0, color="0.3", lw=0.8)
        fig.tight_layout()
        return fig


def query_kn_mapping(model: Any, fact: Fact, sets: Sequence[NeuronSet], *, factor: float = 0.0,
                     exclude: NeuronSet | None = None, n_random: int = 0, seed: int = 0,
                     batch_size: int = 64) -> QueryKNMapping:
    """Suppress (``factor=0``) on query i its own set S_i, each paraphrase's set S_j and S_i ∩ S_j.

    ``exclude`` (e.g. the relation's :func:`~knlens.methods.selection.generic_neurons`) is removed from every set
    first. ``n_random`` draws of :func:`~knlens.methods.interventions.random_control` per set S_j (same number of
    neurons in each layer) give the rows ``own-random`` (j = i) and ``paraphrase-random`` (j ≠ i), one per
    draw (``draw`` column). Returns a :class:`QueryKNMapping` whose ``frame`` has one row per (query, source,
    relation, draw) with ``n_neurons, p_before, p_after, change, relative`` (= change / p_before). All
    (set, prompt) pairs run as rows of one batch (:func:`knlens.methods.interventions.intervene`).

    >>> from knlens import load_model, Fact, NeuronSet
    >>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
    >>> m = query_kn_mapping(load_model("tiny-llama"), fact, [NeuronSet([(1, 3)]), NeuronSet([(0, 2)])],
    ...                      n_random=2)
    >>> sorted(m.frame.relation.value_counts().items())
    [('intersection', 2), ('own', 2), ('own-random', 4), ('paraphrase', 2), ('paraphrase-random', 4)]
    """
    n = len(fact.prompts)
    if len(sets) != n:
        raise SettingsError(f"{len(sets)} neuron sets for {n} prompts: give one set per prompt")
    if n_random < 0:
        raise SettingsError(f"n_random must be >= 0, got {n_random}")
    settings = MappingSettings(tuple(sets), float(factor), exclude, n_random, seed)
    sets = [s - exclude for s in sets] if exclude is not None else list(sets)
    q = encode(model, list(fact.prompts), fact.target)
    pairs = list(itertools.permutations(range(n), 2))
    randoms = [random_control(sets[j], model.cfg.d_mlp, seed=seed + 1000 * j + d)
               for j in range(n) for d in range(n_random)]
    all_sets = [*sets, *[sets[i] & sets[j] for i, j in pairs], *randoms]
    before = per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
    after = per_prompt(intervene(model, q, all_sets, factor, batch_size=batch_size), q)  # [set, prompt]
    rows = []

    def rec(i: int, j: int, rel: str, s_idx: int, draw: int = 0) -> None:
        b, a = float(before[i]), float(after[s_idx, i])
        rows.append({"fact": fact.name, "query": i, "source": j, "relation": rel, "draw": draw,
                     "n_neurons": len(all_sets[s_idx]), "p_before": b, "p_after": a, "change": a - b,
                     "relative": (a - b) / b if b > 0 else float("nan")})
    for i in range(n):
        rec(i, i, "own", i)
    for k, (i, j) in enumerate(pairs):
        rec(i, j, "paraphrase", j)
        rec(i, j, "intersection", n + k)
    first_random = n + len(pairs)
    for i in range(n):
        for j in range(n):
            for d in range(n_random):
                rec(i, j, "own-random" if i == j else "paraphrase-random", first_random + j * n_random + d, d)
    return QueryKNMapping(fact, pd.DataFrame(rows), settings)


def mapping_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean relative change, mean |set|, rows and share of empty sets per relation (own, paraphrase, ...)."""
    g = frame.groupby("relation")
    return pd.DataFrame({"relative": g["relative"].mean(), "change": g["change"].mean(),
                         "n_neurons": g["n_neurons"].mean(), "n": g.size(),
                         "share_empty": g["n_neurons"].apply(lambda s: float((s == 0).mean()))}).reindex(
        list(MAPPING_RELATIONS)).dropna(how="all").reset_index()


def mapping_tests(frame: pd.DataFrame, *, n_permutations: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Per-fact sign-flip permutation tests on the relative change of P(target), rows with empty sets left out.

    For each comparison A − B, a fact contributes mean(relative | A) − mean(relative | B) over its queries
    (and draws); facts lacking either are skipped. Query-KN mapping predicts ``own − paraphrase`` < 0 under
    suppression; ``own − own-random`` and ``paraphrase − paraphrase-random`` say whether each set does more
    than arbitrary neurons of its layers.
    """
    rows = []
    ok = frame[frame.n_neurons > 0]
    for a, b in (("own", "paraphrase"), ("own", "own-random"), ("paraphrase", "paraphrase-random"),
                 ("intersection", "paraphrase")):
        try:
            t = paired_group_test(ok, a, b, "relative", by="relation", n_permutations=n_permutations, seed=seed)
        except InsufficientDataError:  # no fact has both
            continue
        rows.append({"comparison": t["comparison"], "n_facts": t["n_units"],
                     **{k: t[k] for k in ("mean_a", "mean_b", "difference", "share_a_above_b", "p", "p_floor")}})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ consistency-aware selection

@dataclass(frozen=True)
class ComparisonSettings:
    """The named neuron sets :func:`compare_selections` compared, the query prompt, the held-out prompts, the
    other facts of the locality check (their names) and the factor."""

    sets: dict[str, NeuronSet]
    query: int = 0
    held_out: tuple[int, ...] = ()
    others: tuple[str, ...] = ()
    factor: float = 0.0


@dataclass(frozen=True, eq=False)
class SelectionComparison(TableResult):
    """Reliability, generality, held-out effect and locality of each neuron set (:func:`compare_selections`);
    ``frame``: one row per set."""

    study = "compare_selections"

    fact: Fact
    frame: pd.DataFrame
    settings: ComparisonSettings


    def plot(self) -> Any:
        """Grouped bars: each measure (columns) per neuron set."""
        import matplotlib.pyplot as plt

        cols = ["reliability", "generality", "held_out", "locality"]
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(self.frame)), 3))
        self.frame.set_index("set")[cols].plot.bar(ax=ax, rot=0)
        ax.set_ylabel("relative ΔP(target)")
        ax.axhline(0, color="0.3", lw=0.8)
        fig.tight_layout()
        return fig


def compare_selections(model: Any, fact: Fact, sets: Mapping[str, NeuronSet], *, query: int = 0,
                       held_out: Sequence[int] = (), others: Sequence[Fact] = (), factor: float = 0.0,
                       batch_size: int = 64) -> SelectionComparison:
    """Reliability, generality and locality of each neuron set under an intervention (default suppress).

    reliability: relative ΔP on the query ``fact.prompts[query]``; generality: mean relative ΔP on the
    fact's other prompts except ``held_out``; held_out: mean relative ΔP on the ``held_out`` prompts (those
    not used to select the neurons); locality: mean |relative ΔP| on the prompts of ``others`` (smaller is
    more local). For suppression a *more negative* reliability / generality means a stronger effect.
    Returns a :class:`SelectionComparison` (its ``frame``: one row per set).
    """
    names = list(sets)
    n = len(fact.prompts)
    if not 0 <= query < n or any(not 0 <= h < n or h == query for h in held_out):
        raise SettingsError(f"query {query} and held_out {list(held_out)} must be distinct prompts of the {n}")
    q = encode(model, list(fact.prompts), fact.target)
    before = per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
    after = per_prompt(intervene(model, q, [sets[k] for k in names], factor, batch_size=batch_size), q)
    rel = (after - before) / before.clamp_min(1e-30)  # [set, prompt]
    used = [i for i in range(n) if i != query and i not in held_out]
    loc = torch.zeros(len(names))
    n_loc = 0
    for o in others:
        qo = encode(model, list(o.prompts), o.target)
        bo = per_prompt(target_probs(model, qo, batch_size=batch_size).cpu(), qo)
        ao = per_prompt(intervene(model, qo, [sets[k] for k in names], factor, batch_size=batch_size), qo)
        loc += ((ao - bo) / bo.clamp_min(1e-30)).abs().sum(1)
        n_loc += len(o.prompts)
    rows = []
    for s_i, name in enumerate(names):
        rows.append({"fact": fact.name, "query": query, "set": name, "n_neurons": len(sets[name]),
                     "reliability": float(rel[s_i, query]),
                     "generality": float(rel[s_i, used].mean()) if used else float("nan"),
                     "held_out": float(rel[s_i, list(held_out)].mean()) if held_out else float("nan"),
                     "locality": float(loc[s_i] / n_loc) if n_loc else float("nan")})
    settings = ComparisonSettings(dict(sets), query, tuple(int(h) for h in held_out),
                                  tuple(o.name or o.prompts[0] for o in others), float(factor))
    return SelectionComparison(fact, pd.DataFrame(rows), settings)


# ------------------------------------------------------------------------------ entity vs relation

@dataclass(frozen=True)
class EntityRelationSettings:
    """The kinds traced and the other :func:`~knlens.methods.tracing.trace.trace` keywords, as text (each
    trace's full settings are in its own ``settings``)."""

    kinds: tuple[str, ...] = ("mlp", "attn")
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class EntityRelation(Result):
    """Causal traces of one prompt with the corruption on the subject and on the relation tokens."""

    study = "entity_vs_relation"

    subject: Trace
    relation: Trace
    settings: EntityRelationSettings = EntityRelationSettings()

    @property
    def prompt(self) -> str:
        """The prompt (the key names the result by it)."""
        return self.subject.prompt

    def to_frame(self) -> pd.DataFrame:
        """Per (corrupted part, kind): total effect, peak indirect effect with its layer / token, and the
        mean indirect effect at the last token and at the (last) corrupted tokens."""
        rows = []
        for part, t in (("subject", self.subject), ("relation", self.relation)):
            last = len(t.tokens) - 1
            for kind, e in t.effects.items():
                i = int(e.argmax())
                rows.append({"corrupted": part, "kind": kind, "p_clean": t.p_clean, "p_corrupted": t.p_corrupted,
                             "total_effect": t.total_effect, "peak_effect": float(e.max()),
                             "peak_layer": i // e.shape[1], "peak_token": t.tokens[i % e.shape[1]],
                             "mean_last_token": float(e[:, last].mean()),
                             "mean_corrupted_tokens": float(e[:, list(t.corrupted)].mean())})
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        return self.subject.plot(), self.relation.plot()


def entity_vs_relation(model: Any, fact_or_prompt: Any, target: str | None = None, *,
                       kinds: Sequence[str] = ("mlp", "attn"), **trace_kw: Any) -> EntityRelation:
    """:func:`knlens.methods.tracing.trace.trace` twice: corrupting the subject, then the relation tokens."""
    return EntityRelation(trace(model, fact_or_prompt, target, kinds=kinds, corrupt="subject", **trace_kw),
                          trace(model, fact_or_prompt, target, kinds=kinds, corrupt="relation", **trace_kw),
                          EntityRelationSettings(tuple(kinds), {k: str(v) for k, v in trace_kw.items()}))
