"""Run a study over many facts into a results store: one task per (study, fact, model, settings), filed
under its content key as soon as it finishes, so that a sweep killed at any point resumes where it stopped.

>>> import tempfile, knlens
>>> facts = [knlens.Fact(["the capital of france is"], " paris", subject="france", name="fr"),
...          knlens.Fact(["the capital of spain is"], " madrid", subject="spain", name="es")]
>>> with tempfile.TemporaryDirectory() as d:
...     first = sweep("trace", facts, "tiny-llama", d, settings={"samples": 1, "known_only": False}, progress=False)
...     again = sweep("trace", facts, "tiny-llama", d, settings={"samples": 1, "known_only": False}, progress=False)
>>> (first.ran, first.failed), (again.ran, again.skipped)
((2, 0), (0, 2))
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from knlens.core.facts import Fact
from knlens.core.versions import __version__
from knlens.store.store import Store
from knlens.store.task import Task
from knlens.sweeps.executors import Executor, attempt, is_known, lost, make_executor
from knlens.sweeps.plan import Study, dedupe, get_study

__all__ = ["SweepReport", "sweep", "retry_failed", "run_tasks"]


@dataclass(frozen=True)
class SweepReport:
    """What a sweep did: ``ran`` tasks now (``done`` of them stored, ``failed`` recorded with their error),
    ``skipped`` already stored, ``failed_skipped`` that failed before and were not retried; ``keys`` of every
    task of the sweep, in order."""

    store: Path
    ran: int
    done: int
    failed: int
    skipped: int
    failed_skipped: int
    keys: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        """One line: what ran, what was stored before, what failed."""
        text = (f"{self.done} stored, {self.failed} failed, {self.skipped} already stored"
                f" ({len(self.keys)} tasks, {self.seconds:.1f} s) in {self.store}")
        if self.failed_skipped:
            text += f"; {self.failed_skipped} failed before and not retried (retry_failed / --retry-failed)"
        return text


class _Progress:
    """``[i/n]`` lines with the mean time per task and an ETA, on ``stream`` (stderr)."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.seconds, self.n = total, stream, 0.0, 0

    def __call__(self, task: Task, status: str, seconds: float) -> None:
        self.n += 1
        self.seconds += seconds
        if self.stream is None:
            return
        left = (self.total - self.n) * self.seconds / self.n
        print(f"[{self.n}/{self.total}] {status:6s} {task.key}  {seconds:.1f} s  eta {_eta(left)}", file=self.stream,
              flush=True)


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _model_name(model: Any) -> str:
    return model if isinstance(model, str) else str(getattr(getattr(model, "cfg", None), "model_name", "?"))


def run_tasks(tasks: Sequence[Task], store: Store, study: Study, executor: Executor, *,
              progress: bool = True, stream: TextIO | None = None) -> tuple[int, int]:
    """Run ``tasks`` on ``executor`` (:func:`~knlens.sweeps.executors.attempt` on its model) and file each in
    ``store`` as it ends: its result, or its error (an exception of the study, or a worker lost under it; Ctrl-C
    and errors of the store itself stop the sweep). ``(done, failed)``."""
    bar = _Progress(len(tasks), (stream or sys.stderr) if progress else None)
    done = failed = 0
    for _, out in executor.map(functools.partial(attempt, study), tasks, on_error=lost):
        store.put(out.task, result=out.result, error=out.failure, started=out.started, seconds=out.seconds)
        done, failed = done + (out.failure is None), failed + (out.failure is not None)
        bar(out.task, "done" if out.failure is None else "failed", out.seconds)
    return done, failed


