"""The fields most studies' results share: settings, tables by name, timings and versions. A
:class:`StudyResult` is a :class:`~knlens.results.contract.Result` like any other (saved, loaded and keyed
the same way); a study's result class declares only what is its own: its ``study`` name, its settings type,
its other fields, the table ``to_frame`` returns (``frame_table``) and ``plot``.

``timings`` and ``versions`` are keyword-only: they have defaults, so a study's own fields without one
can follow the tables, and positional arguments go settings, tables, then the study's own fields.

>>> import dataclasses, tempfile
>>> import pandas as pd
>>> @dataclasses.dataclass(frozen=True)
... class Sizes:
...     facts: int = 2
...     seed: int = 0
>>> @dataclasses.dataclass(frozen=True, eq=False)
... class Example(StudyResult):
...     study = "example-study"
...     frame_table = "facts"
...     settings: Sizes
...     numbers: dict[str, float]
>>> r = Example(Sizes(), {"facts": pd.DataFrame({"p": [0.5, 0.25]})}, {"mean": 0.375}, timings={"total": 1.0})
>>> r.to_frame().p.tolist()
[0.5, 0.25]
>>> with tempfile.TemporaryDirectory() as d:
...     Example.load(r.save(d)) == r
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from knlens.results.contract import Result

__all__ = ["StudyResult"]


@dataclass(frozen=True, eq=False)
class StudyResult(Result):
    """A study's settings (each study narrows the type), its tables by name, the seconds of its phases
    and the versions of the libraries it ran with (:func:`knlens.core.versions.environment`)."""

    frame_table: ClassVar[str] = ""  # the table to_frame() returns; "" where the study defines to_frame
    settings: Any
    tables: dict[str, pd.DataFrame]
    timings: dict[str, float] = field(default_factory=dict, kw_only=True)
    versions: dict[str, str] = field(default_factory=dict, kw_only=True)

    def to_frame(self) -> pd.DataFrame:
        """The study's main table: ``tables[frame_table]`` (itself, not a copy)."""
        if not self.frame_table:
            return super().to_frame()
        return self.tables[self.frame_table]
