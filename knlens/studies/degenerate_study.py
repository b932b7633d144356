"""The degenerate-knowledge-neuron study (Chen et al., 2024; docs/methods.md, degenerate knowledge neurons) on
ParaRel: for facts the model knows, the located neurons clustered by weight topology, the clusters that pass the
functional filter, the robustness of the fact to one-word typos with and without them, and fact checking with a
relation's frequent DKNs.

Facts: ``candidates`` per relation (``load_pararel``, seed ``seed``), kept when the model answers at least
``min_prompts`` of their paraphrases (only those prompts kept, at most ``max_prompts``), taken round robin over the
relations. Phase 1 (until ``locate_share`` of the budget left after the filter has passed, at most ``max_facts`` facts): integrated
gradients, the persistence clusters and every baseline's clusters through the same functional filter. Phase 2:
robustness of each studied fact (its DKN set; where it has none, all its clustered neurons, labelled so). Phase 3
(the time left): fact checking per relation with the DKN sets and, beside them, the clustered-neuron sets.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from knlens.core.errors import InsufficientDataError, SettingsError, TooFewNeuronsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.versions import environment
from knlens.data.pararel import load_pararel
from knlens.methods.attribution import attribute
from knlens.methods.known import known_facts
from knlens.methods.structure.degenerate_components import METHODS, degenerate_components
from knlens.methods.structure.fact_check import fact_check
from knlens.methods.structure.robustness import robustness
from knlens.methods.structure.topology import MODES
from knlens.results.study import StudyResult

__all__ = ["DegenerateStudySettings", "DegenerateStudy", "degenerate_study"]


@dataclass(frozen=True)
class DegenerateStudySettings:
    """Sizes and thresholds of the study (defaults: the run of ``benchmarks/DEGENERATE.md``)."""

    model: str = "smollm2-135m"
    relations: tuple[str, ...] = ("P36", "P1376")
    candidates: int = 60
    min_prompts: int = 2
    max_prompts: int = 3
    max_facts: int = 12
    budget_minutes: float = 14.0
    locate_share: float = 0.6
    top: int = 20
    steps: int = 6
    mode: str = "sensitivity"
    single_max: float = 0.05
    removes_min: float = 0.5
    n_random: int = 5
    check_steps: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_prompts < 1 or self.max_prompts < self.min_prompts or self.max_facts < 1:
            raise SettingsError("min_prompts >= 1, max_prompts >= min_prompts and max_facts >= 1 are needed")
        if self.mode not in MODES:
            raise SettingsError(f"unknown mode {self.mode!r}; choose from {list(MODES)}")
        if not 0 < self.locate_share <= 1 or self.budget_minutes <= 0:
            raise SettingsError(f"locate_share must be in (0, 1] and budget_minutes positive, got {self.locate_share}, "
                                f"{self.budget_minutes}")


@dataclass(frozen=True, eq=False)
class DegenerateStudy(StudyResult):
    """Tables by name (``counts``, ``facts``, ``components``, ``methods``, ``robustness``, ``fact_check``,
    ``fact_check_pairs``), notes, timings (seconds) and versions."""

    study = "degenerate"
    frame_table = "methods"  # to_frame(): per clustering method: facts, clusters and how many pass the functional filter
    settings: DegenerateStudySettings
    notes: tuple[str, ...] = ()

    def plot(self) -> Any:
        """Share of facts with degenerate components per clustering method."""
        import matplotlib.pyplot as plt

        m = self.tables["methods"]
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.bar(m["method"], m["share_facts_with_dkn"])
        ax.set_ylabel("share of facts with DKNs")
        fig.tight_layout()
        return fig


def _facts(s: DegenerateStudySettings, data_dir: str | None, model: Any) -> tuple[list[Fact], pd.DataFrame]:
    per, counts = [], []
    for rel in s.relations:
        read = load_pararel(rel, data_dir, max_facts=s.candidates, seed=s.seed)
        known = known_facts(model, read, keep_prompts="correct", min_prompts=s.min_prompts)
        per.append([replace(f, prompts=f.prompts[:s.max_prompts]) for f in known])
        counts.append({"relation": rel, "read": len(read), "known": len(known)})
    ordered = [f for group in itertools.zip_longest(*per) for f in group if f is not None]
    return ordered, pd.DataFrame(counts)


def _methods(facts: pd.DataFrame, comps: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method in METHODS:
        f, c = facts[facts.method == method], comps[comps.method == method]
        rows.append({"method": method, "facts": len(f), "clustered": int(f["clustered"].sum()),
                     "clusters": len(c), "mean_size": float(c["size"].mean()) if len(c) else float("nan"),
                     "removed_by_all": int((f["drop_all"] >= f["removes_min"]).sum()),
                     "single_below": int((c["drop_alone"] < c["single_max"]).sum()) if len(c) else 0,
                     "degenerate_clusters": int(c["degenerate"].sum()) if len(c) else 0,
                     "facts_with_dkn": int(f["has_dkn"].sum()),
                     "share_facts_with_dkn": float(f["has_dkn"].mean()) if len(f) else float("nan")})
    return pd.DataFrame(rows)


def degenerate_study(model: Any, settings: DegenerateStudySettings = DegenerateStudySettings(), *,
                     data_dir: str | None = None, facts: Sequence[Fact] | None = None,
                     say: Callable[[str], None] = lambda _: None) -> DegenerateStudy:
    """Run the study (see the module) and return its tables. ``facts`` (with ``relation`` set) replace the ParaRel
    facts and their known filter (e.g. hand-written facts a tiny test model can read)."""
    s, t0, times, notes = settings, time.time(), {}, []
    if facts is None:
        facts, counts = _facts(s, data_dir, model)
    else:
        facts = list(facts)
        counts = pd.DataFrame({"relation": list(s.relations), "read": [sum(f.relation == r for f in facts)
                                                                       for r in s.relations]}).assign(known=lambda c: c.read)
    times["filter"] = time.time() - t0
    say(f"{len(facts)} known facts: " + ", ".join(f"{r.relation} {r.known}/{r.read}" for r in counts.itertuples()))
    fact_rows, comp_rows, studied, dkn = [], [], [], {}
    phase1_end = times["filter"] + s.locate_share * (60 * s.budget_minutes - times["filter"])
    for fact in facts[:s.max_facts]:
        if time.time() - t0 > phase1_end:
            notes.append(f"phase 1 stopped after {len(studied)} facts: {s.locate_share:.0%} of the budget left after "
                         f"the filter spent")
            break
        attrs = attribute(model, fact, steps=s.steps, grid="gauss-legendre", tolerance=None)
        for method in METHODS:
            base = {"method": method, "fact": fact.name, "relation": fact.relation, "removes_min": s.removes_min}
            try:
                r = degenerate_components(model, fact, top=s.top, mode=s.mode, method=method, single_max=s.single_max,
                                          removes_min=s.removes_min, steps=s.steps, attributions=attrs)  # type: ignore[arg-type]
            except TooFewNeuronsError as err:
                fact_rows.append({**base, "clustered": False, "n_clusters": 0, "drop_all": 0.0, "has_dkn": False,
                                  "p_clean": float("nan"), "dkn_size": 0, "note": str(err)})
                continue
            fact_rows.append({**base, "clustered": True, "n_clusters": len(r.frame), "drop_all": r.drop_all,
                              "has_dkn": bool(r.frame["degenerate"].any()), "p_clean": r.p_clean,
                              "dkn_size": len(r.dkn), "note": ""})
            comp_rows += [{**base, "single_max": s.single_max, **row} for row in r.frame.to_dict("records")]
            if method == "persistence":
                dkn[fact.name] = (r.dkn, NeuronSet(nr for c in r.components for nr in c))
        studied.append(fact)
        say(f"{fact.name}: " + "; ".join(f"{x['method']} {x['n_clusters']} clusters, drop_all {x['drop_all']:.0%}, "
                                         f"DKN {x['has_dkn']}" for x in fact_rows[-len(METHODS):]))
    times["locate"] = time.time() - t0 - times["filter"]
    fact_frame, comp_frame = pd.DataFrame(fact_rows), pd.DataFrame(comp_rows)
    rob = []
    for fact in studied:
        if time.time() - t0 > 60 * s.budget_minutes * 0.8:
            notes.append("robustness stopped early: 80 % of the budget spent")
            break
        sets = dkn.get(fact.name, (NeuronSet(), NeuronSet()))
        which, neurons = ("dkn", sets[0]) if len(sets[0]) else ("clustered (no DKN)", sets[1])
        rob.append(robustness(model, fact, neurons, n_random=s.n_random, seed=s.seed).assign(neuron_set=which))
    times["robustness"] = time.time() - t0 - sum(times.values())
    checks, pairs = [], []
    for rel, kind in itertools.product(s.relations, ("dkn", "clustered")):
        mine = [f for f in studied if f.relation == rel and f.name in dkn]
        if time.time() - t0 > 60 * s.budget_minutes:
            notes.append(f"fact checking of {rel} ({kind}) not run: budget spent")
            continue
        try:
            p, m = fact_check(model, mine, [dkn[f.name][0 if kind == "dkn" else 1] for f in mine],
                              steps=s.check_steps, seed=s.seed)
        except InsufficientDataError as err:
            notes.append(f"fact checking of {rel} with {kind} sets: {err}")
            continue
        checks.append(m.assign(relation=rel, neuron_set=kind))
        pairs.append(p.assign(relation=rel, neuron_set=kind))
    times["fact_check"] = time.time() - t0 - sum(times.values())
    times["total"] = time.time() - t0
    tables = {"counts": counts.assign(studied=[sum(f.relation == r for f in studied) for r in counts.relation]),
              "facts": fact_frame, "components": comp_frame,
              "methods": _methods(fact_frame, comp_frame) if len(fact_frame) else pd.DataFrame(),
              "robustness": pd.concat(rob, ignore_index=True) if rob else pd.DataFrame(),
              "fact_check": pd.concat(checks, ignore_index=True) if checks else pd.DataFrame(),
              "fact_check_pairs": pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame()}
    return DegenerateStudy(s, tables, tuple(notes), timings=times, versions=environment())
