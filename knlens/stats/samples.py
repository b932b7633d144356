"""Checks of a 1-D sample shared by the statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knlens.core.errors import InsufficientDataError

__all__ = ["finite"]


def finite(values: Sequence[float] | np.ndarray, what: str, minimum: int) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(x).all():
        raise InsufficientDataError(f"{what}: {int((~np.isfinite(x)).sum())} non-finite value(s)")
    if len(x) < minimum:
        raise InsufficientDataError(f"{what} needs at least {minimum} values, got {len(x)}")
    return x
