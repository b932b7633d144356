"""Where and in which precision a computation runs: the model's device and dtype, moving it for a call,
autocast for a lower precision.

>>> resolve_dtype("bf16")
torch.bfloat16
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from knlens.core.errors import SettingsError

__all__ = ["resolve_dtype", "model_device", "model_dtype", "precision_and_place"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise SettingsError(f"unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[key]


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device(getattr(model.cfg, "device", None) or "cpu")


def model_dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return getattr(model.cfg, "dtype", torch.float32)


@contextlib.contextmanager
def precision_and_place(model: Any, device: str | torch.device | None, dtype: torch.dtype | None
                         ) -> Iterator[torch.device]:
    """Run on ``device`` (moving the model there for the call, and back) in ``dtype`` (autocast)."""
    home = model_device(model)
    target = home if device is None else torch.device(device)
    moved = target != home and not (target.type == home.type and target.index is None)
    if moved:
        model.to(target)
    try:
        if dtype is None or dtype == model_dtype(model):
            yield target
        else:
            with torch.autocast(device_type=target.type, dtype=dtype):
                yield target
    finally:
        if moved:
            model.to(home)
