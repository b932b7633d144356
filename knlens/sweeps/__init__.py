"""Sweeps: a study over a data set into a results store (:func:`~knlens.sweeps.sweep.sweep`), resumable
after a crash or a kill, failures recorded and retried on request."""

from knlens.sweeps.plan import STUDIES, Study, get_study, read_facts
from knlens.sweeps.sweep import SweepReport, retry_failed, run_tasks, sweep

__all__ = ["STUDIES", "Study", "SweepReport", "get_study", "read_facts", "retry_failed", "run_tasks", "sweep"]
