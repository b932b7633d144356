"""Entity versus relation (Wei et al., CIKM 2024; Meng et al., 2022; docs/methods.md, the entity-relation study):
causal tracing of ParaRel facts with the corruption on the subject and, separately, on the relation tokens,
averaged by token group with bootstrap intervals over facts; and the residual restored at one token with the MLP
or the attention path severed (:mod:`knlens.methods.tracing.severed`) to separate their roles.

For each relation, ``candidates`` facts are read (their first object-last template), the facts whose greedy
answer on that prompt is the object are kept (:func:`~knlens.methods.known.known_facts`), and facts are taken
round robin over the relations until ``max_facts`` or the budget. Each fact is traced twice (subject, relation
corruption by :func:`~knlens.studies.query_localization.entity_vs_relation`; ``samples`` noise draws, Meng et
al.'s windows) and severed at the last corrupted token and (or) at the last token under each corruption
(``sever_at``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.facts import Fact
from knlens.core.versions import environment
from knlens.data.pararel import load_pararel
from knlens.methods.known import known_facts
from knlens.methods.tracing.severed import severed_trace
from knlens.methods.tracing.setup import KINDS
from knlens.results.study import StudyResult
from knlens.stats.intervals import bootstrap_ci
from knlens.stats.tests import paired_permutation_test
from knlens.studies.query_localization import entity_vs_relation

__all__ = ["EntityRelationStudySettings", "EntityRelationStudy", "entity_relation_study", "trace_fact", "summarise",
           "CORRUPTIONS", "TABLES"]

CORRUPTIONS = ("subject", "relation")
SEVER_TOKENS = {"last corrupted": None, "last": -1}  # where to sever: the last corrupted token, the last token
TABLES = ("counts", "total", "groups", "peaks", "attn_vs_mlp", "severed", "severed_summary")


@dataclass(frozen=True)
class EntityRelationStudySettings:
    """Sizes of the study (defaults: the run of ``benchmarks/ENTITY_RELATION.md``)."""

    model: str = "smollm2-135m"
    relations: tuple[str, ...] = ("P36", "P1376", "P30", "P140", "P407", "P1412")
    candidates: int = 40  # facts read per relation before the known filter
    max_facts: int = 40  # facts traced at most
    samples: int = 2  # noise draws per trace (Meng et al.: 10; 2 keep the run within its budget on 2 shared cores)
    sever_at: tuple[str, ...] = ("last corrupted",)  # tokens where the paths are severed (also: "last")
    budget_minutes: float = 14.0  # stop starting new facts when the next would overrun this
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.relations:
            raise SettingsError("give at least one ParaRel relation")
        if min(self.candidates, self.max_facts, self.samples) < 1 or self.budget_minutes <= 0:
            raise SettingsError("candidates, max_facts and samples must be at least 1, budget_minutes positive")
        bad = sorted(set(self.sever_at) - set(SEVER_TOKENS))
        if bad or not self.sever_at:
            raise SettingsError(f"sever_at takes some of {list(SEVER_TOKENS)}, got {list(self.sever_at)}")


@dataclass(frozen=True, eq=False)
class EntityRelationStudy(StudyResult):
    """Every table of the study by name (:data:`TABLES`), timings and versions."""

    study = "entity_relation"
    frame_table = "peaks"  # to_frame(): peak effect per (corruption, kind, token group): mean over facts with its interval
    settings: EntityRelationStudySettings

    def plot(self) -> Any:
        """Mean indirect effect by layer at the last subject token and the last token, per corruption and kind."""
        import matplotlib.pyplot as plt

        g = self.tables["groups"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3), squeeze=False)
        for ax, corrupt in zip(axes[0], CORRUPTIONS):
            for (kind, group), part in g[(g.corruption == corrupt) & g.group.isin(["last subject", "last"])].groupby(
                    ["kind", "group"]):
                ax.plot(part.layer, part.effect, label=f"{kind} @ {group}")
                ax.fill_between(part.layer, part.ci_low, part.ci_high, alpha=0.15)
            ax.set_title(f"{corrupt} corrupted", fontsize=10)
            ax.set_xlabel("layer")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("P_restored − P_corrupted")
        fig.tight_layout()
        return fig


def trace_fact(model: Any, fact: Fact, *, samples: int = 3, known_only: bool = True,
               sever_at: tuple[str, ...] = tuple(SEVER_TOKENS)) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One fact's rows: group effects (``corruption, kind, group, layer, effect``), severed effects
    (``corruption, token, sever, layer, effect``) and total effects (``corruption, p_clean, p_corrupted``)."""
    groups, severed, totals = [], [], []
    both = entity_vs_relation(model, fact, kinds=KINDS, samples=samples, known_only=known_only)
    for corrupt, t in zip(CORRUPTIONS, (both.subject, both.relation)):
        f = t.to_frame().groupby(["kind", "group", "layer"], as_index=False)["indirect_effect"].mean()
        groups.append(f.rename(columns={"indirect_effect": "effect"}).assign(corruption=corrupt))
        totals.append({"corruption": corrupt, "p_clean": t.p_clean, "p_corrupted": t.p_corrupted})
        for where in sever_at:
            token = SEVER_TOKENS[where]
            s = severed_trace(model, fact, corrupt=corrupt, token=token, samples=samples, known_only=known_only)
            severed.append(s.to_frame().assign(corruption=corrupt, token=where))
    name = fact.name or fact.prompts[0]
    return (pd.concat(groups).assign(fact=name), pd.concat(severed).assign(fact=name),
            pd.DataFrame(totals).assign(fact=name))