def sweep(study: str | Study, facts: Sequence[Fact], model: Any, store: Store | str | os.PathLike[str], *,
          settings: Mapping[str, Any] | None = None, known_only: bool = False, retry_failed: bool = False,
          progress: bool = True, stream: TextIO | None = None, executor: str = "local",
          ray_address: str | None = None, workers: int | None = None, worker_cpus: float = 1.0) -> SweepReport:
    """Run ``study`` (``"locate"``, ``"trace"`` or a :class:`~knlens.sweeps.plan.Study`) on each of ``facts``
    with ``model`` (a name for :func:`knlens.load_model`, loaded only when a task runs, or a loaded model) and
    ``settings`` (the study's keyword arguments), into ``store`` (a :class:`~knlens.store.Store` or its folder).

    Tasks whose key is stored are skipped; tasks that failed before are skipped too unless ``retry_failed``.
    A failing task is recorded in the store with its error and the sweep goes on. ``known_only`` keeps the
    facts the model answers on every prompt (:func:`knlens.known_facts`; it loads the model). Progress with an
    ETA goes to ``stream`` (stderr) unless ``progress`` is False.

    ``executor="ray"`` runs the tasks on ``workers`` Ray actors of ``worker_cpus`` CPUs each, at ``ray_address``
    (checked before any work) or on a Ray started here (:class:`~knlens.sweeps.ray_executor.RayExecutor`;
    ``model`` must then be a name); this process files every result in ``store`` as they end.
    """
    clock = time.perf_counter()
    spec = get_study(study)
    settings = spec.check(settings or {})
    store = store if isinstance(store, Store) else Store(store)
    facts = dedupe(facts)
    with make_executor(executor, model, ray_address=ray_address, workers=workers, worker_cpus=worker_cpus) as ex:
        if known_only:
            known = {fact for fact, ok in ex.map(is_known, facts) if ok}
            facts = [f for f in facts if f in known]
        tasks = [Task(spec.name, f, _model_name(model), settings) for f in facts]
        latest = store.tasks().set_index("key")["status"].to_dict()
        todo = [t for t in tasks if latest.get(t.key) is None or (latest[t.key] == "failed" and retry_failed)]
        skipped = sum(latest.get(t.key) == "done" for t in tasks)
        if progress and (skipped or len(todo) < len(tasks)):
            print(f"sweep {spec.name}: {len(tasks)} tasks, {skipped} already stored, {len(todo)} to run",
                  file=stream or sys.stderr, flush=True)
        done, failed = run_tasks(todo, store, spec, ex, progress=progress, stream=stream)
    return SweepReport(store.path, len(todo), done, failed, skipped, len(tasks) - skipped - len(todo),
                       tuple(t.key for t in tasks), time.perf_counter() - clock)


def retry_failed(store: Store | str | os.PathLike[str], model: Any = None, *,
                 studies: Mapping[str, Study] | None = None, progress: bool = True,
                 stream: TextIO | None = None, executor: str = "local", ray_address: str | None = None,
                 workers: int | None = None, worker_cpus: float = 1.0) -> SweepReport:
    """Run again every task of ``store`` whose attempts all failed (of this knlens version), rebuilt from its
    row (study, fact, model name, settings); ``model`` overrides the loading of the recorded model name
    (pass the loaded model), ``studies`` adds studies not among :data:`~knlens.sweeps.plan.STUDIES`; the
    executor and its options as for :func:`sweep`."""
    clock = time.perf_counter()
    store = store if isinstance(store, Store) else Store(store)
    rows = store.sql("select * from tasks where status = 'failed'")
    rows = rows[rows.knlens_version == __version__]
    done = failed = 0
    keys: list[str] = []
    for (study_name, model_name), group in rows.groupby(["study", "model"], sort=True):
        spec = (studies or {}).get(study_name) or get_study(study_name)
        tasks = [Task.from_row(r) for r in group.to_dict("records")]
        keys += [t.key for t in tasks]
        with make_executor(executor, model if model is not None else model_name, ray_address=ray_address,
                           workers=workers, worker_cpus=worker_cpus) as ex:
            d, f = run_tasks(tasks, store, spec, ex, progress=progress, stream=stream)
        done, failed = done + d, failed + f
    return SweepReport(store.path, len(keys), done, failed, 0, 0, tuple(keys), time.perf_counter() - clock)
