"""The result of a causal trace (:func:`knlens.methods.tracing.trace.trace`) and averages over many.

A :class:`Trace` is a frozen value: per kind the ``[layer, token]`` indirect effects, the clean and corrupted
probabilities, and the settings that produced it (engine that ran, corruption, windows, versions). It
saves to JSON + safetensors, never pickle.

>>> import torch
>>> t = Trace("the capital of france is", " paris", ("<s>", "the", "capital", "of", "france", "is"), (4, 5), (4,),
...           {"mlp": torch.zeros(2, 6)}, p_clean=0.5, p_corrupted=0.25, settings={"kinds": ["mlp"]})
>>> t.total_effect, t.groups()[4], len(t.to_frame())
(0.25, 'last subject', 12)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from knlens.methods.tracing.spans import token_groups

__all__ = ["Trace", "group_effects"]


@dataclass(frozen=True)
class Trace:
    """Indirect effects of restoring each (layer, token) cell, per kind, for one prompt.

    ``effects[kind][l, t]`` = P_restored − P_corrupted; ``p_clean``, ``p_corrupted`` the two reference
    runs; ``total_effect`` = P_clean − P_corrupted. ``corrupted`` lists the corrupted positions.
    """

    prompt: str
    target: str
    tokens: tuple[str, ...]
    subject_span: tuple[int, int] | None
    corrupted: tuple[int, ...]
    effects: dict[str, Float[Tensor, "layer pos"]]
    p_clean: float
    p_corrupted: float
    settings: dict[str, Any] = field(default_factory=dict)

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
        return token_groups(len(self.tokens), span, int(self.settings.get("n_prefix", 1)))

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
            w = self.settings.get("windows", {}).get(kind, 1)
            ax.set_title(f"{kind} (window {w})" if w > 1 else kind, fontsize=10)
            fig.colorbar(im, ax=ax, label="P_restored − P_corrupted")
        fig.suptitle(f"{self.prompt!r} → {self.target!r}: P clean {self.p_clean:.3f}, "
                     f"corrupted {self.p_corrupted:.3f}", fontsize=10)
        fig.tight_layout()
        return fig

    def save(self, path: str | Path) -> None:
        """``path``.json (metadata) and ``path``.safetensors (effects)."""
        path = Path(path)
        meta = {k: v for k, v in asdict(self).items() if k != "effects"}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
        save_file({k: v.contiguous() for k, v in self.effects.items()}, str(path.with_suffix(".safetensors")))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        effects = load_file(str(path.with_suffix(".safetensors")))
        span = meta["subject_span"]
        return cls(meta["prompt"], meta["target"], tuple(meta["tokens"]), tuple(span) if span else None,
                   tuple(meta["corrupted"]), {k: effects[k] for k in meta["settings"]["kinds"]},
                   meta["p_clean"], meta["p_corrupted"], meta["settings"])


def group_effects(traces: Sequence[Trace]) -> pd.DataFrame:
    """Mean indirect effect per (kind, token group, layer) over ``traces`` (Meng et al.'s averages).

    Columns ``kind, group, layer, effect, n`` (n = number of traces contributing to the group).
    """
    parts = []
    for i, t in enumerate(traces):
        f = t.to_frame()
        f = f.groupby(["kind", "group", "layer"], as_index=False)["indirect_effect"].mean()
        f["trace"] = i
        parts.append(f)
    if not parts:
        return pd.DataFrame(columns=["kind", "group", "layer", "effect", "n"])
    all_ = pd.concat(parts)
    g = all_.groupby(["kind", "group", "layer"])
    out = g["indirect_effect"].mean().rename("effect").to_frame()
    out["n"] = g["trace"].nunique()
    return out.reset_index()
