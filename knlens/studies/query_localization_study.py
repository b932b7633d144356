"""The query-localization study on ParaRel (Chen et al., ICLR 2025), as one composition of knlens' methods:

1. **facts** — ParaRel facts of the chosen relations (:func:`~knlens.data.pararel.load_pararel`), kept when the
   model answers at least ``min_prompts`` paraphrases (:func:`~knlens.methods.known.known_facts`); only the
   answered paraphrases are analysed;
2. **consistency** — coarse neurons of every paraphrase and their consistency across paraphrases
   (:func:`~knlens.studies.consistency.consistency_study`), within- against between-fact similarity, a
   bimodality test;
3. **query-KN mapping** — suppress own, paraphrase, intersection and random sets after removing the
   relation's generic neurons (:func:`~knlens.studies.query_localization.query_kn_mapping`);
4. **consistency-aware selection** at equal set size on a held-out paraphrase
   (:func:`~knlens.methods.consistent_selection.equal_size_selections`,
   :func:`~knlens.studies.query_localization.compare_selections`);
5. **knowledge synapses** — scale the last token's attention to its most-attended position against random
   positions (:func:`~knlens.methods.attention.synapse_scaling`).

Every table lands in a :class:`QueryLocalizationStudy` (saved by the result contract);
:mod:`knlens.viz.query_localization_page` writes it as Markdown, and ``knlens study query-localization``
runs both. Small settings run on the tiny models in the tests; the defaults are those of
``benchmarks/QUERY_LOCALIZATION.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.versions import environment
from knlens.data.pararel import load_pararel
from knlens.methods.attention import synapse_scaling
from knlens.methods.consistent_selection import equal_size_selections
from knlens.methods.controls import random_control
from knlens.methods.known import known_facts
from knlens.methods.selection import generic_neurons
from knlens.results.study import StudyResult
from knlens.stats.tests import paired_group_test
from knlens.studies.consistency import ConsistencyStudy, consistency_study
from knlens.studies.query_localization import compare_selections, mapping_summary, mapping_tests, query_kn_mapping

__all__ = ["QueryLocalizationSettings", "QueryLocalizationStudy", "select_facts", "query_localization_study"]


@dataclass(frozen=True)
class QueryLocalizationSettings:
    """The study's sizes and thresholds (defaults: the run of ``benchmarks/QUERY_LOCALIZATION.md``)."""

    model: str = "smollm2-135m"
    relations: tuple[str, ...] = ("P36", "P1376")
    candidates: int = 150  # facts read per relation before the known filter
    facts_per_relation: int = 14  # known facts studied per relation
    min_prompts: int = 3  # a fact is kept when known on at least this many paraphrases
    max_prompts: int = 4  # answered paraphrases analysed per fact
    steps: int = 8  # Gauss–Legendre nodes of integrated gradients
    threshold: float = 0.2  # coarse neurons: score ≥ threshold · max
    generic_share: float = 0.1  # generic: in the sets of more than this share of a relation's facts (and ≥ 2)
    n_random: int = 5  # random sets per neuron set in the mapping test
    k: int = 5  # set size of the selection comparison and of the synapse test
    n_controls: int = 5  # random control positions per synapse test
    others: int = 3  # facts of the same relation used for locality
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_prompts < 3 or self.max_prompts < self.min_prompts:
            raise InsufficientDataError("need 3 ≤ min_prompts ≤ max_prompts (a held-out paraphrase and two to "
                                        f"select on), got {self.min_prompts} and {self.max_prompts}")


@dataclass(frozen=True, eq=False)
class QueryLocalizationStudy(StudyResult):
    """Every table of the study by name (see :data:`TABLES`), a few single numbers, timings and versions."""

    study = "query-localization"
    settings: QueryLocalizationSettings
    numbers: dict[str, float]
    model_shape: dict[str, int]

    def to_frame(self) -> pd.DataFrame:
        """Every test of the study in one table (mapping, selection, synapses), one row per comparison."""
        parts = [self.tables[name].assign(test=name) for name in ("mapping_tests", "selection_tests", "synapse_tests")]
        return pd.concat(parts, ignore_index=True)

    def plot(self) -> Any:
        """Histogram of the facts' Jaccard consistency with Otsu's threshold."""
        import matplotlib.pyplot as plt

        facts = self.tables["facts"]
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        ax.hist(facts["jaccard"], bins=20, color="#789")
        cut = self.tables["consistency"].query("score == 'jaccard' and threshold == 'otsu'")["value"]
        if len(cut):
            ax.axvline(float(cut.iloc[0]), color="#c33", label="Otsu threshold")
            ax.legend(fontsize=8)
        ax.set_xlabel("mean pairwise Jaccard of a fact's paraphrases")
        ax.set_ylabel("facts")
        fig.tight_layout()
        return fig


TABLES = ("counts", "completeness", "consistency", "inconsistent_share", "within_between", "bimodality", "generic",
          "mapping", "mapping_summary", "mapping_tests", "selection_summary", "selection_tests", "synapse_summary",
          "synapse_tests", "facts")


