"""Confidence intervals of a mean over units (facts): the percentile bootstrap.

>>> low, high = bootstrap_ci([0.2, 0.4, 0.6, 0.8, 1.0])
>>> low < 0.6 < high
True
>>> bootstrap_ci([0.5])                 # one unit: no interval
(nan, nan)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knlens.core.errors import SettingsError
from knlens.stats.samples import finite

__all__ = ["bootstrap_ci"]


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (one per unit, e.g. per fact) at ``level``:
    ``n_boot`` resamples of the units with replacement. NaN, NaN for fewer than 2 units (no interval can be
    estimated from one); a non-finite value raises :class:`~knlens.core.errors.InsufficientDataError`."""
    if not 0 < level < 1:
        raise SettingsError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise SettingsError(f"n_boot must be at least 1, got {n_boot}")
    x = finite(values, "a bootstrap interval", 0)
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
