"""Close-name hints for a misspelled name (a fact, a hook point, a relation): one rule everywhere.

>>> did_you_mean("capital-frnace", ["capital-france", "capital-greece", "symbol-gold"])
"; did you mean 'capital-france'?"
>>> did_you_mean("zzzz", ["capital-france"])
''
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["close_names", "did_you_mean"]


def close_names(name: str, names: Sequence[str], *, n: int = 3, cutoff: float = 0.6, margin: float = 0.1) -> list[str]:
    """The ``names`` closest to ``name`` (difflib ratio, case ignored), best first: at most ``n``, each at least
    ``cutoff`` and within ``margin`` of the best, so that a typo gets its one match.

    >>> close_names("capital-frnace", ["capital-france", "capital-greece", "symbol-gold"])
    ['capital-france']
    """
    scores = sorted(((difflib.SequenceMatcher(None, name.lower(), c.lower()).ratio(), c) for c in names),
                    key=lambda rc: -rc[0])
    best = scores[0][0] if scores else 0.0
    return [c for r, c in scores[:n] if r >= max(cutoff, best - margin)]


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` with the :func:`close_names` of ``name``, or ``""`` when none is close."""
    close = [repr(c) for c in close_names(name, sorted(names))]
    if len(close) > 1:
        close = [", ".join(close[:-1]), close[-1]]
    return f"; did you mean {' or '.join(close)}?" if close else ""
