"""The result of an editing evaluation: raw per-prompt quantities, reduced afterwards to each field's convention
(docs/methods.md, editing evaluation).

``frame`` has one row per (fact, editor, group, prompt), ``group`` one of ``reliability`` (the edit prompt),
``generality`` (its paraphrases), ``locality`` (the neighbours' prompts), or a probe's group (the editing
criteria of :mod:`knlens.methods.editing.criteria`: ``symmetry``, ``symmetry_old``, ``synonym``, ``relation``,
``relation_old``). For the prompt's true object (``target_true``: the fact's target, the neighbour's, or the
probe's) and for the new object (``target_new``; none for ``symmetry_old``, whose columns are NaN) it holds,
before and after the edit, the mean per-token NLL (teacher forced), the share of target tokens that are the
argmax (EasyEdit's accuracy) and the argmax ids themselves (space-separated); ``agreement`` is the share of
the argmax tokens along the true object that the edit left unchanged (EasyEdit's locality).
``fluency`` has the perplexity of a text sample before and after each edit; ``edits`` the size of each edit.

:meth:`EditEvaluation.metrics` gives one row per editor × metric with a bootstrap interval over facts:

========================= ====================================================================================
reliability               EasyEdit accuracy of the new object on the edit prompt
reliability_es            CounterFact efficacy: NLL(new) < NLL(true) on the edit prompt (0/1)
generality                EasyEdit accuracy of the new object on the paraphrases (mean)
generality_ps             CounterFact paraphrase score: share of paraphrases with NLL(new) < NLL(true)
locality                  EasyEdit locality: share of neighbours' argmax tokens unchanged by the edit
locality_gold             accuracy of the neighbours' gold objects after the edit
locality_ns               CounterFact neighbourhood score: share of neighbour prompts with NLL(true) < NLL(new)
perplexity_change         perplexity after / before − 1 on the text sample
symmetry                  EasyEdit accuracy of the edited subject on the reverse prompts of the new object
symmetry_pn               share of those prompts where P(edited subject) > P(the new object's own subject)
symmetry_old              EasyEdit accuracy of the edited subject on the reverse prompts of the old object
synonym                   EasyEdit accuracy of the new object's synonym on the synonymous prompts
synonym_pn                share of those prompts where P(new synonym) > P(old synonym)
synonym_old               EasyEdit accuracy of the old object's synonym on the synonymous prompts (1 before, if known)
relation                  share of relation questions on (subject, new object) with NLL(relation) < NLL(None)
relation_old              the same on (subject, old object)
relation_margin           log P(relation) − log P(None) on (subject, new object) (per token; the same check, graded)
========================= ====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError
from knlens.core.facts import Fact
from knlens.results.contract import TableResult
from knlens.stats.intervals import bootstrap_ci
from knlens.stats.tests import paired_group_test

__all__ = ["EditEvaluation", "EditEvaluationSettings", "METRICS", "GROUPS"]

GROUPS = ("reliability", "generality", "locality", "symmetry", "symmetry_old", "synonym", "relation", "relation_old")
# metric -> (group, value column after, value column before, convention)
METRICS: dict[str, tuple[str, str, str, str]] = {
    "reliability": ("reliability", "acc_new_after", "acc_new_before", "EasyEdit"),
    "reliability_es": ("reliability", "es_after", "es_before", "CounterFact ES"),
    "generality": ("generality", "acc_new_after", "acc_new_before", "EasyEdit"),
    "generality_ps": ("generality", "es_after", "es_before", "CounterFact PS"),
    "locality": ("locality", "agreement", "agreement_before", "EasyEdit"),
    "locality_gold": ("locality", "acc_true_after", "acc_true_before", "gold accuracy"),
    "locality_ns": ("locality", "ns_after", "ns_before", "CounterFact NS"),
    "symmetry": ("symmetry", "acc_new_after", "acc_new_before", "EasyEdit"),
    "symmetry_pn": ("symmetry", "es_after", "es_before", "P_new > P_true"),
    "symmetry_old": ("symmetry_old", "acc_true_after", "acc_true_before", "EasyEdit"),
    "synonym": ("synonym", "acc_new_after", "acc_new_before", "EasyEdit"),
    "synonym_pn": ("synonym", "es_after", "es_before", "P_new > P_true"),
    "synonym_old": ("synonym", "acc_true_after", "acc_true_before", "EasyEdit (old synonym)"),
    "relation": ("relation", "es_after", "es_before", "NLL(relation) < NLL(None)"),
    "relation_old": ("relation_old", "ns_after", "ns_before", "NLL(relation) < NLL(None)"),
    "relation_margin": ("relation", "margin_after", "margin_before", "log P(relation) - log P(None)"),
}


@dataclass(frozen=True)
class EditEvaluationSettings:
    """How edits were evaluated: the model (name and weights' fingerprint), the editors in order, the text
    sample of the perplexity (``text``, ``n_text`` sentences), the bootstrap (``level``, ``n_boot``, ``seed``)."""

    model: str = ""
    fingerprint: str = ""
    editors: tuple[str, ...] = ()
    text: str = ""
    n_text: int = 0
    level: float = 0.95
    n_boot: int = 2000
    seed: int = 0
    knlens_version: str = ""


@dataclass(frozen=True, eq=False)
class EditEvaluation(TableResult):
    """Edits judged on reliability, generality, locality and perplexity (see the module docstring)."""

    study = "edit-evaluation"

    frame: pd.DataFrame
    fluency: pd.DataFrame
    edits: pd.DataFrame
    facts: tuple[Fact, ...] = ()
    settings: EditEvaluationSettings = EditEvaluationSettings()

    def _derived(self) -> pd.DataFrame:
        f = self.frame

        def below(a: pd.Series, b: pd.Series) -> pd.Series:  # NaN where a row has no new object
            return (a < b).astype(float).where(a.notna() & b.notna())

        return f.assign(es_after=below(f.nll_new_after, f.nll_true_after),
                        es_before=below(f.nll_new_before, f.nll_true_before),
                        ns_after=below(f.nll_true_after, f.nll_new_after),
                        ns_before=below(f.nll_true_before, f.nll_new_before), agreement_before=1.0,
                        margin_after=f.nll_true_after - f.nll_new_after,
                        margin_before=f.nll_true_before - f.nll_new_before)

    def per_fact(self) -> pd.DataFrame:
        """One value per fact, editor and metric (``after``, and ``before`` the edit): the mean over the
        group's prompts; ``perplexity_change`` from the fluency table (``before`` = 0)."""
        f = self._derived()
        parts = []
        for metric, (group, after, before, convention) in METRICS.items():
            g = f[f.group == group].groupby(["fact", "editor"], sort=False)[[after, before]].mean().reset_index()
            parts.append(g.rename(columns={after: "after", before: "before"}).assign(metric=metric,
                                                                                    convention=convention))
        if len(self.fluency):
            fl = self.fluency
            parts.append(pd.DataFrame({"fact": fl.fact, "editor": fl.editor, "after": fl.ppl_after / fl.ppl_before - 1,
                                       "before": 0.0, "metric": "perplexity_change", "convention": "relative"}))
        return pd.concat(parts, ignore_index=True)[["fact", "editor", "metric", "convention", "before", "after"]]

    def metrics(self) -> pd.DataFrame:
        """Per editor and metric: ``mean`` over facts of the per-fact value after the edit, its bootstrap
        interval ``ci_low``, ``ci_high`` (NaN with one fact), ``n_facts``, and ``before`` (the mean before)."""
        s = self.settings
        rows = []
        for (editor, metric), g in self.per_fact().groupby(["editor", "metric"], sort=False):
            low, high = bootstrap_ci(g["after"].to_numpy(), level=s.level, n_boot=s.n_boot, seed=s.seed)
            rows.append({"editor": editor, "metric": metric, "convention": g["convention"].iloc[0],
                         "mean": float(g["after"].mean()), "ci_low": low, "ci_high": high, "n_facts": len(g),
                         "before": float(g["before"].mean())})
        return pd.DataFrame(rows)

    def table(self) -> pd.DataFrame:
        """Editors × metrics: the mean with its interval as text, ``0.83 [0.71, 0.94]``."""
        m = self.metrics()
        cell = [f"{a:.3g} [{lo:.3g}, {hi:.3g}]" for a, lo, hi in zip(m["mean"], m["ci_low"], m["ci_high"])]
        return m.assign(cell=cell).pivot(index="editor", columns="metric", values="cell").reset_index()

    def compare(self, a: str, b: str, metric: str = "reliability") -> dict[str, Any]:
        """Paired sign-flip permutation test of editor ``a`` against ``b`` on ``metric`` over facts."""
        p = self.per_fact()
        p = p[p.metric == metric]
        if p.empty:
            raise InsufficientDataError(f"no values of metric {metric!r}; metrics: {sorted(METRICS)} and "
                                        f"perplexity_change")
        return paired_group_test(p, a, b, "after", by="editor", seed=self.settings.seed)

    def plot(self) -> Any:
        """Bars per metric and editor with their intervals; the grey tick is the value before the edit."""
        import matplotlib.pyplot as plt

        m = self.metrics()
        metrics, editors = list(dict.fromkeys(m.metric)), list(dict.fromkeys(m.editor))
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(metrics) * max(1, len(editors)) ** 0.5), 3.2))
        width = 0.8 / max(1, len(editors))
        for j, editor in enumerate(editors):
            e = m[m.editor == editor].set_index("metric").reindex(metrics)
            x = np.arange(len(metrics)) + (j - (len(editors) - 1) / 2) * width
            err = np.vstack([e["mean"] - e["ci_low"], e["ci_high"] - e["mean"]])
            ax.bar(x, e["mean"], width, yerr=np.nan_to_num(err), label=editor, capsize=2)
            ax.scatter(x, e["before"], marker="_", color="0.3", zorder=3)
        ax.set_xticks(np.arange(len(metrics)), metrics, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.legend(fontsize=8)
        ax.set_ylabel("mean over facts")
        fig.tight_layout()
        return fig