def select_facts(model: Any, settings: QueryLocalizationSettings, data_dir: str | None = None,
                 say: Callable[[str], None] = lambda _: None) -> tuple[list[Fact], pd.DataFrame]:
    """Per relation: facts read, known on ≥ ``min_prompts`` paraphrases, studied; and the studied facts."""
    counts, chosen = [], []
    s = settings
    for rel in s.relations:
        read = load_pararel(rel, data_dir=data_dir, object_last=True, min_paraphrases=3, max_facts=s.candidates,
                            seed=s.seed)
        known = known_facts(model, read, keep_prompts="correct", min_prompts=s.min_prompts)
        kept = [replace(f, prompts=f.prompts[:s.max_prompts]) for f in known[:s.facts_per_relation]]
        counts.append({"relation": rel, "templates": len(read[0].prompts) if read else 0, "read": len(read),
                       f"known on ≥ {s.min_prompts} prompts": len(known), "studied": len(kept),
                       "prompts per studied fact": float(np.mean([len(f.prompts) for f in kept])) if kept else 0.0})
        chosen += kept
        say(f"{rel}: {len(read)} read, {len(known)} known, {len(kept)} studied")
    return chosen, pd.DataFrame(counts)


def _consistency_tables(study: ConsistencyStudy, s: QueryLocalizationSettings) -> dict[str, pd.DataFrame]:
    frame = study.to_frame()
    share = frame.groupby("relation", sort=False)[[c for c in frame if c.startswith("consistent_")]].apply(
        lambda g: (~g).mean()).reset_index()
    share.columns = ["relation"] + [c.replace("consistent_", "inconsistent_") for c in share.columns[1:]]
    comp = pd.DataFrame([{"relation": f.relation, "error": e} for f in study.facts for e in f.completeness])
    comp = pd.concat([comp, comp.assign(relation="all")], ignore_index=True)
    completeness = comp.groupby("relation", sort=False).error.agg(
        prompts="count", median="median", max="max", above=lambda e: int((e > 0.05).sum())).reset_index()
    completeness.columns = ["relation", "prompts", "median relative error", "max relative error", "prompts above 0.05"]
    wb = []
    for score in ("jaccard", "niu"):
        wb.append({"relations": "all", **study.within_between_test(score)})
        for rel in s.relations:
            sub = replace(study, facts=tuple(f for f in study.facts if f.relation == rel))
            if len(sub.facts) >= 2:
                wb.append({"relations": rel, **sub.within_between_test(score)})
    wb = pd.DataFrame(wb)[["score", "relations", "n", "within", "between", "same_template", "mean", "share_positive",
                           "p", "p_floor"]].rename(columns={"n": "facts", "mean": "within − between",
                                                            "share_positive": "share within > between"})
    bim = pd.DataFrame([study.bimodality(sc, seed=s.seed) for sc in ("jaccard", "niu")])[
        ["score", "n", "h_crit", "p", "n_boot"]]
    per_fact = frame[["fact", "relation", "n_prompts", "mean_neurons", "intersection_neurons", "jaccard", "niu",
                      "mean_p_clean", "max_completeness_error", "consistent_jaccard_otsu"]]
    return {"consistency": study.summary(), "inconsistent_share": share, "completeness": completeness,
            "within_between": wb, "bimodality": bim, "facts": per_fact}


def _generic(study: ConsistencyStudy, s: QueryLocalizationSettings) -> tuple[dict[str, NeuronSet], pd.DataFrame]:
    generic, rows = {}, []
    for rel in s.relations:
        facts = [f for f in study.facts if f.relation == rel]
        if not facts:
            continue
        share = max(s.generic_share, 1.0 / len(facts))
        generic[rel] = generic_neurons([NeuronSet.union(f.sets) for f in facts], max_share=share)
        sets = [x for f in facts for x in f.sets]
        rows.append({"relation": rel, "facts": len(facts), "generic if in more than": f"{share * len(facts):.1f} facts",
                     "generic neurons": len(generic[rel]),
                     "mean coarse neurons per prompt": float(np.mean([len(x) for x in sets])),
                     "mean left after removal": float(np.mean([len(x - generic[rel]) for x in sets]))})
    return generic, pd.DataFrame(rows)


def _mapping_tables(mapping: pd.DataFrame) -> dict[str, pd.DataFrame]:
    summaries, tests = [], []
    for group, sub in (("inconsistent", mapping[mapping.group == "inconsistent"]), ("all", mapping)):
        summaries.append(mapping_summary(sub[sub.n_neurons > 0]))
        summaries[-1].insert(0, "facts", group)
        if len(sub):
            tests.append(mapping_tests(sub))
            tests[-1].insert(0, "facts", group)
    return {"mapping": mapping, "mapping_summary": pd.concat(summaries, ignore_index=True),
            "mapping_tests": pd.concat(tests, ignore_index=True)}


