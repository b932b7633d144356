"""Sweeps: a study over a data set into a results store (:func:`~knlens.sweeps.sweep.sweep`), resumable
after a crash or a kill, failures recorded and retried on request; the tasks run here or on Ray workers
(:func:`~knlens.sweeps.executors.make_executor`)."""

from knlens.sweeps.executors import EXECUTORS, make_executor
from knlens.sweeps.plan import STUDIES, Study, get_study, read_facts
from knlens.sweeps.sweep import SweepReport, retry_failed, run_tasks, sweep

__all__ = ["EXECUTORS", "STUDIES", "Study", "SweepReport", "get_study", "make_executor", "read_facts", "retry_failed",
           "run_tasks", "sweep"]
