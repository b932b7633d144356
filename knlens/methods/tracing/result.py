"""The result of a causal trace (:func:`knlens.methods.tracing.trace.trace`) and averages over many.

A :class:`Trace` is a frozen value: per kind the ``[layer, token]`` indirect effects, the clean and corrupted
probabilities, and the settings that produced it (:class:`TraceSettings`: engine that ran, corruption, windows,
versions). It saves and loads as every result does (``result.json`` + ``tensors.safetensors``, never pickle).
:class:`GroupEffects` averages many traces per token group and layer.

>>> import torch
>>> t = Trace("the capital of france is", " paris", ("<s>", "the", "capital", "of", "france", "is"), (4, 5), (4,),
...           {"mlp": torch.zeros(2, 6)}, p_clean=0.5, p_corrupted=0.25, settings=TraceSettings(kinds=("mlp",)))
>>> t.total_effect, t.groups()[4], len(t.to_frame()), t.settings.windows.get("mlp", 1)
(0.25, 'last subject', 12, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from knlens.methods.tracing.spans import token_groups
from knlens.results.contract import Result, TableResult

__all__ = ["Trace", "TraceSettings", "GroupEffects", "GroupSettings", "group_effects"]


@dataclass(frozen=True)
class TraceSettings:
    """How a :class:`Trace` was run. ``engine`` is the engine that ran (it may have replaced
    ``engine_requested``; ``engine_note`` says why), ``corruption`` is
    :meth:`~knlens.methods.tracing.corruption.Corruption.describe`, ``windows`` the layers restored per kind,
    ``known`` whether the clean top token is the target, ``position`` the read position."""

    model: str = "?"
    kinds: tuple[str, ...] = ()
    windows: dict[str, int] = field(default_factory=dict)
    corrupt: str = "subject"  # "subject" | "relation" | "positions"
    corruption: dict[str, Any] = field(default_factory=dict)
    embed_hook: str = "hook_embed"
    hook_points: dict[str, str] = field(default_factory=dict)
    quantity: str = "prob"
    engine: str = ""
    engine_requested: str = ""
    engine_note: str = ""
    target_token: str = ""
    clean_top_token: str = ""
    known: bool = False
    known_only: bool = True
    position: int = -1
    n_prefix: int = 1
    skip_prefix: bool = False
    samples: int = 1
    knlens_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Trace(Result):
    """Indirect effects of restoring each (layer, token) cell, per kind, for one prompt.

    ``effects[kind][l, t]`` = P_restored − P_corrupted; ``p_clean``, ``p_corrupted`` the two reference
    runs; ``total_effect`` = P_clean − P_corrupted. ``corrupted`` lists the corrupted positions.
    """

    study = "trace"

    prompt: str
    target: str
    tokens: tuple[str, ...]
    subject_span: tuple[int, int] | None
    corrupted: tuple[int, ...]
    effects: dict[str, Float[Tensor, "layer pos"]]
    p_clean: float
    p_corrupted: float
    settings: TraceSettings = TraceSettings()

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupted

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.effects)

    def p_restored(self, kind: str) -> Float[Tensor, "layer pos"]:
        return self.effects[kind] + self.p_corrupted

    def groups(self) -> list[str]:
        """The token group of each position (see :func:`token_groups`)."""
        span = self.subject_span or (self.corrupted[0], self.corrupted[-1] + 1)
        return token_groups(len(self.tokens), span, self.settings.n_prefix)

    def to_frame(self) -> pd.DataFrame:
        """One row per (kind, layer, position): token, group, p_restored, indirect_effect."""
        groups = self.groups()
        rows = []
        for kind, eff in self.effects.items():
            for l in range(eff.shape[0]):
                for t in range(eff.shape[1]):
                    e = float(eff[l, t])
                    rows.append({"kind": kind, "layer": l, "position": t, "token": self.tokens[t],
                                 "group": groups[t], "corrupted": t in self.corrupted,
                                 "p_restored": e + self.p_corrupted, "indirect_effect": e})
        return pd.DataFrame(rows)

    def plot(self, *, vmax: float | None = None) -> Any:
        """One heatmap per kind: tokens (rows, corrupted ones starred) × layers (columns)."""
        import matplotlib.pyplot as plt

        kinds = list(self.effects)
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.35 * len(self.tokens) + 1.6),
                                 squeeze=False)
        labels = [f"{tok!r}*" if i in self.corrupted else repr(tok) for i, tok in enumerate(self.tokens)]
        cmaps = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
        for ax, kind in zip(axes[0], kinds):
            im = ax.imshow(self.effects[kind].T.numpy(), aspect="auto", cmap=cmaps.get(kind, "viridis"),
                           vmin=min(0.0, float(self.effects[kind].min())), vmax=vmax)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlabel("layer")
            w = self.settings.windows.get(kind, 1)
            ax.set_title(f"{kind} (window {w})" if w > 1 else kind, fontsize=10)
            fig.colorbar(im, ax=ax, label="P_restored − P_corrupted")
        fig.suptitle(f"{self.prompt!r} → {self.target!r}: P clean {self.p_clean:.3f}, "
                     f"corrupted {self.p_corrupted:.3f}", fontsize=10)
        fig.tight_layout()
        return fig


@dataclass(frozen=True)
class GroupSettings:
    """Which traces :func:`group_effects` averaged: their prompts, targets and kinds."""

    prompts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class GroupEffects(TableResult):
    """Mean indirect effect per (kind, token group, layer) over many traces (Meng et al.'s averages).

    ``frame``: columns ``kind, group, layer, effect, n`` (n = number of traces contributing to the group).
    """

    study = "group_effects"

    frame: pd.DataFrame
    settings: GroupSettings = GroupSettings()


    def plot(self) -> Any:
        """One panel per kind: the mean effect of each token group across layers."""
        import matplotlib.pyplot as plt

        kinds = list(dict.fromkeys(self.frame["kind"])) or ["-"]
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for group, part in self.frame[self.frame["kind"] == kind].groupby("group", sort=False):
                ax.plot(part["layer"], part["effect"], marker=".", label=str(group))
            ax.set_title(kind, fontsize=10)
            ax.set_xlabel("layer")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("mean P_restored − P_corrupted")
        fig.tight_layout()
        return fig


def group_effects(traces: Sequence[Trace]) -> GroupEffects:
    """Mean indirect effect per (kind, token group, layer) over ``traces`` (Meng et al.'s averages), as a
    :class:`GroupEffects` (its ``frame``: ``kind, group, layer, effect, n``).

    >>> import torch
    >>> t = Trace("a b c", " d", ("<s>", "a", "b", "c"), (1, 2), (1,), {"mlp": torch.ones(2, 4)}, 0.5, 0.25)
    >>> group_effects([t, t]).frame.query("group == 'last'")["effect"].tolist()
    [1.0, 1.0]
    """
    settings = GroupSettings(tuple(t.prompt for t in traces), tuple(t.target for t in traces),
                             tuple(dict.fromkeys(k for t in traces for k in t.kinds)))
    parts = []
    for i, t in enumerate(traces):
        f = t.to_frame()
        f = f.groupby(["kind", "group", "layer"], as_index=False)["indirect_effect"].mean()
        f["trace"] = i
        parts.append(f)
    if not parts:
        return GroupEffects(pd.DataFrame(columns=["kind", "group", "layer", "effect", "n"]), settings)
    all_ = pd.concat(parts)
    g = all_.groupby(["kind", "group", "layer"])
    out = g["indirect_effect"].mean().rename("effect").to_frame()
    out["n"] = g["trace"].nunique()
    return GroupEffects(out.reset_index(), settings)
