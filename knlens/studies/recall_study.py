"""The recall study (Wang et al., EMNLP 2024): do a model's first-hop knowledge neurons fire while it answers a
two-hop question, and does enhancing or suppressing them change the answer?
(docs/methods.md, factual recall in reasoning)

1. **questions** — the chains of :mod:`knlens.data.two_hop` among ``relations``, ``candidates`` questions per chain
   (a random sample), then the known filter on each hop: the first hop answered on at least ``min_prompts`` of
   its prompts, and the second likewise; the counts at every step, and the two-hop accuracy of all candidates;
2. **per question** (chains interleaved, while ``budget_minutes`` lasts, at most ``max_questions``) — the
   instruments of :mod:`knlens.studies.recall_measure`: locate, matched random sets, recall scores, answers under
   enhance / suppress with and without the chain of thought, the conflict prompt.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.facts import Fact
from knlens.core.versions import environment
from knlens.data.two_hop import TwoHop, chains_in, two_hop_questions
from knlens.methods.known import answers_many
from knlens.results.study import StudyResult
from knlens.stats.intervals import bootstrap_ci
from knlens.studies.recall_measure import answer_rows, locate_first_hop, matched_sets, recall_rows

__all__ = ["RecallSettings", "RecallStudy", "recall_study", "filter_questions", "TABLES"]

TABLES = ("counts", "recall", "answers", "accuracy", "questions")


@dataclass(frozen=True)
class RecallSettings:
    """Sizes of the study (defaults: the run of ``benchmarks/RECALL.md``)."""

    model: str = "smollm2-135m"
    relations: tuple[str, ...] = ("P1376", "P36", "P1001", "P27", "P495", "P17", "P30")
    candidates: int = 60  # questions per chain read before the known filter
    max_prompts: int = 4  # ParaRel prompts per hop
    min_prompts: int = 1  # a hop is known when answered on at least this many of its prompts
    attribute_prompts: int = 2  # answered first-hop prompts attributed
    max_questions: int = 40
    steps: int = 8  # Gauss–Legendre nodes of integrated gradients
    n_random: int = 2  # matched random sets per question
    threshold: float = 0.5  # recalled: peak recall score >= threshold
    bridge_tokens: int = 6  # most tokens generated for the bridge in the chain of thought
    budget_minutes: float = 12.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.candidates, self.max_prompts, self.min_prompts, self.attribute_prompts, self.max_questions,
               self.steps, self.n_random, self.bridge_tokens) < 1:
            raise SettingsError("candidates, max_prompts, min_prompts, attribute_prompts, max_questions, steps, "
                                "n_random and bridge_tokens must be at least 1")
        if self.min_prompts > self.max_prompts:
            raise SettingsError(f"min_prompts={self.min_prompts} exceeds max_prompts={self.max_prompts}")
        if not self.budget_minutes > 0:
            raise SettingsError(f"budget_minutes must be positive, got {self.budget_minutes}")
        chains_in(self.relations)  # NoChainError naming the relations when they form no chain


@dataclass(frozen=True, eq=False)
class RecallStudy(StudyResult):
    """Every table of the study by name (:data:`TABLES`), single numbers, timings and versions."""

    study = "recall"
    frame_table = "accuracy"  # to_frame(): accuracy by chain of thought, action and neuron set
    settings: RecallSettings
    numbers: dict[str, float]

    def plot(self) -> Any:
        """Peak recall score of the knowledge set over the question, the CoT and the conflict prompt, beside the
        matched random sets'."""
        import matplotlib.pyplot as plt

        r = self.tables["recall"]
        cols = [c for c in r.columns if c.startswith("peak ")]
        fig, ax = plt.subplots(figsize=(6, 3))
        for j, kind in enumerate(["knowledge", "matched"]):
            part = r[r.neurons == kind]
            ax.bar(np.arange(len(cols)) + 0.4 * j, [part[c].mean() for c in cols], 0.4, label=kind,
                   color="#c33" if kind == "knowledge" else "0.6")
        ax.axhline(self.settings.threshold, color="0.3", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(cols)) + 0.2, [c[5:] for c in cols], fontsize=8)
        ax.set_ylabel("mean peak recall score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _hop_known(model: Any, hops: Sequence[Fact], min_prompts: int) -> dict[str, Fact]:
    """Per fact name, the fact with its answered prompts, for the facts answered on >= ``min_prompts`` prompts."""
    unique = list({h.name: h for h in hops}.values())
    out = {}
    for fact, ok in zip(unique, answers_many(model, unique)):
        if int(ok.sum()) >= min_prompts:
            out[fact.name or ""] = replace(fact, prompts=tuple(p for p, o in zip(fact.prompts, ok) if o))
    return out


def filter_questions(model: Any, questions: Sequence[TwoHop], counts: list[dict[str, Any]], min_prompts: int
                     ) -> tuple[list[tuple[TwoHop, Fact]], pd.DataFrame]:
    """The questions whose both hops are known, each hop cut to its answered prompts (so the chain of thought
    states each hop in a form the model answers), with its first hop, interleaved across chains; and the counts
    per chain with the two-hop accuracy of every candidate."""
    hop1 = _hop_known(model, [q.hop1 for q in questions], min_prompts)
    hop2 = _hop_known(model, [q.hop2 for q in questions], min_prompts)
    direct = answers_many(model, [Fact([q.question], q.answer) for q in questions])
    frame = pd.DataFrame([{"chain": "->".join(q.chain), "hop1": q.hop1.name in hop1, "hop2": q.hop2.name in hop2,
                           "two-hop correct": bool(d[0])} for q, d in zip(questions, direct)])
    frame["both"] = frame.hop1 & frame.hop2
    table = pd.DataFrame(counts).drop(columns="template")
    g = frame.groupby("chain", sort=False)
    table["first hop known"] = table.chain.map(g["hop1"].sum()).fillna(0).astype(int)
    table["second hop known"] = table.chain.map(g["hop2"].sum()).fillna(0).astype(int)
    table["both known"] = table.chain.map(g["both"].sum()).fillna(0).astype(int)
    table["two-hop correct (all sampled)"] = table.chain.map(g["two-hop correct"].sum()).fillna(0).astype(int)
    by_chain: dict[str, list[tuple[TwoHop, Fact]]] = {}
    for q in questions:
        if q.hop1.name in hop1 and q.hop2.name in hop2:
            one, two = hop1[q.hop1.name or ""], hop2[q.hop2.name or ""]
            by_chain.setdefault("->".join(q.chain), []).append((replace(q, hop1=one, hop2=two), one))
    kept = [x for row in itertools.zip_longest(*by_chain.values()) for x in row if x is not None]
    return kept, table


def _false_partner(q: TwoHop, pool: Sequence[TwoHop]) -> TwoHop | None:
    """Another question of the same chain whose bridge and answer both differ (the false first hop)."""
    return next((o for o in pool if o.chain == q.chain and o.bridge != q.bridge and o.answer != q.answer), None)


def _accuracy(answers: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Accuracy and mean P(o₂) per chain of thought, action and set; random draws pooled; the relative change of
    P(o₂) against no intervention, per question then averaged, with a bootstrap CI over questions."""
    a = answers[answers.action != "conflict"]
    none = a[a.action == "none"].set_index(["question", "cot"])["p"]
    rows = []
    for (cot, action, kind), part in a.groupby(["cot", "action", "neurons"], sort=False):
        per_q = part.groupby(["question", "cot"])["p"].mean()
        rel = (per_q - none.reindex(per_q.index)) / none.reindex(per_q.index)
        lo, hi = bootstrap_ci(rel.dropna().to_numpy(), seed=seed) if rel.notna().sum() >= 2 else (np.nan, np.nan)
        rows.append({"cot": bool(cot), "action": action, "neurons": kind, "questions": part.question.nunique(),
                     "accuracy": float(part.correct.mean()), "mean P(answer)": float(part.p.mean()),
                     "relative ΔP": float(rel.mean()), "ΔP CI low": lo, "ΔP CI high": hi,
                     "bridge correct": float(part["bridge correct"].mean()) if cot else np.nan})
    return pd.DataFrame(rows)


def recall_study(model: Any, settings: RecallSettings = RecallSettings(), *, data_dir: str | None = None,
                 questions: Sequence[TwoHop] | None = None,
                 say: Callable[[str], None] = lambda _: None) -> RecallStudy:
    """Run the study on ``model`` (see the module) and return every table. ``questions`` replaces the ParaRel
    questions (e.g. hand-written ones a tiny test model can read)."""
    s, t0 = settings, time.time()
    if questions is None:
        questions, counts = two_hop_questions(s.relations, data_dir, max_per_chain=s.candidates,
                                              max_prompts=s.max_prompts, seed=s.seed)
    else:
        counts = [{"chain": c, "template": "", "joined": n, "ambiguous": 0, "questions": n, "sampled": n}
                  for c, n in pd.Series(["->".join(q.chain) for q in questions]).value_counts(sort=False).items()]
    kept, count_table = filter_questions(model, questions, counts, s.min_prompts)
    timings = {"filter_s": time.time() - t0}
    say(f"{len(questions)} candidate questions, {len(kept)} with both hops known")
    recall, answers, rows, seconds = [], [], [], []
    for i, (q, hop) in enumerate(kept[:s.max_questions]):
        mean = float(np.mean(seconds)) if seconds else 0.0
        if time.time() - t0 + mean > 60 * s.budget_minutes:
            say(f"budget of {s.budget_minutes} min reached after {i} questions")
            break
        false = _false_partner(q, questions)
        if false is None:
            continue
        t = time.time()
        loc = locate_first_hop(model, replace(hop, prompts=hop.prompts[:s.attribute_prompts]), steps=s.steps)
        randoms = matched_sets(model, loc, s.n_random, s.seed + 1000 * i)
        ans, cot = answer_rows(model, q, loc, randoms, bridge_tokens=s.bridge_tokens, false=false)
        recall += recall_rows(model, q, loc, randoms, cot, false, s.threshold)
        answers += ans
        rows.append({"question": q.name, "chain": "->".join(q.chain), "two-hop question": q.question,
                     "bridge": q.bridge.strip(), "answer": q.answer.strip(), "neurons": len(loc.neurons),
                     "selection": loc.selection, "neuron list": " ".join(map(str, loc.neurons)), "cot prompt": cot})
        seconds.append(time.time() - t)
        say(f"question {i + 1}: {q.question!r} ({len(loc.neurons)} neurons, {seconds[-1]:.0f} s)")
    if not rows:
        raise InsufficientDataError("no two-hop question was studied: no candidate has both hops known (raise "
                                    "--candidates or lower --min-prompts), or the budget ran out first")
    count_table["studied"] = count_table.chain.map(pd.Series([r["chain"] for r in rows]).value_counts()).fillna(0)
    count_table["studied"] = count_table["studied"].astype(int)
    rec, ans = pd.DataFrame(recall), pd.DataFrame(answers)
    timings |= {"questions_s": float(sum(seconds)), "total_s": time.time() - t0}
    return RecallStudy(s, {"counts": count_table, "recall": rec, "answers": ans, "accuracy": _accuracy(ans, s.seed),
                           "questions": pd.DataFrame(rows)}, _numbers(rec, ans), timings=timings,
                       versions=environment())


def _numbers(rec: pd.DataFrame, ans: pd.DataFrame) -> dict[str, float]:
    kn, rnd = rec[rec.neurons == "knowledge"].set_index("question"), rec[rec.neurons == "matched"]
    plain = ans[(ans.action == "none")]
    direct = plain[~plain.cot.astype(bool)].set_index("question")
    cot = plain[plain.cot.astype(bool)].set_index("question")
    conflict = ans[ans.action == "conflict"].set_index("question")
    correct = direct.correct.astype(bool)
    return {"questions": float(len(kn)), "recall rate": float(kn.recalled.mean()),
            "recall rate, matched random sets": float(rnd.recalled.mean()),
            "specific recall rate": float(kn["recalled, specific"].mean()),
            "specific recall rate, matched random sets": float(rnd["recalled, specific"].mean()),
            "mean peak, other question": float(kn["peak other question"].mean()),
            "mean peak, question": float(kn["peak question"].mean()),
            "mean peak, CoT after the bridge": float(kn["peak cot after"].mean()),
            "mean peak, CoT emitting step": float(kn["peak cot emit"].mean()),
            "mean peak, conflict": float(kn["peak conflict"].mean()),
            "accuracy without CoT": float(correct.mean()), "accuracy with CoT": float(cot.correct.mean()),
            "bridge correct in CoT": float(cot["bridge correct"].mean()),
            "shortcut share": float((~kn.recalled.reindex(correct[correct].index).astype(bool)).mean())
            if correct.any() else float("nan"),
            "shortcut share, specific rule": float((~kn["recalled, specific"].reindex(correct[correct].index)
                                                    .astype(bool)).mean()) if correct.any() else float("nan"),
            "failed specific recall among errors": float((~kn["recalled, specific"].reindex(correct[~correct].index)
                                                          .astype(bool)).mean()) if (~correct).any() else float("nan"),
            "failed recall among errors": float((~kn.recalled.reindex(correct[~correct].index).astype(bool)).mean())
            if (~correct).any() else float("nan"),
            "conflict accuracy (true answer)": float(conflict.correct.astype(bool).mean()),
            "conflict: false answer given": float(conflict["false answered"].astype(bool).mean())}

