"""An edit as a value: which weights change, their old and new values, who made it, and for which model.

An :class:`Edit` is built without touching the model (every editor computes the new values first) and is
then applied and undone exactly:

* ``edit.apply(model)`` writes the new values and returns a handle; ``with edit.apply(model): ...`` undoes on
  every exit, errors included; ``edit.undo(model)`` undoes explicitly. Undo writes the saved old values back,
  so the model is bit-identical afterwards.
* It refuses to apply to a model whose weights are not the ones it was made for (``fingerprint``, a SHA-256
  of every parameter: :class:`~knlens.core.errors.EditModelError`), to apply twice, or to undo when it is
  not applied or when its weights changed since (:class:`~knlens.core.errors.EditStateError`).
* An edit whose new values equal the old ones is refused when it is built
  (:class:`~knlens.core.errors.NoOpEditError`).
* If writing fails half-way, the slices already written are restored before the error propagates.
* ``save(dir)`` / ``Edit.load(dir)``: the changed slices as safetensors and the rest as JSON (the result
  contract's two files).

>>> import torch
>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> name = "lm_head._original_component.weight"
>>> edit = make_edit(model, "example", {}, [(name, 0, torch.tensor([5]), torch.zeros(1, 32))])
>>> before = fingerprint(model)
>>> with edit.apply(model):
...     fingerprint(model) != before
True
>>> fingerprint(model) == before
True
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from knlens.core.errors import EditModelError, EditStateError, NoOpEditError, NonFiniteError, SameTargetError
from knlens.core.tokens import target_tokens
from knlens.results.contract import load_result, save_result

__all__ = ["WeightSlice", "Edit", "AppliedEdit", "fingerprint", "make_edit", "model_name", "check_finite",
           "check_new_target"]

_APPLIED: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()  # model -> digests applied


def _bytes(t: Tensor) -> memoryview | bytes:
    """The bytes of ``t``'s values in row-major order (any dtype, any strides), without a copy when it can."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""


def fingerprint(model: Any) -> str:
    """SHA-256 (hex) of every parameter of ``model``: names, dtypes, shapes and bytes. Two models share it only
    when their weights are bit-identical.

    >>> from knlens import load_model
    >>> fingerprint(load_model("tiny-llama")) == fingerprint(load_model("tiny-llama"))
    True
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def model_name(model: Any) -> str:
    """The name a model was loaded under (``model.cfg.model_name``)."""
    return str(getattr(model.cfg, "model_name", "") or type(model).__name__)


@dataclass(frozen=True, eq=False)
class WeightSlice:
    """Slices ``index`` along ``axis`` of parameter ``name``: ``old`` before the edit, ``new`` after
    (``param.index_select(axis, index)`` has their shape)."""

    name: str
    axis: int
    index: Int[Tensor, "k"]
    old: Tensor
    new: Tensor

    def __post_init__(self) -> None:
        if self.old.shape != self.new.shape or self.old.dtype != self.new.dtype:
            raise EditModelError(f"slice of {self.name}: old {tuple(self.old.shape)} {self.old.dtype} and new "
                                 f"{tuple(self.new.shape)} {self.new.dtype} differ")
        if self.index.ndim != 1 or self.old.ndim <= self.axis or self.old.shape[self.axis] != len(self.index):
            raise EditModelError(f"slice of {self.name}: {len(self.index)} indices along axis {self.axis} do not fit "
                                 f"values of shape {tuple(self.old.shape)}")
        if not torch.isfinite(self.new).all():
            raise NonFiniteError(f"the edit would write non-finite values into {self.name}")

    def holds(self, param: Tensor, values: Tensor) -> bool:
        """Whether ``param`` holds ``values`` at this slice, bit for bit."""
        return bool(torch.equal(param.detach().index_select(self.axis, self.index.to(param.device)).cpu(), values))


def _write(params: dict[str, Tensor], slices: Sequence[WeightSlice], which: str) -> None:
    """Write each slice's ``which`` values ("new" or "old"); on any failure restore what was written."""
    undo = "old" if which == "new" else "new"
    written: list[WeightSlice] = []
    with torch.no_grad():
        try:
            for s in slices:
                p = params[s.name]
                p.index_copy_(s.axis, s.index.to(p.device), getattr(s, which).to(p.device))
                written.append(s)
        except BaseException:
            for s in reversed(written):
                p = params[s.name]
                p.index_copy_(s.axis, s.index.to(p.device), getattr(s, undo).to(p.device))
            raise


