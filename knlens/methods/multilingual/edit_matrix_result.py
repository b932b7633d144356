"""``EditMatrix``: facts edited in one language and judged in every language, per editor (docs/methods.md,
cross-lingual editing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import SettingsError
from knlens.methods.editing.result import METRICS
from knlens.results.contract import Result

__all__ = ["EditMatrix", "EditMatrixSettings", "CELL", "SKIP_REASONS", "MATRIX_METRICS"]

CELL = ["edit_language", "eval_language", "editor"]
MATRIX_METRICS = ("reliability", "reliability_es", "generality", "generality_ps", "locality", "locality_gold",
                  "locality_ns")
"""The metrics of :data:`~knlens.methods.editing.result.METRICS` a matrix cell has (no probes, no perplexity)."""
SKIP_REASONS = ("missing_translation", "not_known", "not_located", "no_neurons", "multi_token_object",
                "same_object", "no_op")
"""Why a (fact, edit language, evaluation language, editor) cell was not measured: the fact or its new object
has no version in a language; the model does not know the fact in the edit or evaluation language; the fact
has no neuron sets; its neuron set for this editor is empty; the KN update needs single-token objects in the
edit language; the new object's label equals the old one there; the editor changed nothing."""


@dataclass(frozen=True)
class EditMatrixSettings:
    """How the matrix was made: the editors (and their options as text), languages, neighbours per request,
    whether knowledge was checked, the neuron sets' settings, the model and its weights' fingerprint."""

    editors: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    edit_languages: tuple[str, ...] = ()
    eval_languages: tuple[str, ...] = ()
    n_neighbours: int = 4
    check_known: bool = True
    neurons: str = ""
    model: str = ""
    fingerprint: str = ""
    knlens_version: str = ""


@dataclass(frozen=True, eq=False)
class EditMatrix(Result):
    """``frame``: one row per (fact, edit language, evaluation language, editor, metric) with the per-fact value
    ``before`` and ``after`` the edit (:meth:`~knlens.methods.editing.result.EditEvaluation.per_fact`);
    ``skips``: one row per cell not measured, with its ``reason`` (:data:`SKIP_REASONS`); ``edits``: one row per
    edit made (fact, edit language, editor, size, and MEMLA's steps and P(new))."""

    study = "cross-lingual-edits"

    frame: pd.DataFrame
    skips: pd.DataFrame
    edits: pd.DataFrame
    facts: tuple[str, ...] = ()
    settings: EditMatrixSettings = field(default_factory=EditMatrixSettings)

    def to_frame(self) -> pd.DataFrame:
        """One row per edit language × evaluation language × editor × metric: the mean over facts ``after``
        and ``before`` the edit, ``n_facts`` measured, ``n_skipped`` (cells of the fact skipped, any reason) and
        ``n_total`` (= facts given; a metric with no prompt in a measured fact, e.g. generality with one
        prompt, has fewer ``n_facts`` than ``n_total − n_skipped``)."""
        f = self.frame
        agg = (f.groupby([*CELL, "metric"], sort=False)
               .agg(convention=("convention", "first"), after=("after", "mean"), before=("before", "mean"),
                    n_facts=("fact", "nunique")).reset_index())
        skipped = self.skips.groupby(CELL).size().rename("n_skipped").reset_index()
        metrics = pd.DataFrame([(m, METRICS[m][3]) for m in MATRIX_METRICS], columns=["metric", "convention"])
        cells = pd.DataFrame([(a, b, e) for a in self.settings.edit_languages for b in self.settings.eval_languages
                              for e in self.settings.editors], columns=CELL)
        full = cells.merge(metrics, how="cross").merge(agg, on=[*CELL, "metric", "convention"], how="left")
        full = full.merge(skipped, on=CELL, how="left")
        full["n_facts"] = full["n_facts"].fillna(0).astype("int64")
        full["n_skipped"] = full["n_skipped"].fillna(0).astype("int64")
        return full.assign(n_total=len(self.facts))

    def skip_counts(self) -> pd.DataFrame:
        """Per edit language, evaluation language and editor: the cells skipped for each reason (a column per
        reason of :data:`SKIP_REASONS`)."""
        counts = self.skips.groupby([*CELL, "reason"]).size().unstack("reason", fill_value=0)
        counts = counts.reindex(columns=list(SKIP_REASONS), fill_value=0)
        return counts.reset_index()

    def table(self, metric: str = "reliability", editor: str | None = None) -> pd.DataFrame:
        """Edit language (rows) × evaluation language (columns) of ``metric``'s mean after the edit, for
        ``editor`` (the first editor by default)."""
        editor = editor or self.settings.editors[0]
        t = self.to_frame()
        t = t[(t.metric == metric) & (t.editor == editor)]
        if t.empty:
            raise SettingsError(f"no {metric!r} for editor {editor!r}; editors {list(self.settings.editors)}, metrics "
                                f"{sorted(self.frame.metric.unique())}")
        out = t.pivot(index="edit_language", columns="eval_language", values="after")
        return out.reindex(index=list(self.settings.edit_languages), columns=list(self.settings.eval_languages))

    def plot(self, metrics: tuple[str, ...] = ("reliability", "generality", "locality")) -> Any:
        """One edit × evaluation language heatmap per editor (rows) and metric (columns), the fact count in
        each cell."""
        import matplotlib.pyplot as plt

        editors = self.settings.editors
        t = self.to_frame()
        fig, axes = plt.subplots(len(editors), len(metrics), squeeze=False,
                                 figsize=(2.6 * len(metrics) + 0.6, 2.3 * len(editors) + 0.4))
        for i, editor in enumerate(editors):
            for j, metric in enumerate(metrics):
                ax = axes[i][j]
                sub = t[(t.editor == editor) & (t.metric == metric)]
                values = self.table(metric, editor).to_numpy(dtype=float) if len(sub) else np.full(
                    (len(self.settings.edit_languages), len(self.settings.eval_languages)), np.nan)
                counts = sub.pivot(index="edit_language", columns="eval_language", values="n_facts").reindex(
                    index=list(self.settings.edit_languages), columns=list(self.settings.eval_languages))
                ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
                for (r, c), n in np.ndenumerate(counts.to_numpy()):
                    ax.text(c, r, f"{values[r, c]:.2f}\nn={int(n) if n == n else 0}", ha="center", va="center",
                            fontsize=6, color="w")
                ax.set_xticks(range(len(self.settings.eval_languages)), self.settings.eval_languages, fontsize=7)
                ax.set_yticks(range(len(self.settings.edit_languages)), self.settings.edit_languages, fontsize=7)
                ax.set_title(f"{editor}: {metric}", fontsize=8)
                if i == len(editors) - 1:
                    ax.set_xlabel("evaluated in", fontsize=7)
                if j == 0:
                    ax.set_ylabel("edited in", fontsize=7)
        fig.tight_layout()
        return fig
