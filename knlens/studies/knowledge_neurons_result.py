"""The value :func:`knlens.studies.knowledge_neurons` returns: neurons, checks, controls and activations, with save / load.

>>> from knlens import load_model, Fact, locate
>>> res = locate(load_model("tiny-llama"), Fact(["the capital of france is", "the capital city of france is"],
...              " paris"), steps=2, n_random=2, progress=False, specificity=False)
>>> res.effects()[["action", "neurons", "control"]].values.tolist()[:3]
[['suppress', 'knowledge', ''], ['suppress', 'random', 'uniform'], ['suppress', 'random', 'matched']]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.methods.activations import TokenActivations
from knlens.methods.attribution.result import Attribution, Screen
from knlens.core.facts import Fact
from knlens.methods.heldout import HeldOut
from knlens.methods.interventions import InterventionResult
from knlens.results.contract import RESULT_JSON, RESULT_TENSORS, Result
from knlens.core.neurons import NeuronSet
from knlens.methods.significance import significance_table
from knlens.methods.specificity import Specificity

__all__ = ["LocateResult", "LocateSettings", "RESULT_FILES"]

# what LocateResult.save writes (heldout.csv / specificity.csv too when those ran); load reads the first two only
RESULT_FILES = (RESULT_JSON, RESULT_TENSORS, "neurons.csv", "interventions.csv", "completeness.csv")
_CONTROL_COLOURS = {"uniform": "#9ab", "matched": "#db8"}


@dataclass(frozen=True)
class LocateSettings:
    """Everything that produced a :class:`LocateResult` (recorded in every saved result).

    ``engine`` is the integrated-gradients engine that ran (``Attribution.settings.engine``: it may have
    fallen back from ``engine_requested``, ``engine_note`` says why). ``controls`` are the random controls
    (``"uniform+matched"``), ``n_bins`` the magnitude bins of the matched one; ``held_out`` and
    ``specificity`` say whether those evaluations ran.
    """

    model: str
    n_layers: int
    d_mlp: int
    dtype: str
    hook_point: str
    steps: int
    grid: str
    quantity: str
    engine: str
    multi_token: str
    preset: str
    n_random: int
    seed: int
    top_k: int
    fallback_k: int
    knlens_version: str
    engine_requested: str = ""
    engine_note: str = ""
    controls: str = "uniform"
    n_bins: int = 10
    held_out: bool = False
    specificity: bool = False
    screen: Screen | None = None  # screened integration (each attribution's ``screen`` says what it left out)

    @property
    def engine_label(self) -> str:
        """The engine that ran, and the one asked for when they differ."""
        if self.engine_requested and self.engine_requested != self.engine:
            return f"{self.engine} (asked for {self.engine_requested}; fell back)"
        return self.engine


@dataclass(frozen=True, eq=False)
class LocateResult(Result):
    """The knowledge neurons of one fact, their causal checks and their activations (see :func:`knlens.studies.knowledge_neurons`).

    * ``neurons`` — the refined knowledge neurons (possibly empty; see ``refined_empty``);
    * ``tested`` — the neurons the interventions and token activations use: ``neurons``, or the
      ``fallback_k`` best by mean score when ``neurons`` is empty;
    * ``table`` — ``layer, neuron, mean_score`` (mean IG over prompts), ``n_coarse`` (in how many prompts
      the neuron is coarse), ``refined``, ``tested``, ``mean_activation`` (clean, at the target position);
      the refined neurons and the ``top_k`` best by mean score, best first;
    * ``completeness`` — per prompt: ``p_target`` (P of the whole target given the prompt: for a multi-token
      target the product of the teacher-forced per-token probabilities), ``ig_value`` (the quantity IG
      integrates, f(a): for a multi-token target the mean of the per-token values), Σ_l Δ_l, Σ IG,
      ``abs_error`` = Σ_l |Σ_i IG_i^l − Δ_l| and ``relative_error`` = abs_error / Σ_l |Δ_l|;
    * ``interventions`` — in-sample :class:`~knlens.InterventionResult` (selected and measured on the same
      prompts; knowledge vs uniform and magnitude-matched random controls);
    * ``selection`` — ``p`` after adaptation, its ``rounds``, ``min_prompts`` (prompts a neuron had to be
      coarse in) and ``n_prompts``;
    * ``heldout`` — :class:`~knlens.methods.heldout.HeldOut` (leave one prompt out) or ``None``;
    * ``specificity`` — :class:`~knlens.methods.specificity.Specificity` (other relations' facts) or ``None``;
    * ``notes`` — what was skipped or needs care, in words;
    * ``activations`` — one :class:`TokenActivations` per prompt.

    Saves and loads as every result does (``result.json`` + ``tensors.safetensors``); :meth:`save` adds CSV
    copies of the tables to read by eye.
    """

    study = "locate"

    fact: Fact
    attributions: tuple[Attribution, ...]
    neurons: NeuronSet
    tested: NeuronSet
    table: pd.DataFrame
    completeness: pd.DataFrame
    interventions: InterventionResult
    activations: tuple[TokenActivations, ...]
    settings: LocateSettings
    selection: dict[str, Any] = field(default_factory=dict)
    heldout: HeldOut | None = None
    specificity: Specificity | None = None
    notes: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def refined_empty(self) -> bool:
        return len(self.neurons) == 0

    @property
    def tested_label(self) -> str:
        """What ``tested`` is, in words (used in tables and the report)."""
        if not self.refined_empty:
            return "knowledge neurons (refined)"
        return f"top {len(self.tested)} by mean score (no refined neurons)"

    @property
    def mean_scores(self) -> Float[Tensor, "layer neuron"]:
        """Mean IG score of every neuron over the prompts."""
        return torch.stack([a.scores for a in self.attributions]).mean(0)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.attributions[0].layers

    @property
    def p_target(self) -> float:
        """Mean over the prompts of P(target | prompt) of the unpatched model (whole target)."""
        return float(self.completeness["p_target"].mean())

    def to_frame(self) -> pd.DataFrame:
        """The neuron table (refined neurons and the top neurons by mean score)."""
        return self.table.copy()

    def effects(self) -> pd.DataFrame:
        """In-sample interventions per action (suppress ×0, enhance ×2) and set (knowledge, then each random
        control): ``n_neurons, p_before, p_after, relative`` (mean relative change of P(target) over prompts
        and draws), ``relative_std`` (std over a control's draws of their mean), ``delta`` (Dai's Δ = mean
        change / mean p_before). The tests are in :meth:`tests`."""
        return self.interventions.effects()

    def tests(self) -> pd.DataFrame:
        """Every test (in-sample, held-out, specificity) with its p-value, floor and a note when it cannot
        reach significance (:func:`knlens.methods.significance.significance_table`)."""
        return significance_table(self.interventions, self.heldout, self.specificity)

    def per_prompt(self) -> pd.DataFrame:
        """Per prompt and action: P before, P after for the tested neurons, and each control's mean."""
        f = self.interventions.frame
        f = f.assign(set=f["control"].where(f["neurons"] != "knowledge", "knowledge"))
        g = f.groupby(["prompt", "action", "set"], sort=False).agg(p_before=("p_before", "first"),
                                                                   p_after=("p_after", "mean"))
        out = g["p_after"].unstack("set").add_prefix("p_")
        out.insert(0, "p_before", g["p_before"].groupby(level=[0, 1], sort=False).first())
        return out.reset_index()

    # ------------------------------------------------------------------ figures
    def plot(self, ax: Any = None) -> Any:
        """Layer × neuron heatmap of the mean scores, the tested neurons circled; returns the figure."""
        from knlens.results.figures import neuron_heatmap

        title = (f"mean IG over {len(self.attributions)} prompts of {self.fact.target!r}; circled: "
                 f"{self.tested_label}")
        return neuron_heatmap(self.mean_scores, layers=self.layers, mark=self.tested, ax=ax, title=title)

    def plot_interventions(self) -> Any:
        """Per action: histograms of each control's draws (mean relative change), the tested set as a line."""
        import matplotlib.pyplot as plt

        frame = self.interventions.frame
        actions = list(frame["action"].unique())
        fig, axes = plt.subplots(1, len(actions), figsize=(4.2 * len(actions), 2.8), squeeze=False)
        for ax, action in zip(axes[0], actions):
            sub = frame[frame.action == action]
            for control, colour in _CONTROL_COLOURS.items():
                part = sub[(sub.neurons == "random") & (sub.control == control)]
                draws = part.groupby("draw")["relative"].mean().to_numpy() * 100
                if len(draws):
                    ax.hist(draws, bins=min(20, max(5, len(draws) // 2)), color=colour, alpha=0.7,
                            label=f"{control} random sets")
            ax.axvline(sub[sub.neurons == "knowledge"]["relative"].mean() * 100, color="#c33", lw=2,
                       label="tested set")
            ax.axvline(0, color="black", lw=0.6)
            ax.set_title(f"{action}: ΔP(target) / P", fontsize=9)
            ax.set_xlabel("mean relative change (%)")
        axes[0][0].set_ylabel("random draws")
        axes[0][-1].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> Path:
        """Write the result (``result.json``, ``tensors.safetensors``) and, to read by eye, ``neurons.csv``,
        ``interventions.csv``, ``completeness.csv``, and ``heldout.csv`` / ``specificity.csv`` when those ran,
        into ``directory``; no pickle. Returns the directory. :meth:`load` reads the first two files only."""
        d = super().save(directory)
        self.table.to_csv(d / "neurons.csv", index=False)
        self.interventions.frame.to_csv(d / "interventions.csv", index=False)
        self.completeness.to_csv(d / "completeness.csv", index=False)
        if self.heldout is not None:
            self.heldout.interventions.frame.to_csv(d / "heldout.csv", index=False)
        if self.specificity is not None:
            self.specificity.frame.to_csv(d / "specificity.csv", index=False)
        return d

    def __repr__(self) -> str:
        return (f"LocateResult(fact={self.fact.name or self.fact.prompts[0]!r} → {self.fact.target!r}, "
                f"prompts={len(self.attributions)}, neurons={self.neurons!r}, model={self.settings.model!r})")
