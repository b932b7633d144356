"""The files of a results store: its marker, the row schema, atomic writes, and reading rows back.

A store folder holds::

    store.json                                   {"format": "knlens-store/1", ...}
    tasks/<study>/<fact>/<hash>/<attempt>/task.parquet         one row (the schema below)
    tasks/<study>/<fact>/<hash>/<attempt>/result.json, tensors.safetensors   the result's own save(dir)
    tasks/<study>/<fact>/<hash>/<attempt>/table.parquet        the result's to_frame(), with its key
    .tmp/<pid>-<uuid>/                           an attempt being written (never read)

An attempt folder is written whole under ``.tmp``, its files and the folder fsynced, then renamed into
place: a reader sees all of it or nothing, so a process killed at any instant leaves no half-written task.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from knlens.core.errors import StoreFormatError

__all__ = ["STORE_FORMAT", "MARKER", "TASK_FILE", "TABLE_FILE", "SCHEMA", "row_table", "read_rows", "frame_table",
           "fsync_tree", "publish", "new_tmp_dir", "clean_tmp"]

STORE_FORMAT = "knlens-store/1"
MARKER = "store.json"
TASK_FILE = "task.parquet"
TABLE_FILE = "table.parquet"
TMP = ".tmp"
_META = {b"knlens-store": STORE_FORMAT.encode()}
_TS = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema([
    ("key", pa.string()), ("study", pa.string()), ("fact", pa.string()), ("relation", pa.string()),
    ("model", pa.string()), ("settings_hash", pa.string()), ("settings", pa.string()), ("fact_json", pa.string()),
    ("knlens_version", pa.string()), ("status", pa.string()), ("error", pa.string()), ("traceback", pa.string()),
    ("result_key", pa.string()), ("result_type", pa.string()), ("attempt", pa.string()), ("started", _TS),
    ("finished", _TS), ("seconds", pa.float64()), ("timings", pa.string()), ("path", pa.string()),
], metadata=_META)
"""One row per task attempt: what ran (key, study, fact, model, settings; ``settings_hash`` names the setting
group, the same for every fact run with one model, settings and knlens version), how it ended (status ``done`` or
``failed``, the error and traceback), when and how long, and where its files are (``path``, relative)."""


def row_table(row: dict) -> pa.Table:
    """``row`` (a dict with the schema's columns) as a one-row table of :data:`SCHEMA`.

    >>> row_table({"key": "locate/f/0", "status": "done", "seconds": 1.5}).num_rows
    1
    """
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names}], schema=SCHEMA)


def read_rows(path: Path) -> pa.Table:
    """The rows of one ``task.parquet``; :class:`~knlens.core.errors.StoreFormatError` when it is not a store row file (another schema, no
    store marker) and pyarrow's errors when it is not Parquet at all."""
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if meta.get(b"knlens-store") != _META[b"knlens-store"]:
        raise StoreFormatError(f"not a {STORE_FORMAT} row file (format {meta.get(b'knlens-store')!r})")
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise StoreFormatError(f"row file without the columns {missing}")
    return table.select(SCHEMA.names).cast(SCHEMA)


def frame_table(frame: pd.DataFrame, key: str) -> pa.Table:
    """A result's table with its ``key`` as first column; object columns that Arrow cannot type are
    written as text."""
    frame = frame.reset_index(drop=not isinstance(frame.index, pd.MultiIndex) and frame.index.name is None)
    frame.insert(0, "key", key) if "key" not in frame else frame.insert(0, "result_key", key)
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError):
        obj = frame.select_dtypes(include="object").columns
        return pa.Table.from_pandas(frame.astype({c: str for c in obj}), preserve_index=False)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_tmp_dir(root: Path) -> Path:
    """A fresh folder under ``root/.tmp`` named by this process id (stale ones are cleaned by
    :func:`clean_tmp`)."""
    d = root / TMP / f"{os.getpid()}-{uuid.uuid4().hex}"
    d.mkdir(parents=True)
    return d


def publish(tmp: Path, final: Path) -> None:
    """Rename the fully written ``tmp`` folder to ``final`` (which must not exist) after fsyncing it, then
    fsync ``final``'s parent: the attempt appears whole or not at all."""
    fsync_tree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, final)
    _fsync(final.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_tmp(root: Path) -> list[Path]:
    """Remove the half-written attempts under ``root/.tmp`` whose writing process is gone (killed); the
    folders removed."""
    removed = []
    for d in _children(root / TMP):
        pid = d.name.split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _children(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
