"""``Attribution``: neuron scores of one prompt, with the settings and checks that produced them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.neurons import NeuronSet
from knlens.results.contract import Result

__all__ = ["Attribution", "AttributionSettings", "Screen", "ScreenCheck"]


@dataclass(frozen=True)
class Screen:
    """How a screened integration picks its layers, and what it guarantees (docs/methods.md, screening).

    ``method`` is the cheap first pass over every layer: ``"gradxact"`` (gradient × (activation − baseline)
    at the clean point: integrated gradients on one node at α = 1) or ``"gauss2"`` / ``"gauss3"`` /
    ``"gauss4"`` (integrated gradients on that many Gauss–Legendre nodes). The guarantee, for the prompts of
    one fact: every prompt's top score lies in an exactly integrated layer, no neuron of a left-out layer
    scores ``threshold`` × its prompt's top score or more in ``min_count`` or more prompts (so it is never a
    refined neuron when a neuron must be coarse in at least ``min_count`` prompts: Dai's floor is 3), and
    none is among the ``top_k`` by mean score over the prompts. Layers are picked assuming the screen's error
    is at most ``safety`` − 1 times a layer's largest |screened score| (the check uses the error it measures).
    """

    method: str = "gauss2"
    threshold: float = 0.2
    min_count: int = 3
    top_k: int = 20
    safety: float = 1.25


@dataclass(frozen=True)
class ScreenCheck:
    """What the screen did for one prompt, and the check of its guarantee against exact integration.

    ``kept`` are the layers the screen picked, ``verified`` the left-out layer nearest the cut, integrated
    exactly as well, ``skipped`` the layers never integrated exactly. ``beta`` is the screen's error measured
    on every exactly integrated layer and prompt of the fact: the largest (max|exact − screened| − |r|) /
    max|screened| of a layer, where r = Δ − Σ screened is the effect its screened scores leave unexplained
    (Δ = f(a) − f(baseline) of the layer, from two forwards of the model). A neuron of a left-out layer is
    bounded by its screened score + beta × the layer's largest |screened score| + |r|; ``bound`` is the largest
    such bound of this prompt, ``top`` its top exact score, ``coarse_layers`` the left-out layers where a bound
    reaches ``threshold`` × ``top``. ``skipped_mass`` = Σ |Δ| of the left-out layers / Σ |Δ| of all layers.
    ``passed`` is the fact's check (``why`` says what failed); ``rounds`` is 2 when a first check failed and
    the layers were picked again with the measured beta; when the last check fails every layer is integrated
    exactly (``fell_back``) and the result is the unscreened one.
    """

    method: str
    kept: tuple[int, ...]
    verified: tuple[int, ...]
    skipped: tuple[int, ...]
    beta: float
    bound: float
    top: float
    coarse_layers: tuple[int, ...]
    skipped_mass: float
    passed: bool
    fell_back: bool
    why: str = ""
    rounds: int = 1


@dataclass(frozen=True)
class AttributionSettings:
    """How an attribution was computed (recorded in every result)."""

    method: str  # "integrated_gradients"
    model: str
    hook_point: str  # e.g. "hook_post": blocks.{l}.mlp.hook_post
    steps: int
    grid: str
    quantity: str  # "prob" | "logprob" | "logit"
    baseline: str  # "zero" or a description
    engine: str  # the engine that ran: "fast" | "batched" | "reference", "+"-joined when prompts differed
    multi_token: str  # "single" | "teacher_forcing/mean" | "teacher_forcing/sum"
    dtype: str  # dtype the model ran in; gradients are accumulated in float32
    knlens_version: str
    engine_note: str = ""  # why an engine fell back to a slower one ("" when the one asked for ran)
    versions: dict[str, str] = field(default_factory=dict)  # knlens.core.versions.environment() of the run
    # adaptive integration (knlens.methods.attribution.adaptive): the relative completeness error aimed at (None: the
    # grid and steps were fixed), the most Gauss–Legendre nodes allowed, and every pass "grid steps: error"
    # ("right 20: 0.94 -> gauss-legendre 20: 0.31 -> ..."); grid and steps above are those of the pass kept
    tolerance: float | None = None
    max_steps: int | None = None
    refinement: str = ""
    screen: Screen | None = None  # screened integration (knlens.methods.attribution.screen); None: every layer


@dataclass(frozen=True, eq=False)
class Attribution(Result):
    """Scores ``[layer, neuron]`` of one prompt for one target, plus the integrated-gradients checks.

    ``delta[l]`` is f(a) − f(baseline) when layer ``l`` is moved along the path, ``completeness_error[l]``
    is ``|Σ_neurons scores[l] − delta[l]|`` (0 for exact integration), ``activations`` the clean
    activations at the target position. Saves and loads as every result does (:class:`~knlens.results.contract.Result`).
    """

    study = "attribution"

    prompt: str
    target: str
    scores: Float[Tensor, "layer neuron"]
    activations: Float[Tensor, "layer neuron"]
    delta: Float[Tensor, "layer"]
    completeness_error: Float[Tensor, "layer"]
    clean_value: float  # f(a) of the unpatched model (P(target) for quantity="prob")
    settings: AttributionSettings
    layers: tuple[int, ...] = field(default=())  # the model layers the rows of ``scores`` stand for
    screen: ScreenCheck | None = None  # what a screened integration left out and how that was checked

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def relative_completeness_error(self) -> float:
        """Σ_l |Σ_i IG_i^l − Δ_l| / Σ_l |Δ_l|: the completeness error relative to the layers' total effect."""
        return float(self.completeness_error.sum() / self.delta.abs().sum().clamp_min(1e-12))

    def top(self, k: int = 20) -> NeuronSet:
        """The ``k`` highest-scoring neurons, best first."""
        flat = self.scores.flatten()
        idx = flat.topk(min(k, flat.numel())).indices
        d = self.scores.shape[1]
        return NeuronSet((self.layers[int(i) // d], int(i) % d) for i in idx)

    def to_frame(self, k: int | None = None) -> pd.DataFrame:
        """One row per neuron (``layer, neuron, score, activation``), best first; ``k`` keeps the top k."""
        d = self.scores.shape[1]
        layer_idx = torch.tensor(self.layers).repeat_interleave(d)
        frame = pd.DataFrame({
            "layer": layer_idx.numpy(),
            "neuron": torch.arange(d).repeat(self.n_layers).numpy(),
            "score": self.scores.flatten().double().numpy(),
            "activation": self.activations.flatten().double().numpy(),
        }).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        return frame if k is None else frame.head(k)

    def plot(self, ax: Any = None, **imshow_kwargs: Any) -> Any:
        """Layer × neuron heatmap of the scores; returns the matplotlib figure."""
        from knlens.results.figures import neuron_heatmap

        return neuron_heatmap(self.scores, layers=self.layers, ax=ax,
                              title=f"IG of {self.target!r} | {self.prompt!r}", **imshow_kwargs)