def query_localization_study(model: Any, settings: QueryLocalizationSettings = QueryLocalizationSettings(), *,
                             data_dir: str | None = None, say: Callable[[str], None] = lambda _: None
                             ) -> QueryLocalizationStudy:
    """Run the whole study on ``model`` (see the module) and return every table."""
    s, t0, times = settings, time.time(), {}
    facts, counts = select_facts(model, s, data_dir, say)
    if len(facts) < 4:
        raise InsufficientDataError(f"only {len(facts)} known facts (4 needed): add relations or candidates")
    times["filter"] = time.time() - t0
    t = time.time()
    study = consistency_study(model, facts, steps=s.steps, grid="gauss-legendre", tolerance=None, threshold=s.threshold)
    tables = {"counts": counts, **_consistency_tables(study, s)}
    times["attribution"] = time.time() - t
    say("consistency done")

    t = time.time()
    generic, tables["generic"] = _generic(study, s)
    consistent = dict(zip(tables["facts"].fact, tables["facts"].consistent_jaccard_otsu))
    mapping = pd.concat([query_kn_mapping(model, f, list(fc.sets), exclude=generic[f.relation], n_random=s.n_random,
                                          seed=s.seed).to_frame() for f, fc in zip(facts, study.facts)],
                        ignore_index=True)
    mapping["group"] = mapping.fact.map(lambda n: "consistent" if consistent[n] else "inconsistent")
    tables.update(_mapping_tables(mapping))
    own = mapping[mapping.relation == "own"]
    numbers: dict[str, float] = {f"empty_own_{g}": float((own[own.group == g].n_neurons == 0).sum())
                                 for g in ("consistent", "inconsistent")}
    times["mapping"] = time.time() - t
    say("mapping done")

    t = time.time()
    sel = []
    for i, (fact, fc) in enumerate(zip(facts, study.facts)):
        n = len(fact.prompts)
        sets = equal_size_selections(fc.vectors[:n - 1], s.k, query=0)
        sets["random"] = random_control(sets["consistency-aware"], model.cfg.d_mlp, seed=s.seed + i)
        same_rel = [f for f in facts if f.relation == fact.relation and f.name != fact.name]
        others = [same_rel[(j + i) % len(same_rel)] for j in range(min(s.others, len(same_rel)))]
        sel.append(compare_selections(model, fact, sets, query=0, held_out=[n - 1], others=others).to_frame())
    sel = pd.concat(sel, ignore_index=True)
    tables["selection_summary"] = sel.groupby("set", sort=False)[
        ["n_neurons", "reliability", "generality", "held_out", "locality"]].mean().reset_index()
    tables["selection_tests"] = pd.DataFrame([paired_group_test(sel, "consistency-aware", b, v, by="set")
                                              for b in ("query", "mean", "random") for v in ("held_out", "locality")])
    query = tables["selection_summary"].set_index("set").loc["query"]
    numbers["selection_advantage"] = float(query["reliability"] - query["held_out"])
    times["selection"] = time.time() - t
    say("selection done")

    t = time.time()
    syn, skipped = [], 0
    for fact, fc in zip(facts, study.facts):
        kn = NeuronSet(list(fc.sets[0] - generic[fact.relation])[:s.k])
        if not len(kn):
            skipped += 1
            continue
        r = synapse_scaling(model, fact.prompts[0], fact.target, kn, alphas=(0.0, 2.0), k=1,
                            n_controls=s.n_controls, seed=s.seed).to_frame()
        syn.append(r.assign(fact=fact.name))
    syn = pd.concat(syn, ignore_index=True)
    tables["synapse_summary"] = syn.groupby(["alpha", "group"])[
        ["mass", "relative_p", "activation_abs_relative"]].mean().reset_index()
    tables["synapse_tests"] = pd.DataFrame([{"alpha": a, **paired_group_test(syn[syn.alpha == a], "synapse", "control",
                                                                             v, by="group")}
                                            for a in (0.0, 2.0) for v in ("relative_p", "activation_abs_relative")])
    mass = syn[syn.alpha == 0.0].groupby(["fact", "group"]).mass.mean().unstack("group")
    mass_test = paired_group_test(syn[syn.alpha == 0.0], "synapse", "control", "mass", by="group")
    numbers.update({"synapse_facts_skipped": float(skipped), "mass_ratio": float((mass.synapse / mass.control).median()),
                    "mass_synapse": mass_test["mean_a"], "mass_control": mass_test["mean_b"], "mass_p": mass_test["p"],
                    "facts": float(len(facts)), "prompts": float(sum(len(f.prompts) for f in facts))})
    times["synapses"] = time.time() - t
    times["total"] = time.time() - t0
    say("done")
    return QueryLocalizationStudy(s, {k: tables[k] for k in TABLES}, numbers,
                                  {"n_layers": int(model.cfg.n_layers), "d_mlp": int(model.cfg.d_mlp)},
                                  timings=times, versions=environment())
