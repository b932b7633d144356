"""One way to time two (or more) sides of a comparison: warm-up first, then interleaved repeats.

Each side is called once untimed (one-time costs: lazy imports, allocator growth, kernel selection), then
the sides are called in turn ``repeat`` times, so that a slow spell of a shared machine falls on every
side alike. ``compare`` returns each side's minimum and median wall time; ratios are taken between
minima (the least disturbed run) and printed beside the medians.

>>> import time
>>> t = compare({"a": lambda: time.sleep(0.001), "b": lambda: None}, repeat=3)
>>> t["a"].min >= t["b"].min
True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    """Wall times (s) of one side, and the value its last call returned."""

    times: list[float] = field(default_factory=list)
    value: Any = None

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def compare(sides: dict[str, Callable[[], Any]], repeat: int = 3, warmup: bool = True,
            sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Time every side ``repeat`` times, interleaved, after one untimed warm-up call of each."""
    out = {name: Timing() for name in sides}
    if warmup:
        for name, fn in sides.items():
            out[name].value = fn()
            sync()
    for _ in range(repeat):
        for name, fn in sides.items():
            sync()
            t = time.perf_counter()
            out[name].value = fn()
            sync()
            out[name].times.append(time.perf_counter() - t)
    return out


def ratio_line(timings: dict[str, Timing], slow: str, fast: str) -> str:
    """``slow/fast`` as min ratio (median ratio), e.g. ``'12.3× (median 11.8×)'``."""
    s, f = timings[slow], timings[fast]
    return f"{s.min / f.min:.1f}× (median {s.median / f.median:.1f}×)"
