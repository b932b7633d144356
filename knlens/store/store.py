"""A results store: every task attempt filed by its content key, written atomically, queryable with SQL.

>>> import tempfile, torch, knlens
>>> from knlens.store.task import Task
>>> model = knlens.load_model("tiny-llama")
>>> fact = knlens.Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france",
...                    name="fr")
>>> with tempfile.TemporaryDirectory() as d:
...     store = Store(d)
...     task = Task("trace", fact, "tiny-llama", {"samples": 1})
...     _ = store.put(task, result=knlens.trace(model, fact, samples=1, known_only=False))
...     again = Store(d)
...     n = again.sql("select count(*) as n from tasks where status = 'done'").n[0]
...     int(n), type(again.load(task.key)).__name__, task.key in again
(1, 'Trace', True)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import traceback as tb
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from knlens.core.errors import OutputError, QueryError, SettingsError, StoreFormatError
from knlens.core.versions import __version__
from knlens.results.contract import load_result
from knlens.store.files import (MARKER, SCHEMA, STORE_FORMAT, TABLE_FILE, TASK_FILE, clean_tmp, frame_table,
                                fsync_tree, new_tmp_dir, publish, read_rows, row_table)
from knlens.store.task import Task

__all__ = ["Failure", "Store", "StoreProblemWarning"]

_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]*/[a-z0-9-]+/[0-9a-f]{16}$")
_LATEST = "qualify row_number() over (partition by key order by status = 'done' desc, finished desc, attempt desc) = 1"


class StoreProblemWarning(UserWarning):
    """A file in a store that is not a readable row file (corrupt, foreign): it is ignored and its task
    counts as not done, so a sweep runs it again."""


@dataclass(frozen=True)
class Failure:
    """How an attempt failed, as text: ``error`` (one line, ``Type: message``) and its ``traceback``. Text
    travels where an exception's traceback cannot (from another process or machine).

    >>> try:
    ...     raise RuntimeError("no  luck\\nhere")
    ... except RuntimeError as err:
    ...     f = Failure.of(err)
    >>> f.error, f.traceback.startswith("Traceback")
    ('RuntimeError: no luck here', True)
    """

    error: str
    traceback: str

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        """``error`` with the traceback it carries."""
        return cls(f"{type(error).__name__}: {' '.join(str(error).split())}",
                   "".join(tb.format_exception(type(error), error, error.__traceback__)))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


class Store:
    """The results store in folder ``path`` (created when missing, unless ``create=False``).

    A folder that holds something else, or a store of another format, is a
    :class:`~knlens.core.errors.StoreFormatError`. Opening a store for writing removes the half-written
    attempts of killed processes.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        self._problems: list[str] = []
        marker = self.path / MARKER
        if self.path.exists() and not self.path.is_dir():
            raise StoreFormatError(f"store {str(self.path)!r} is a file, not a folder")
        if marker.is_file():
            try:
                fmt = json.loads(marker.read_text()).get("format")
            except (OSError, ValueError, AttributeError):
                fmt = None
            if fmt != STORE_FORMAT:
                raise StoreFormatError(f"{str(self.path)!r} is a results store of another format ({fmt!r}); this "
                                       f"knlens reads {STORE_FORMAT!r}: use a new folder")
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise StoreFormatError(f"{str(self.path)!r} is not a knlens results store (no {MARKER}) and not empty: "
                                   f"use a new or empty folder")
        elif not create:
            raise StoreFormatError(f"no results store at {str(self.path)!r}")
        else:
            self._init()
        if create:
            clean_tmp(self.path)

    def _init(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = new_tmp_dir(self.path)
            (tmp / MARKER).write_text(json.dumps({"format": STORE_FORMAT, "created_by": f"knlens {__version__}"}))
            fsync_tree(tmp)
            os.replace(tmp / MARKER, self.path / MARKER)
            tmp.rmdir()
        except OSError as err:
            raise OutputError(f"cannot create a results store at {str(self.path)!r}: {err.strerror or err}") from err

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ------------------------------------------------------------------------------------ writing

    def put(self, task: Task, *, result: Any = None, error: BaseException | Failure | None = None,
            started: dt.datetime | None = None, seconds: float | None = None) -> Path:
        """File one attempt of ``task``, atomically: with ``result`` (status ``done``: its ``save(dir)``, its
        table, one row) or with ``error`` (status ``failed``: the error and its traceback, an exception or a
        :class:`Failure`). The folder."""
        if (result is None) == (error is None):
            raise SettingsError("put takes either result= or error=, not both or neither")
        finished = _now()
        started = started or finished
        attempt = f"{finished:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
        final = self.path / "tasks" / task.key / attempt
        row = {**task.row(), "status": "done" if error is None else "failed", "attempt": attempt,
               "started": started, "finished": finished,
               "seconds": (finished - started).total_seconds() if seconds is None else seconds,
               "path": final.relative_to(self.path).as_posix()}
        try:
            tmp = new_tmp_dir(self.path)
            if error is not None:
                failure = error if isinstance(error, Failure) else Failure.of(error)
                row.update(error=failure.error, traceback=failure.traceback)
            else:
                result.save(tmp)
                row.update(result_key=getattr(result, "key", None), result_type=type(result).__name__)
                timings = getattr(result, "timings", None)
                row["timings"] = json.dumps(timings) if isinstance(timings, dict) else None
                try:
                    frame = result.to_frame()
                except NotImplementedError:
                    frame = None
                if isinstance(frame, pd.DataFrame):
                    pq.write_table(frame_table(frame, task.key), tmp / TABLE_FILE)
            pq.write_table(row_table(row), tmp / TASK_FILE)
            publish(tmp, final)
        except OSError as err:
            raise OutputError(f"cannot write to the results store {str(self.path)!r}: {err.strerror or err}") from err
        return final

    # ------------------------------------------------------------------------------------ reading

    def _rows(self) -> dict[Path, pa.Table]:
        """The readable row files with their rows (each file read once); the others are reported
        (:meth:`problems`, a warning) and ignored."""
        root = self.path / "tasks"
        good: dict[Path, pa.Table] = {}
        problems: list[str] = []
        for f in sorted(root.rglob("*.parquet")) if root.is_dir() else []:
            if f.name == TABLE_FILE:
                continue
            rel = f.relative_to(self.path).as_posix()
            if f.name != TASK_FILE or len(f.relative_to(root).parts) != 5:
                problems.append(f"{rel}: a Parquet file that is not part of the store (ignored)")
                continue
            try:
                good[f] = read_rows(f)
            except (OSError, ValueError, pa.ArrowException) as err:
                key = "/".join(f.relative_to(root).parts[:3])
                problems.append(f"{rel}: unreadable ({' '.join(str(err).split())[:200]}); task {key} counts as not "
                                f"done and runs again")
        if problems and problems != self._problems:
            warnings.warn(f"results store {str(self.path)!r}: " + "; ".join(problems), StoreProblemWarning,
                          stacklevel=3)
        self._problems = problems
        return good

    def problems(self) -> list[str]:
        """The files the last read ignored (corrupt or foreign Parquet), each with what was done about it."""
        self._rows()
        return list(self._problems)

    def attempts(self) -> pd.DataFrame:
        """Every task attempt, one row each (:data:`~knlens.store.files.SCHEMA`), oldest first."""
        rows = self._rows()
        table = pa.concat_tables(list(rows.values())) if rows else SCHEMA.empty_table()
        return table.to_pandas().sort_values(["finished", "attempt"], ignore_index=True)

    def tasks(self) -> pd.DataFrame:
        """One row per key: its ``done`` attempt, or else its latest failed one."""
        return self.sql("select * from tasks order by key")

    def failed(self) -> pd.DataFrame:
        """The tasks whose every attempt failed, with their latest error."""
        return self.sql("select key, study, fact, model, error, finished from tasks where status = 'failed' "
                        "order by key")

    def done_keys(self) -> set[str]:
        """The keys with a stored result."""
        a = self.attempts()
        return set(a.loc[a.status == "done", "key"])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.done_keys()

    def __len__(self) -> int:
        return len(self.done_keys())

    def result_dir(self, key: str) -> Path:
        """The folder of ``key``'s stored result (:class:`~knlens.core.errors.StoreFormatError` when none)."""
        if not _KEY.match(key):
            raise StoreFormatError(f"{key!r} is not a result key (study/fact/hash)")
        a = self.attempts()
        done = a[(a.key == key) & (a.status == "done")]
        if done.empty:
            raise StoreFormatError(f"no result stored under {key!r} in {str(self.path)!r}")
        return self.path / done.path.iloc[-1]

    def load(self, key: str) -> Any:
        """The result stored under ``key``, as its type's ``load`` gives it."""
        return load_result(self.result_dir(key))

    # ---------------------------------------------------------------------------------------- SQL

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with views over the store's Parquet files, read in place:
        ``attempts`` (every attempt), ``tasks`` (one row per key, as :meth:`tasks`) and, per study,
        ``<study>_rows`` (the tables of its stored results, ``key`` first; ``-`` in a study's name is ``_``)."""
        con = duckdb.connect()
        files = list(self._rows())
        if files:
            con.execute(f"create view attempts as select * from read_parquet({_sql_list(files)})")
        else:
            con.register("attempts_empty", SCHEMA.empty_table())
            con.execute("create view attempts as select * from attempts_empty")
        con.execute(f"create view tasks as select * from attempts {_LATEST}")
        done = con.execute("select study, path from tasks where status = 'done'").fetchall()
        by_study: dict[str, list[Path]] = {}
        for study, path in done:
            if (self.path / path / TABLE_FILE).is_file():
                by_study.setdefault(study, []).append(self.path / path / TABLE_FILE)
        for study, tables in by_study.items():
            name = re.sub(r"[^a-z0-9_]", "_", study.lower())
            con.execute(f"create view {name}_rows as select * from read_parquet({_sql_list(tables)}, "
                        f"union_by_name = true)")
        return con

    def sql(self, query: str) -> pd.DataFrame:
        """The result of an SQL ``query`` (DuckDB) over the views of :meth:`connect`, as a DataFrame.
        A query DuckDB cannot run is a :class:`~knlens.core.errors.QueryError`."""
        con = self.connect()
        try:
            return con.execute(query).df()
        except duckdb.Error as err:
            raise QueryError(f"{type(err).__name__}: {' '.join(str(err).split())}") from err
        finally:
            con.close()
