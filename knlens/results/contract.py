"""The contract every knlens result keeps: a frozen dataclass with a settings dataclass, ``to_frame()``,
``plot()``, ``save(dir)`` / ``load(dir)`` that round-trip exactly, and a content ``key``.

``save`` writes two files: ``result.json`` (the fields, numbers and strings as JSON; the result's type
and the knlens version) and ``tensors.safetensors`` (every tensor, and every numeric column of a table,
bit for bit). Nothing is pickled: ``load`` rebuilds only dataclasses defined in knlens. Fields may hold
tensors, DataFrames, :class:`~knlens.core.neurons.NeuronSet`, dataclasses (settings, nested results,
facts), tuples, lists, dicts with string keys, strings, numbers, booleans and None.

The ``key`` (``study/fact/settings-hash``) names the result by its content: the same study on the same
fact with the same settings gives the same key, so a results store can skip work already done.

>>> import dataclasses, tempfile, torch
>>> @dataclasses.dataclass(frozen=True)
... class Settings:
...     steps: int = 4
>>> @dataclasses.dataclass(frozen=True, eq=False)
... class Scores(Result):
...     study = "example"
...     prompt: str
...     scores: torch.Tensor
...     settings: Settings = Settings()
>>> r = Scores("the capital of france is", torch.arange(3.0))
>>> with tempfile.TemporaryDirectory() as d:
...     same(Scores.load(r.save(d)), r)
True
>>> r.key.startswith("example/the-capital-of-france-is/")
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from knlens.core.errors import OutputError, ResultFormatError
from knlens.core.neurons import NeuronSet
from knlens.core.versions import __version__

__all__ = ["Result", "TableResult", "RESULT_JSON", "RESULT_TENSORS", "save_result", "load_result", "same", "content_key",
           "settings_hash", "encode_value", "slug"]

RESULT_JSON = "result.json"
RESULT_TENSORS = "tensors.safetensors"
R = TypeVar("R", bound="Result")
_CLASSES: dict[str, type] = {}  # dataclasses met while saving in this process, by module:qualname


def _ours(module: str) -> bool:
    """Whether results may hold dataclasses of ``module``: knlens' own, or a script's / doctest's."""
    return module.startswith("knlens") or module == "__main__" or "doctest" in module


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Result:
    """Base of every result: a frozen dataclass (``@dataclass(frozen=True, eq=False)``) whose subclasses
    set ``study`` and have a ``settings`` field; ``to_frame`` and ``plot`` are theirs to define."""

    study: ClassVar[str] = "result"

    def to_frame(self) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} has no table")

    def plot(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no figure")

    def save(self, directory: str | Path) -> Path:
        """Write ``result.json`` and ``tensors.safetensors`` into ``directory`` (created); returns it."""
        return save_result(self, directory)

    @classmethod
    def load(cls: type[R], directory: str | Path) -> R:
        """The result saved in ``directory``, equal to the one saved (see :func:`same`)."""
        return load_result(directory, cls)

    @property
    def key(self) -> str:
        """``study/fact/settings-hash``: the same study, fact and settings give the same key."""
        return content_key(self.study, _fact_id(self), getattr(self, "settings", None))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and same(self, other)

    __hash__ = None  # type: ignore[assignment]


class TableResult(Result):
    """A result whose table is its ``frame`` field: ``to_frame()`` returns a copy of it."""

    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """A copy of the table (``frame``)."""
        return self.frame.copy()


# ------------------------------------------------------------------------------------------- keys

def slug(text: str) -> str:
    """``text`` as the fact part of a key: lower-case letters, digits and dashes, at most 60 characters.

    >>> slug("The capital of France is")
    'the-capital-of-france-is'
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "-"


def _fact_id(result: Any) -> str:
    """The input a result is about: its fact (or prompt, or name); for a result over several facts, their
    count and a hash of their names (from a ``facts`` field or a table's ``fact`` column)."""
    for attr in ("fact", "prompt", "name"):
        value = getattr(result, attr, None)
        if value is not None:
            return slug(getattr(value, "name", None) or str(getattr(value, "prompts", [value])[0]))
    names: list[str] = [str(getattr(f, "name", None) or getattr(f, "prompt", f)) for f in getattr(result, "facts", ())]
    frame = getattr(result, "frame", None)
    if not names and isinstance(frame, pd.DataFrame) and "fact" in frame:
        names = [str(x) for x in dict.fromkeys(frame["fact"].tolist())]
    if not names:
        return "-"
    if len(names) == 1:
        return slug(names[0])
    return f"{len(names)}-facts-{hashlib.sha256(chr(10).join(names).encode()).hexdigest()[:8]}"


def settings_hash(settings: Any) -> str:
    """A stable hash (16 hex digits) of settings: a dataclass, a dict or None. Versions are left out, so
    that one setting run under another library version keeps its key (the versions stay in the result)."""
    blob, _ = encode_value(settings, "settings")
    if isinstance(blob, dict):
        blob = {k: v for k, v in blob.get("fields", blob).items() if k not in ("versions", "knlens_version")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_key(study: str, fact_id: str, settings: Any) -> str:
    """The key a results store files a result under.

    >>> content_key("locate", "capital-france", {"steps": 20})
    'locate/capital-france/f04c9d0e6b599836'
    """
    return f"{study}/{fact_id}/{settings_hash(settings)}"


# --------------------------------------------------------------------------------------- encoding

def encode_value(value: Any, path: str, tensors: dict[str, Tensor] | None = None) -> tuple[Any, dict[str, Tensor]]:
    """``value`` as JSON, with its tensors (and numeric table columns) moved into ``tensors`` by path."""
    tensors = {} if tensors is None else tensors
    return _encode(value, path, tensors), tensors


def _encode(v: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return _encode(v.item(), path, tensors)
    if isinstance(v, Tensor):
        tensors[path] = v.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(v, NeuronSet):
        return {"__neurons__": [[int(layer), int(i)] for layer, i in v]}
    if isinstance(v, pd.DataFrame):
        return _encode_frame(v, path, tensors)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        cls = type(v)
        if not _ours(cls.__module__):
            raise OutputError(f"cannot save a {cls.__module__}.{cls.__qualname__}: only knlens dataclasses are saved")
        _CLASSES[_name(cls)] = cls
        return {"__dataclass__": _name(cls),
                "fields": {f.name: _encode(getattr(v, f.name), f"{path}.{f.name}", tensors)
                           for f in dataclasses.fields(v) if f.init}}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x, f"{path}.{i}", tensors) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_encode(x, f"{path}.{i}", tensors) for i, x in enumerate(v)]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            return {"__items__": [[_encode(k, f"{path}.k{i}", tensors), _encode(x, f"{path}.v{i}", tensors)]
                                  for i, (k, x) in enumerate(v.items())]}
        return {"__dict__": {k: _encode(x, f"{path}.{k}", tensors) for k, x in v.items()}}
    raise OutputError(f"cannot save {path}: a {type(v).__name__} is not a value results hold")


def _encode_frame(frame: pd.DataFrame, path: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0 or frame.index.step != 1:
        frame = frame.reset_index()
        index = True
    else:
        index = False
    columns = []
    for i, name in enumerate(frame.columns):
        col = frame[name]
        kind = col.dtype.kind
        if kind in "biuf":
            key = f"{path}.column{i}"
            tensors[key] = torch.from_numpy(col.to_numpy().copy())
            columns.append({"name": _encode(name, path, tensors), "dtype": str(col.dtype), "tensor": key})
        else:
            values = [_encode(x, f"{path}.column{i}.{j}", tensors) for j, x in enumerate(col.tolist())]
            columns.append({"name": _encode(name, path, tensors), "dtype": str(col.dtype), "values": values})
    return {"__frame__": {"columns": columns, "index": index, "rows": len(frame)}}


# --------------------------------------------------------------------------------------- decoding

def _decode(v: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if "__float__" in v:
        return float(v["__float__"])
    if "__tensor__" in v:
        return tensors[v["__tensor__"]]
    if "__neurons__" in v:
        return NeuronSet([tuple(x) for x in v["__neurons__"]])
    if "__tuple__" in v:
        return tuple(_decode(x, tensors) for x in v["__tuple__"])
    if "__dict__" in v:
        return {k: _decode(x, tensors) for k, x in v["__dict__"].items()}
    if "__items__" in v:
        return {_decode(k, tensors): _decode(x, tensors) for k, x in v["__items__"]}
    if "__frame__" in v:
        return _decode_frame(v["__frame__"], tensors)
    if "__dataclass__" in v:
        return _class(v["__dataclass__"])(**{k: _decode(x, tensors) for k, x in v["fields"].items()})
    raise ResultFormatError(f"unknown entry in a saved result: {sorted(v)}")


def _decode_frame(spec: dict[str, Any], tensors: dict[str, Tensor]) -> pd.DataFrame:
    data = {}
    for col in spec["columns"]:
        name = _decode(col["name"], tensors)
        if "tensor" in col:
            data[name] = pd.Series(tensors[col["tensor"]].numpy(), dtype=col["dtype"])
        else:
            values = [_decode(x, tensors) for x in col["values"]]
            data[name] = pd.Series(values, dtype=col["dtype"] if col["dtype"] != "object" else object)
    frame = pd.DataFrame(data, index=pd.RangeIndex(spec["rows"]))
    if spec["index"]:
        frame = frame.set_index(frame.columns[0])
        if frame.index.name == "index":
            frame.index.name = None
    return frame


def _class(name: str) -> type:
    """The dataclass a saved result names (``module:qualname``): one met while saving in this process, or
    one imported from knlens (never from elsewhere)."""
    if name in _CLASSES:
        return _CLASSES[name]
    module, _, qualname = name.partition(":")
    if not _ours(module):
        raise ResultFormatError(f"a saved result names {name!r}, which is not a knlens class")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ResultFormatError(f"a saved result names {name!r}, which this knlens does not have") from err
    return obj


# ----------------------------------------------------------------------------------- save and load

def save_result(result: Any, directory: str | Path) -> Path:
    """Write ``result`` (a dataclass) as ``result.json`` + ``tensors.safetensors`` into ``directory``."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write a result to {str(d)!r}: {err.strerror or err}") from err
    body, tensors = encode_value(result, "result")
    doc = {"format": "knlens-result/1", "knlens_version": __version__, "type": body["__dataclass__"],
           "key": getattr(result, "key", None), "result": body}
    (d / RESULT_JSON).write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False))
    save_file(tensors, str(d / RESULT_TENSORS))
    return d


def load_result(directory: str | Path, cls: type | None = None) -> Any:
    """The result saved in ``directory`` by :func:`save_result`; with ``cls``, it must be of that type."""
    d = Path(directory)
    if not (d / RESULT_JSON).is_file():
        raise ResultFormatError(f"{str(d)!r} holds no saved result (no {RESULT_JSON})")
    doc = json.loads((d / RESULT_JSON).read_text())
    if doc.get("format") != "knlens-result/1":
        raise ResultFormatError(f"{str(d / RESULT_JSON)!r} is not a knlens result (format {doc.get('format')!r})")
    tensors = load_file(str(d / RESULT_TENSORS)) if (d / RESULT_TENSORS).is_file() else {}
    result = _decode(doc["result"], tensors)
    if cls is not None and not isinstance(result, cls):
        raise ResultFormatError(f"{str(d)!r} holds a {type(result).__name__}, not a {cls.__name__}")
    return result


def same(a: Any, b: Any) -> bool:
    """Exact equality of result values: tensors (dtype, shape, bits), tables (columns, dtypes, values;
    NaN equals NaN), neuron sets, dataclasses field by field, containers item by item."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a.cpu(), b.cpu()) or torch.equal(a.isnan(), b.isnan())
                         and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))))
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        if not (isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame)):
            return False
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError:
            return False
        return True
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a) if f.init)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)