@dataclass(frozen=True, eq=False)
class Edit:
    """A reversible weight change: ``slices`` of named parameters with their old and new values, the
    ``editor`` that made it and its ``params``, and the model (``model`` name, ``fingerprint`` of its weights)
    it was made for."""

    editor: str
    params: dict[str, Any]
    slices: tuple[WeightSlice, ...]
    model: str
    fingerprint: str

    def __post_init__(self) -> None:
        if not self.slices or all(torch.equal(s.old, s.new) for s in self.slices):
            raise NoOpEditError(f"the {self.editor} edit does not change any weight (its new values equal the old "
                                f"ones); check its neurons and step sizes")

    @cached_property
    def digest(self) -> str:
        """SHA-256 of what the edit writes and where, and of the weights it was made for."""
        h = hashlib.sha256(self.fingerprint.encode())
        for s in self.slices:
            h.update(f"{s.name}|{s.axis}|".encode())
            h.update(_bytes(s.index))
            h.update(_bytes(s.new))
        return h.hexdigest()

    @property
    def delta_norm(self) -> float:
        """Frobenius norm of new − old over all slices."""
        return float(sum(((s.new.double() - s.old.double()) ** 2).sum() for s in self.slices) ** 0.5)

    @property
    def n_changed(self) -> int:
        """How many weight values the edit changes."""
        return int(sum((s.new != s.old).sum() for s in self.slices))

    def is_applied(self, model: Any) -> bool:
        """Whether this edit is currently applied to ``model`` (through :meth:`apply`)."""
        return self.digest in _APPLIED.get(model, [])

    def apply(self, model: Any, *, weights: str | None = None) -> AppliedEdit:
        """Write the new values into ``model``; the handle returned undoes them (also as a context manager).

        ``weights``: the model's :func:`fingerprint`, when the caller has it and checks it again afterwards
        (:func:`~knlens.methods.editing.evaluate.evaluate_edits` does, to hash a large model once, not per
        application); ``None`` computes it."""
        if self.is_applied(model):
            raise EditStateError(f"this {self.editor} edit is already applied to the model; undo it first")
        params = dict(model.named_parameters())
        missing = [s.name for s in self.slices if s.name not in params]
        if missing:
            raise EditModelError(f"the model has no parameter {missing[0]!r}: this edit was made for {self.model}")
        now = fingerprint(model) if weights is None else weights
        if now != self.fingerprint:
            if all(s.holds(params[s.name], s.new) for s in self.slices):
                raise EditStateError(f"the model already holds this {self.editor} edit's new values (a copy of the "
                                     f"edit is applied); applying it twice is refused")
            raise EditModelError(f"this {self.editor} edit was made for {self.model} with weights {self.fingerprint[:12]}; "
                                 f"the model's weights are {now[:12]} (another model, or other edits applied)")
        _write(params, self.slices, "new")
        _APPLIED.setdefault(model, []).append(self.digest)
        return AppliedEdit(self, model)

    def undo(self, model: Any) -> None:
        """Write the old values back (bit-exact); refused when the edit is not applied or its weights changed."""
        if not self.is_applied(model):
            raise EditStateError(f"this {self.editor} edit is not applied to the model, so it cannot be undone")
        params = dict(model.named_parameters())
        moved = [s.name for s in self.slices if not s.holds(params[s.name], s.new)]
        if moved:
            raise EditStateError(f"{moved[0]} changed since this {self.editor} edit was applied; undo the later "
                                 f"edits first")
        _write(params, self.slices, "old")
        _APPLIED[model].remove(self.digest)

    def save(self, directory: str | Path) -> Path:
        """Write the edit as ``result.json`` + ``tensors.safetensors`` into ``directory``."""
        return save_result(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> Edit:
        """The edit saved in ``directory``."""
        return load_result(directory, cls)


class AppliedEdit:
    """An applied edit: ``undo()`` it, or leave the ``with`` block it opened."""

    def __init__(self, edit: Edit, model: Any) -> None:
        self.edit, self.model = edit, model

    def undo(self) -> None:
        self.edit.undo(self.model)

    def __enter__(self) -> Any:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.undo()


def check_finite(**values: float) -> None:
    """Raise :class:`~knlens.core.errors.NonFiniteError` for a setting (λ, a step size, a norm) that is NaN or ±inf."""
    for name, v in values.items():
        if not math.isfinite(float(v)):
            raise NonFiniteError(f"{name} must be a finite number, got {v}")


def check_new_target(model: Any, old: str, new: str) -> None:
    """Raise :class:`~knlens.core.errors.SameTargetError` when ``new`` is ``old`` (the same token ids)."""
    if target_tokens(model, new) == target_tokens(model, old):
        raise SameTargetError(f"the new target {new!r} is the old one {old!r} (the same tokens): nothing to edit")


def make_edit(model: Any, editor: str, params: dict[str, Any],
              changes: Sequence[tuple[str, int, Int[Tensor, "_"], Tensor]]) -> Edit:
    """An :class:`Edit` of ``model`` from ``(parameter name, axis, index, new values)`` changes; the old values
    are read from the model now (which is not changed)."""
    named = dict(model.named_parameters())
    slices = []
    for name, axis, index, new in changes:
        if name not in named:
            raise EditModelError(f"the model has no parameter {name!r}")
        p = named[name].detach()
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        old = p.index_select(axis, idx.to(p.device)).cpu().clone()
        slices.append(WeightSlice(name, axis, idx, old, new.detach().to(dtype=p.dtype, device="cpu").contiguous().clone()))
    return Edit(editor, params, tuple(slices), model_name(model), fingerprint(model))
