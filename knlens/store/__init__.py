"""The results store: task attempts filed by content key, written atomically, as Parquet rows plus each
result's own files, queryable in place with DuckDB (:class:`~knlens.store.store.Store`)."""

from knlens.store.files import SCHEMA, STORE_FORMAT
from knlens.store.store import Failure, Store, StoreProblemWarning
from knlens.store.task import Task

__all__ = ["SCHEMA", "STORE_FORMAT", "Failure", "Store", "StoreProblemWarning", "Task"]
