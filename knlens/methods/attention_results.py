"""The results of :mod:`knlens.methods.attention`: attention outputs patched, attention weights scaled.

>>> from knlens import NeuronSet
>>> SynapseSettings(NeuronSet([(1, 3)])).alphas
(0.0, 0.5, 1.0, 2.0, 4.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.neurons import NeuronSet
from knlens.results.contract import Result, TableResult

__all__ = ["AttentionPatch", "AttentionPatchSettings", "SynapseScaling", "SynapseSettings"]


@dataclass(frozen=True)
class AttentionPatchSettings:
    """What :func:`attention_patch` patched: the prompt and target, the source (a paraphrase, or a corruption's
    description), the neurons read, the hook point and heads, the patched layers."""

    prompt: str
    target: str
    source: str | dict[str, Any]
    neurons: NeuronSet
    hook_point: str = "hook_attn_out"
    heads: tuple[int, ...] | None = None
    layers: tuple[int, ...] = ()
    position: str = "last"


@dataclass(frozen=True, eq=False)
class AttentionPatch(Result):
    """Neuron activations and P(target) with attention outputs patched at the last token, per patched layer.

    ``frame``: one row per (patched, neuron) with ``act_clean, act_patched, change, relative``;
    ``probs``: one row per patched configuration with ``p_clean, p_patched``. ``patched`` is the layer
    number as a string, or ``"all"`` for every layer at once.
    """

    study = "attention_patch"

    frame: pd.DataFrame
    probs: pd.DataFrame
    settings: AttentionPatchSettings

    @property
    def prompt(self) -> str:
        """The prompt (the key names the result by it)."""
        return self.settings.prompt

    def to_frame(self) -> pd.DataFrame:
        """The neurons' rows with their configuration's probabilities."""
        return self.frame.merge(self.probs, on="patched")

    def explained(self) -> pd.DataFrame:
        """Per patched configuration: mean relative change of the neurons' activations and of P."""
        g = self.frame.groupby("patched", sort=False)
        out = pd.DataFrame({"mean_relative_activation_change": g["relative"].mean(),
                            "mean_abs_relative_activation_change": g["relative"].apply(lambda s: s.abs().mean())})
        out = out.reset_index().merge(self.probs, on="patched")
        out["relative_p_change"] = (out.p_patched - out.p_clean) / out.p_clean
        return out

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        e = self.explained()
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(e)), 3))
        x = np.arange(len(e))
        ax.bar(x - 0.2, e["mean_relative_activation_change"], 0.4, label="neurons' activation")
        ax.bar(x + 0.2, e["relative_p_change"], 0.4, label="P(target)")
        ax.set_xticks(x, e["patched"], fontsize=8)
        ax.set_xlabel("attention output patched at layer")
        ax.set_ylabel("relative change")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


@dataclass(frozen=True)
class SynapseSettings:
    """What :func:`synapse_scaling` scaled: the neurons read, each α, ``k`` synapses, the layers (None: all),
    ``n_controls`` random draws of other positions and their seed."""

    neurons: NeuronSet
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    k: int = 1
    layers: tuple[int, ...] | None = None
    n_controls: int = 5
    seed: int = 0


@dataclass(frozen=True, eq=False)
class SynapseScaling(TableResult):
    """The last token's attention to its "knowledge synapses" (and to random control positions) scaled by α.

    ``frame``: one row per (group, draw, α), see :func:`synapse_scaling`.
    """

    study = "synapse_scaling"

    prompt: str
    target: str
    frame: pd.DataFrame
    settings: SynapseSettings


    def summary(self) -> pd.DataFrame:
        """Per group and α: mean ``mass``, ``relative_p`` and ``activation_relative`` over the draws."""
        cols = ["mass", "relative_p", "activation_relative", "activation_abs_relative"]
        return self.frame.groupby(["group", "alpha"], sort=False)[cols].mean().reset_index()

    def plot(self) -> Any:
        """Relative change of P(target) against α, synapses against the controls' mean."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3))
        for group, part in self.summary().groupby("group", sort=False):
            ax.plot(part["alpha"], part["relative_p"], marker="o", label=str(group))
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xlabel("α (attention weight scale)")
        ax.set_ylabel("relative change of P(target)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
