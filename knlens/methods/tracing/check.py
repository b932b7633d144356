"""Choosing the causal-tracing engine that agrees with plain forwards of the model.

The ``fast`` engine reads earlier tokens' keys/values from a cache and re-runs blocks through a
staircase; the ``batched`` engine runs many restorations as rows of one batch. Before either's numbers
are used, cells whose answer is known are computed its way (``fast`` runs them as rows of the same runs as
its cells) and compared with plain whole-prompt forwards
(``model(tokens)``, no cache, one restoration per run): restoring nothing must give P_corrupted and
restoring everything P_clean. An engine that disagrees (a library version whose cache is not honoured,
a model the block loop does not fit) is replaced by the next one down, ``fast`` → ``batched`` →
``reference``, with an :class:`~knlens.core.errors.EngineFallbackWarning` and a log line that say why; the reference is
the plain path itself. The trace's settings record the engine that ran and why.

>>> import warnings
>>> checks = {"fast": lambda: "P_corrupted differ from a plain forward by 0.5", "batched": lambda: None}
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     choose_engine("fast", checks)
('batched', 'fast -> batched: P_corrupted differ from a plain forward by 0.5')
>>> caught[0].category.__name__
'EngineFallbackWarning'
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping

from knlens.core.errors import EngineFallbackWarning

__all__ = ["NEXT_ENGINE", "choose_engine"]

log = logging.getLogger(__name__)

NEXT_ENGINE: dict[str, str] = {"fast": "batched", "batched": "reference"}


def choose_engine(asked: str, checks: Mapping[str, Callable[[], str | None]]) -> tuple[str, str]:
    """The first engine from ``asked`` down :data:`NEXT_ENGINE` whose check passes, and a note (``""`` when
    ``asked`` ran). ``checks[engine]()`` returns None when the engine agrees with the plain forwards, else
    why not; an engine without a check (the reference) is trusted. Each failure warns and logs."""
    engine, notes = asked, []
    while engine in checks:
        why = checks[engine]()
        if why is None:
            break
        down = NEXT_ENGINE[engine]
        note = f"{engine} -> {down}: {why}"
        warnings.warn(f"causal tracing: engine {engine!r} disagrees with a plain forward of the model ({why}); "
                      f"running {down!r} instead", EngineFallbackWarning, stacklevel=3)
        log.warning("causal tracing: %s", note)
        notes.append(note)
        engine = down
    return engine, "; ".join(notes)
