"""The two-stage filter against integrated gradients on ParaRel (docs/methods.md, Two-stage filter).

Facts read per relation, the known filter (greedy answer = object on at least ``min_prompts`` paraphrases; the
answered ones kept, at most ``max_prompts``), single-token objects (the filter's gradient is of one token), taken round
robin over the relations up to ``facts``. For each
fact: the two-stage filter (subject corrupted by ``corruption``; stage 1 Δ > ``tau_a`` × max, stage 2 g > ``tau_g``)
and IG (``steps`` nodes, fixed grid); their top-``k`` sets (the filter's ranked by g, IG's by the mean score over
the prompts); overlap; the suppression (×0) of each set on the fact's prompts beside ``n_random`` random sets matched
on activation magnitude, as relative change of P(object) and per neuron; the cost of each (seconds, passes).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from knlens.core.errors import EmptyStageError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.versions import environment
from knlens.data.pararel import load_pararel
from knlens.methods.attribution.ig import attribute
from knlens.methods.interventions import measure
from knlens.methods.known import known_facts
from knlens.methods.structure.qrnca import top_neurons
from knlens.methods.structure.two_stage import TwoStageSettings, two_stage
from knlens.results.study import StudyResult
from knlens.studies.editing_cases import is_single_token

__all__ = ["TwoStageStudySettings", "TwoStageStudy", "two_stage_study"]


@dataclass(frozen=True)
class TwoStageStudySettings:
    """Sizes of the study (defaults: the run of ``benchmarks/TWO_STAGE.md``)."""

    model: str = "smollm2-135m"
    relations: tuple[str, ...] = ("P36", "P1376")
    candidates: int = 40
    facts: int = 8
    min_prompts: int = 2
    max_prompts: int = 3
    corruption: str = "noise"
    noise_samples: int = 3
    tau_a: float = 0.2
    tau_g: float = 0.0
    k: int = 20
    steps: int = 8
    n_random: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.facts, self.k, self.steps, self.n_random, self.max_prompts) < 1:
            raise SettingsError("facts, k, steps, n_random and max_prompts must be at least 1")
        TwoStageSettings(corruption=self.corruption, tau_a=self.tau_a, tau_g=self.tau_g)  # checks them


@dataclass(frozen=True, eq=False)
class TwoStageStudy(StudyResult):
    """Every table of the study by name, single numbers, timings and versions."""

    study = "two_stage_study"
    frame_table = "comparison"  # to_frame(): the comparison of the two methods (means over facts)
    settings: TwoStageStudySettings
    numbers: dict[str, float]

    def plot(self) -> Any:
        """Relative change of P(object) when each fact's top-k set is suppressed, per method."""
        import matplotlib.pyplot as plt

        f = self.tables["facts"]
        fig, ax = plt.subplots(figsize=(5, 3))
        cols = ["two-stage suppress", "IG suppress", "matched random suppress (two-stage)"]
        ax.boxplot([f[c].dropna() * 100 for c in cols], tick_labels=["two-stage", "IG", "matched random"])
        ax.set_ylabel("relative ΔP(object) suppressed (%)")
        fig.tight_layout()
        return fig


def _suppress(model: Any, fact: Fact, sets: list[NeuronSet], n_random: int, seed: int) -> list[tuple[float, float]]:
    """(relative change of the set, mean relative change of its matched random sets) per set, suppressed."""
    copies = [Fact(fact.prompts, fact.target, relation=fact.relation, name=str(i)) for i in range(len(sets))]
    f = measure(model, copies, sets, actions={"suppress": 0.0}, n_random=n_random, controls=("matched",),
                seed=seed).frame
    return [(float(f[(f.fact == str(i)) & (f.neurons == "knowledge")].relative.mean()),
             float(f[(f.fact == str(i)) & (f.neurons == "random")].relative.mean())) for i in range(len(sets))]