def _ci_table(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    rows = []
    for key, part in frame.groupby(by, sort=False):
        low, high = bootstrap_ci(part[value].to_numpy())
        rows.append({**dict(zip(by, key)), value: float(part[value].mean()), "ci_low": low, "ci_high": high,
                     "n": len(part)})
    return pd.DataFrame(rows)


def summarise(groups: pd.DataFrame, severed: pd.DataFrame, totals: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The study's tables from the per-fact rows of :func:`trace_fact` (means with 95 % bootstrap intervals over
    facts; paired sign-flip permutation tests of attention against MLP)."""
    if groups.empty:
        raise InsufficientDataError("no fact was traced: nothing to summarise")
    out = {"total": _ci_table(totals.assign(effect=totals.p_clean - totals.p_corrupted), ["corruption"], "effect"),
           "groups": _ci_table(groups, ["corruption", "kind", "group", "layer"], "effect")}
    peak = groups.groupby(["corruption", "kind", "group", "fact"], as_index=False)["effect"].max()
    peaks = _ci_table(peak, ["corruption", "kind", "group"], "effect").rename(columns={"effect": "peak"})
    best = out["groups"].loc[out["groups"].groupby(["corruption", "kind", "group"])["effect"].idxmax()]
    out["peaks"] = peaks.merge(best[["corruption", "kind", "group", "layer"]].rename(columns={"layer": "at layer"}))
    rows = []
    wide = peak.pivot_table(index=["corruption", "group", "fact"], columns="kind", values="effect").reset_index()
    for (corrupt, group), part in wide.groupby(["corruption", "group"]):
        d = (part["attn"] - part["mlp"]).to_numpy()
        test = paired_permutation_test(d)
        low, high = bootstrap_ci(d)
        rows.append({"corruption": corrupt, "group": group, "attn peak": float(part["attn"].mean()),
                     "mlp peak": float(part["mlp"].mean()), "attn - mlp": test["mean"], "ci_low": low,
                     "ci_high": high, "p": test["p"], "n": test["n"]})
    out["attn_vs_mlp"] = pd.DataFrame(rows)
    out["severed"] = _ci_table(severed, ["corruption", "token", "sever", "layer"], "effect")
    per_fact = severed.groupby(["corruption", "token", "sever", "fact"], as_index=False)["effect"].mean()
    wide = per_fact.pivot_table(index=["corruption", "token", "fact"], columns="sever", values="effect").reset_index()
    rows = []
    for (corrupt, token), part in wide.groupby(["corruption", "token"]):
        row = {"corruption": corrupt, "token": token, "mean effect": float(part["none"].mean())}
        for sever in ("mlp", "attn"):
            drop = (part["none"] - part[sever]).to_numpy()
            low, high = bootstrap_ci(drop)
            row |= {f"{sever} severed": float(part[sever].mean()), f"drop {sever}": float(drop.mean()),
                    f"drop {sever} ci": f"[{low:.3g}, {high:.3g}]"}
        rows.append(row | {"n": len(part)})
    out["severed_summary"] = pd.DataFrame(rows)
    return out


def _candidates(settings: EntityRelationStudySettings, data_dir: Any) -> tuple[list[list[Fact]], list[dict[str, Any]]]:
    per_relation, counts = [], []
    for rel in settings.relations:
        facts = load_pararel(rel, data_dir, max_facts=settings.candidates, seed=settings.seed, min_paraphrases=1)
        first = [Fact([f.prompts[0]], f.target, subject=f.subject, relation=f.relation, name=f.name) for f in facts
                 if f.subject and f.subject in f.prompts[0]]
        per_relation.append(first)
        counts.append({"relation": rel, "read": len(facts), "subject in prompt": len(first)})
    return per_relation, counts


def entity_relation_study(model: Any, settings: EntityRelationStudySettings = EntityRelationStudySettings(), *,
                          data_dir: Any = None, say: Callable[[str], None] = lambda m: None) -> EntityRelationStudy:
    """Run the study (see the module) and return its tables."""
    t0 = time.time()
    per_relation, counts = _candidates(settings, data_dir)
    known = []
    for facts, c in zip(per_relation, counts):
        k = known_facts(model, facts)
        c["known"] = len(k)
        known.append(k)
    say("known facts: " + ", ".join(f"{c['relation']} {c['known']}/{c['read']}" for c in counts))
    t_filter = time.time() - t0
    order = [f for round_ in zip(*[k + [None] * (max(map(len, known)) - len(k)) for k in known]) for f in round_ if f]
    groups, severed, totals, spent = [], [], [], []
    traced: dict[str, int] = {}
    for fact in order[:settings.max_facts]:
        elapsed = time.time() - t0
        if spent and elapsed + float(np.mean(spent)) > settings.budget_minutes * 60:
            say(f"budget: stopping after {len(spent)} facts")
            break
        t1 = time.time()
        g, s, tot = trace_fact(model, fact, samples=settings.samples, sever_at=settings.sever_at)
        groups.append(g)
        severed.append(s)
        totals.append(tot)
        spent.append(time.time() - t1)
        traced[fact.relation or "?"] = traced.get(fact.relation or "?", 0) + 1
        say(f"traced {fact.name} ({spent[-1]:.0f}s)")
    for c in counts:
        c["traced"] = traced.get(c["relation"], 0)
    if not groups:
        raise InsufficientDataError("no fact was traced: none of the read facts is known on its first template "
                                    f"({', '.join(settings.relations)}); read more with candidates or other relations")
    tables = summarise(pd.concat(groups), pd.concat(severed), pd.concat(totals))
    tables["counts"] = pd.DataFrame(counts)
    timings = {"known filter": t_filter, "tracing": float(np.sum(spent)), "total": time.time() - t0}
    return EntityRelationStudy(settings, tables, timings=timings, versions=environment())

