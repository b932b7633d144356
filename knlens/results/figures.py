"""Matplotlib figures shared by the result types (each returns the figure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from jaxtyping import Float
from torch import Tensor

from knlens.core.neurons import NeuronSet

__all__ = ["neuron_heatmap"]


def _pool_columns(s: np.ndarray, max_columns: int) -> tuple[np.ndarray, int]:
    """Columns pooled in groups of ``width`` keeping each group's largest-magnitude value (signed), so that a
    single strong neuron stays visible when there are more neurons than pixels.

    >>> _pool_columns(np.array([[0.1, -0.9, 0.2, 0.3]]), 2)
    (array([[-0.9,  0.3]]), 2)
    """
    width = max(1, -(-s.shape[1] // max_columns))
    if width == 1:
        return s, 1
    pad = (-s.shape[1]) % width
    blocks = np.pad(s, ((0, 0), (0, pad))).reshape(s.shape[0], -1, width)
    pick = np.abs(blocks).argmax(-1)
    return np.take_along_axis(blocks, pick[..., None], -1)[..., 0], width


def neuron_heatmap(scores: Float[Tensor, "layer neuron"], *, layers: Sequence[int] = (), ax: Any = None,
                   title: str = "", mark: NeuronSet | None = None, max_columns: int = 512,
                   **imshow_kwargs: Any) -> Any:
    """Layer × neuron heatmap (diverging colours centred on 0); ``mark`` circles chosen neurons. With more
    than ``max_columns`` neurons a column shows the largest-|score| neuron of its group, so single strong
    neurons stay visible (nearest-pixel sampling would drop most of them)."""
    s = scores.detach().float().cpu().numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, max(2.5, 0.22 * s.shape[0] + 1.2)))
    else:
        fig = ax.figure
    vmax = float(abs(s).max()) or 1.0
    n = s.shape[1]
    pooled, width = _pool_columns(s, max_columns)
    im = ax.imshow(pooled, aspect="auto", cmap=imshow_kwargs.pop("cmap", "RdBu_r"), vmin=-vmax, vmax=vmax,
                   interpolation="nearest", extent=(-0.5, n - 0.5, s.shape[0] - 0.5, -0.5), **imshow_kwargs)
    if width > 1:
        title = f"{title}{' ' if title else ''}(a column = the largest |score| of {width} neurons)"
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
