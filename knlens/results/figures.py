"""Matplotlib figures shared by the result types (each returns the figure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any



import matplotlib.pyplot as plt  # noqa: E402
from jaxtyping import Float  # noqa: E402
from torch import Tensor  # noqa: E402

from knlens.core.neurons import NeuronSet

__all__ = ["neuron_heatmap"]


def neuron_heatmap(scores: Float[Tensor, "layer neuron"], *, layers: Sequence[int] = (), ax: Any = None,
                   title: str = "", mark: NeuronSet | None = None, **imshow_kwargs: Any) -> Any:
    """Layer × neuron heatmap (diverging colours centred on 0); ``mark`` circles chosen neurons."""
    s = scores.detach().float().cpu().numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, max(2.5, 0.22 * s.shape[0] + 1.2)))
    else:
        fig = ax.figure
    vmax = float(abs(s).max()) or 1.0
    im = ax.imshow(s, aspect="auto", cmap=imshow_kwargs.pop("cmap", "RdBu_r"), vmin=-vmax, vmax=vmax,
                   interpolation="nearest", **imshow_kwargs)
    layers = list(layers) or list(range(s.shape[0]))
    step = max(1, len(layers) // 15)
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
    ax.set_xlabel("neuron")
    ax.set_ylabel("layer")
    if mark is not None:
        rows = {l: i for i, l in enumerate(layers)}
        pts = [(n.index, rows[n.layer]) for n in mark if n.layer in rows]
        if pts:
            ax.scatter(*zip(*pts), s=60, facecolors="none", edgecolors="black", linewidths=1.2)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="attribution")
    return fig
