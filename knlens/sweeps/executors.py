"""Where a sweep's work runs. An executor maps a job ``job(model, item)`` over items where a model is loaded:
:class:`LocalExecutor` in this process, one item after the other (the default, nothing extra needed);
:class:`~knlens.sweeps.ray_executor.RayExecutor` on the workers of a Ray cluster. A sweep's job is
:func:`attempt`: one task run into an :class:`Outcome` that the driver files in the store, whichever executor
ran it.

>>> import knlens
>>> from knlens.store import Task
>>> fact = knlens.Fact(["the capital of france is"], " paris", subject="france", name="fr")
>>> task = Task("trace", fact, "tiny-llama", {"samples": 1, "known_only": False})
>>> with make_executor("local", "tiny-llama") as ex:
...     [(t.key == task.key, out.failure) for t, out in ex.map(functools.partial(attempt, "trace"), [task])]
[(True, None)]
"""

from __future__ import annotations

import datetime as dt
import functools
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from knlens.core import models
from knlens.core.errors import SweepError
from knlens.core.facts import Fact
from knlens.methods.known import known_facts
from knlens.results.contract import load_result
from knlens.store.store import Failure
from knlens.store.task import Task
from knlens.sweeps.plan import Study, get_study

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "Outcome", "attempt", "is_known", "lost", "make_executor"]

EXECUTORS = ("local", "ray")
"""The executors a sweep takes by name."""

Job = Callable[[Any, Any], Any]
"""``job(model, item)``: runs where the model is loaded; its value travels back to the driver."""


@runtime_checkable
class Executor(Protocol):
    """Runs jobs where a model is loaded. ``map`` yields ``(item, value)`` as each item ends (in any order);
    ``on_error(item, error)`` gives the value of an item whose job could not end in its worker (the worker
    died, the value could not be sent back), and without it that error is raised. ``close`` frees the
    workers; an executor is also a context manager that closes it."""

    def map(self, job: Job, items: Sequence[Any],
            on_error: Callable[[Any, BaseException], Any] | None = None) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


class LocalExecutor:
    """Jobs run here, one after the other, with ``model`` (a name for :func:`knlens.load_model`, loaded on the
    first job, or a loaded model). A job's error is raised as it is: nothing can be lost in transit here."""

    def __init__(self, model: Any) -> None:
        self._model = functools.cache(lambda: models.load_model(model) if isinstance(model, str) else model)

    def map(self, job: Job, items: Sequence[Any],
            on_error: Callable[[Any, BaseException], Any] | None = None) -> Iterator[tuple[Any, Any]]:
        """``(item, job(model, item))`` for each of ``items``, in order."""
        for item in items:
            yield item, job(self._model(), item)

    def close(self) -> None:
        """Nothing to free (the model goes with the executor)."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(name: str, model: Any, *, ray_address: str | None = None, workers: int | None = None,
                  worker_cpus: float = 1.0) -> Executor:
    """The executor called ``name`` (:data:`EXECUTORS`) for ``model``; ``ray_address``, ``workers`` and
    ``worker_cpus`` are the Ray executor's (:class:`~knlens.sweeps.ray_executor.RayExecutor`). Ray is imported
    only here, only for ``"ray"``."""
    if name == "local":
        given = [opt for opt, v in (("ray_address", ray_address), ("workers", workers)) if v is not None]
        if given or worker_cpus != 1:
            raise SweepError(f"{', '.join(given) or 'worker_cpus'} applies to the ray executor only (the local "
                             f"executor runs one task at a time in this process)")
        return LocalExecutor(model)
    if name == "ray":
        from knlens.sweeps.ray_executor import RayExecutor

        return RayExecutor(model, address=ray_address, workers=workers, worker_cpus=worker_cpus)
    raise SweepError(f"unknown executor {name!r}; a sweep runs on: {', '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------ the sweep's jobs

@dataclass(frozen=True)
class Outcome:
    """How one attempt of ``task`` ended: its ``result``, or its ``failure``; when it started (UTC) and how
    long it took. Pickled (to travel from a worker), the result goes as the files of its own ``save(dir)``
    and comes back through its type's ``load``: the result contract, never a pickle of the result."""

    task: Task
    started: dt.datetime
    seconds: float
    result: Any = None
    failure: Failure | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        files = None
        if self.result is not None:
            with tempfile.TemporaryDirectory() as d:
                self.result.save(d)
                files = {p.relative_to(d).as_posix(): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}
        return _unpickle, (self.task, self.started, self.seconds, self.failure, files)


def _unpickle(task: Task, started: dt.datetime, seconds: float, failure: Failure | None,
              files: dict[str, bytes] | None) -> Outcome:
    if files is None:
        return Outcome(task, started, seconds, failure=failure)
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / name).write_bytes(data)
        return Outcome(task, started, seconds, result=load_result(d), failure=failure)


def attempt(study: str | Study, model: Any, task: Task) -> Outcome:
    """Run ``task`` with ``model``: its result, or its error with the traceback (any exception of the study;
    Ctrl-C stops the sweep). The job every executor runs for a sweep."""
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    try:
        result = get_study(study)(model, task.fact, task.settings)
    except Exception as err:  # recorded with its traceback, never dropped
        return Outcome(task, started, time.perf_counter() - clock, failure=Failure.of(err))
    return Outcome(task, started, time.perf_counter() - clock, result=result)


def lost(task: Task, error: BaseException) -> Outcome:
    """The outcome of ``task`` when its worker could not finish it (``on_error`` of a sweep's map): failed with
    that error, so that ``retry_failed`` runs it again."""
    return Outcome(task, dt.datetime.now(dt.timezone.utc), 0.0, failure=Failure.of(error))


def is_known(model: Any, fact: Fact) -> bool:
    """Does ``model`` answer ``fact`` on every prompt (:func:`knlens.known_facts`)? The job of ``known_only``."""
    return bool(known_facts(model, [fact]))