def two_stage_study(model: Any, settings: TwoStageStudySettings = TwoStageStudySettings(), *,
                    data_dir: str | None = None, facts: Sequence[Fact] | None = None,
                    say: Callable[[str], None] = lambda _: None) -> TwoStageStudy:
    """Run the study on ``model`` (see the module) and return every table. ``facts`` (with ``relation`` and
    ``subject`` set) replace the ParaRel facts and their known filter (e.g. hand-written facts a tiny test model can
    read); the single-token filter still applies."""
    s, t0, times = settings, time.time(), {}
    counts, pools = [], []
    for rel in s.relations:
        if facts is None:
            read = load_pararel(rel, data_dir=data_dir, max_facts=s.candidates, seed=s.seed)
            known = known_facts(model, read, keep_prompts="correct", min_prompts=s.min_prompts)
        else:
            read = known = [f for f in facts if f.relation == rel]
        single = [Fact(f.prompts[:s.max_prompts], f.target, f.subject, f.relation, f.name) for f in known
                  if is_single_token(model, f.target)]
        pools.append(single)
        counts.append({"relation": rel, "read": len(read), "known": len(known), "single-token object": len(single)})
    facts = [f for row in itertools.zip_longest(*pools) for f in row if f is not None][:s.facts]  # round robin
    for c in counts:
        c["studied"] = sum(f.relation == c["relation"] for f in facts)
    times["filter"] = time.time() - t0
    ts = TwoStageSettings(corruption=s.corruption, noise_samples=s.noise_samples, tau_a=s.tau_a, tau_g=s.tau_g,
                          seed=s.seed)
    rows = []
    for i, fact in enumerate(facts):
        row: dict[str, Any] = {"fact": fact.name, "prompt": fact.prompts[0], "target": fact.target,
                               "prompts": len(fact.prompts)}
        try:
            r = two_stage(model, fact, ts)
        except EmptyStageError as err:
            rows.append({**row, "error": str(err)})
            continue
        t = time.perf_counter()
        attrs = attribute(model, fact, steps=s.steps, tolerance=None)
        ig_seconds = time.perf_counter() - t
        scores = torch.stack([a.scores for a in attrs]).mean(0)
        ig_top = top_neurons(scores, s.k, None, attrs[0].layers)
        ts_top = NeuronSet(list(r.neurons)[:s.k])
        (ts_eff, ts_rnd), (ig_eff, ig_rnd) = _suppress(model, fact, [ts_top, ig_top], s.n_random, s.seed + i)
        row |= {"stage 1": len(r.stage1), "stage 2": len(r.neurons), "k": len(ts_top),
                "shared": len(ts_top & ig_top), "jaccard": ts_top.jaccard(ig_top),
                "stage-1 ∩ IG top-k": len(r.stage1 & ig_top),
                "two-stage suppress": ts_eff, "IG suppress": ig_eff,
                "matched random suppress (two-stage)": ts_rnd, "matched random suppress (IG)": ig_rnd,
                "two-stage per neuron": ts_eff / max(1, len(ts_top)), "IG per neuron": ig_eff / max(1, len(ig_top)),
                "two-stage s": r.cost["seconds"], "IG s": ig_seconds,
                "two-stage passes": f"{int(r.cost['forward'])} fwd + {int(r.cost['backward'])} bwd",
                "IG cells": len(fact.prompts) * model.cfg.n_layers * s.steps,
                "completeness error": float(torch.tensor([a.relative_completeness_error for a in attrs]).median()),
                "error": ""}
        rows.append(row)
        say(f"fact {i + 1}/{len(facts)} {fact.name}: stage 1 {len(r.stage1)}, stage 2 {len(r.neurons)}, shared "
            f"{row['shared']}/{len(ts_top)}; suppress two-stage {ts_eff:+.2f}, IG {ig_eff:+.2f}")
    frame = pd.DataFrame(rows)
    ok = frame[frame["error"] == ""] if "error" in frame else frame
    cols = ["stage 1", "stage 2", "shared", "jaccard", "two-stage suppress", "IG suppress",
            "matched random suppress (two-stage)", "matched random suppress (IG)", "two-stage per neuron",
            "IG per neuron", "two-stage s", "IG s"]
    comparison = pd.DataFrame([{"quantity": c, "mean": float(ok[c].mean()), "median": float(ok[c].median()),
                                "facts": int(ok[c].notna().sum())} for c in cols if c in ok])
    times["total"] = time.time() - t0
    numbers = {"facts": float(len(facts)), "compared": float(len(ok)), "empty": float(len(frame) - len(ok))}
    return TwoStageStudy(s, {"counts": pd.DataFrame(counts), "facts": frame, "comparison": comparison}, numbers,
                         timings=times, versions=environment())
