"""Quadrature rules for the integrated-gradients path integral ∫₀¹ f(α) dα ≈ Σ_k w_k f(α_k).

The reference implementations disagree on the grid (docs/methods.md, quadrature grids): Dai et al.'s code takes the left
sum α = i/m, i = 0..m−1; EleutherAI, Niu et al. and QRNCA take ``linspace(0, 1, m)`` with weights 1/m;
the paper's formula is the right sum α = k/m, k = 1..m (knlens' default). Trapezoid and Gauss–Legendre
converge faster and are offered for cheaper scans.

>>> alphas, weights = quadrature("right", 4)
>>> alphas.tolist(), weights.tolist()
([0.25, 0.5, 0.75, 1.0], [0.25, 0.25, 0.25, 0.25])
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import SettingsError

__all__ = ["Grid", "GRIDS", "quadrature"]

Grid = Literal["right", "left", "linspace", "midpoint", "trapezoid", "gauss-legendre"]
GRIDS: tuple[str, ...] = ("right", "left", "linspace", "midpoint", "trapezoid", "gauss-legendre")


def quadrature(grid: Grid, steps: int) -> tuple[Float[Tensor, "steps"], Float[Tensor, "steps"]]:
    """Nodes ``α`` in [0, 1] and weights (float64) of a rule with ``steps`` evaluations."""
    if not isinstance(steps, int) or steps < 1:
        raise SettingsError(f"steps must be a positive integer, got {steps!r}")
    m = steps
    if grid == "right":
        a, w = np.arange(1, m + 1) / m, np.full(m, 1 / m)
    elif grid == "left":
        a, w = np.arange(m) / m, np.full(m, 1 / m)
    elif grid == "linspace":  # as EleutherAI: m points including both ends, each weighted 1/m
        a, w = np.linspace(0.0, 1.0, m), np.full(m, 1 / m)
    elif grid == "midpoint":
        a, w = (np.arange(m) + 0.5) / m, np.full(m, 1 / m)
    elif grid == "trapezoid":
        if m < 2:
            raise SettingsError("the trapezoid rule needs at least 2 steps")
        a = np.linspace(0.0, 1.0, m)
        w = np.full(m, 1 / (m - 1))
        w[[0, -1]] /= 2
    elif grid == "gauss-legendre":
        x, wx = np.polynomial.legendre.leggauss(m)
        a, w = (x + 1) / 2, wx / 2
    else:
        raise SettingsError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return torch.tensor(a, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
