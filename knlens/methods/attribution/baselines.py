"""Baselines of integrated gradients: the point ``b`` the path ``b + α(a − b)`` starts from.

A baseline is one of

* ``"zero"`` — ``b = 0`` (Dai et al.; the default);
* a tensor ``[layer, d]`` — the same ``b`` for every query row (e.g. mean activations over a corpus);
* a function — ``b`` computed per query row from the model, the row (its tokens and target position),
  the hook names and the row's clean activations ``[layer, d]``: baselines adapted to an architecture or
  to the token (AMIG-style) slot in here without touching the IG loop.

>>> import torch
>>> from knlens import load_model, integrated_gradients
>>> model = load_model("tiny-llama")
>>> def half(model, row, names, clean):           # a baseline function: half of each clean activation
...     return clean / 2
>>> a = integrated_gradients(model, "the capital of france is", " paris", steps=8, baseline=half)
>>> a.settings.baseline
'function half'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import HookShapeError, NonFiniteError, SettingsError
from knlens.core.tokens import Queries

__all__ = ["Baseline", "BaselineFunction", "baseline_values", "check_baseline", "describe_baseline"]


BaselineFunction = Callable[[Any, Queries, list[str], Float[Tensor, "layer d"]], Float[Tensor, "layer d"]]
"""``fn(model, row, names, clean) -> b``: the baseline ``[layer, d]`` of one query row, given its clean
activations ``clean`` ``[layer, d]`` at the hook points ``names``."""


Baseline = Union[Literal["zero"], Float[Tensor, "layer d"], BaselineFunction]


def check_baseline(baseline: Baseline, n_layers: int, d: int) -> None:
    """Raise a specific :class:`~knlens.core.errors.KnlensError` for a baseline that cannot be used."""
    if isinstance(baseline, str):
        if baseline != "zero":
            raise SettingsError(f"unknown baseline {baseline!r}; use 'zero', a [layer, d] tensor or a function")
    elif isinstance(baseline, Tensor):
        _check_values(baseline, n_layers, d, "baseline")
    elif not callable(baseline):
        raise SettingsError(f"a baseline is 'zero', a [layer, d] tensor or a function, got {type(baseline).__name__}")


def _check_values(values: Tensor, n_layers: int, d: int, what: str) -> None:
    if tuple(values.shape) != (n_layers, d):
        raise HookShapeError(f"{what} has shape {tuple(values.shape)}, expected [layers={n_layers}, d={d}]")
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"the {what} has non-finite values (NaN or inf): every path point would be too")


def baseline_values(baseline: Baseline, model: Any, row: Queries, names: list[str],
                    clean: Float[Tensor, "layer d"]) -> Float[Tensor, "layer d"]:
    """The baseline of one row, in ``clean``'s dtype and on its device; a function's output is checked."""
    if isinstance(baseline, str):
        return torch.zeros_like(clean)
    if isinstance(baseline, Tensor):
        return baseline.to(clean)
    values = baseline(model, row, names, clean)
    if not isinstance(values, Tensor):
        raise SettingsError(f"the baseline function returned {type(values).__name__}, not a tensor")
    _check_values(values, *clean.shape, "baseline function's output")
    return values.detach().to(clean)


def describe_baseline(baseline: Baseline) -> str:
    """How a baseline is recorded in the settings: ``"zero"``, ``"custom tensor"`` or ``"function <name>"``.

    >>> describe_baseline("zero"), describe_baseline(torch.zeros(2, 4))
    ('zero', 'custom tensor')
    """
    if isinstance(baseline, str):
        return baseline
    if isinstance(baseline, Tensor):
        return "custom tensor"
    return f"function {getattr(baseline, '__qualname__', type(baseline).__name__)}"
