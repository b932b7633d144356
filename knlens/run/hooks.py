"""Composable hook functions in TransformerLens' ``fn(activation, hook) -> activation`` form.

Every knlens method is a forward (and sometimes backward) pass with some of these attached. Each
factory returns a plain function, so researchers can mix them with their own hooks anywhere knlens
takes hooks. ``position`` picks the token positions that are edited: ``None`` (all), an ``int``
(one position for every row; negative counts from the end), or a ``[batch]`` tensor (one position per
row, for padded batches). ``neurons`` picks the last-axis coordinates: ``None`` (all), a list/tensor of
indices, or a boolean mask ``[d]`` or ``[batch, d]``.

>>> import torch
>>> act = torch.ones(2, 3, 4)                       # [batch, pos, d_mlp]
>>> scale(2.0, neurons=[1], position=-1)(act, None)[0]
tensor([[1., 1., 1., 1.],
        [1., 1., 1., 1.],
        [1., 2., 1., 1.]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from knlens.core.errors import HookShapeError, NeuronIndexError, SettingsError
from knlens.core.names import did_you_mean
from knlens.core.neurons import NeuronSet

__all__ = [
    "HookFn", "Hook", "Position", "NeuronSelector",
    "zero_ablate", "mean_ablate", "scale", "set_value", "add", "patch_from", "replace_rows",
    "capture", "compose", "neuron_hooks", "hook_name", "hooked", "position_mask",
]

HookFn = Callable[[Tensor, Any], Union[Tensor, None]]
Hook = tuple[str, HookFn]
Position = Union[int, Int[Tensor, "batch"], None]
NeuronSelector = Union[Sequence[int], Int[Tensor, "k"], Bool[Tensor, "d"], Bool[Tensor, "batch d"], None]


def hook_name(layer: int, hook_point: str = "hook_post") -> str:
    """The TransformerLens name of an MLP hook point: ``hook_name(3) == "blocks.3.mlp.hook_post"``.

    ``hook_point`` may also be a full block-relative name such as ``"hook_resid_post"`` or ``"attn.hook_z"``.
    """
    if hook_point in ("hook_post", "hook_pre", "hook_pre_linear"):
        return f"blocks.{layer}.mlp.{hook_point}"
    return f"blocks.{layer}.{hook_point}"


def position_mask(act: Tensor, position: Position) -> Bool[Tensor, "batch pos"]:
    """Boolean ``[batch, pos]`` mask of the positions an edit applies to."""
    batch, n_pos = act.shape[0], act.shape[1]
    if position is None:
        return torch.ones(batch, n_pos, dtype=torch.bool, device=act.device)
    pos = torch.as_tensor(position, device=act.device)
    if pos.ndim == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise HookShapeError(f"position has shape {tuple(pos.shape)}, expected a scalar or [batch={batch}]")
    pos = torch.where(pos < 0, pos + n_pos, pos)
    if bool(((pos < 0) | (pos >= n_pos)).any()):
        raise HookShapeError(f"position {pos.tolist()} is outside the sequence of length {n_pos}")
    return torch.arange(n_pos, device=act.device)[None, :] == pos[:, None]


def _neuron_mask(act: Tensor, neurons: NeuronSelector) -> Tensor:
    d = act.shape[-1]
    if neurons is None:
        return torch.ones(d, dtype=torch.bool, device=act.device)
    sel = torch.as_tensor(neurons, device=act.device)
    if sel.dtype == torch.bool:
        if sel.shape[-1] != d:
            raise HookShapeError(f"neuron mask has {sel.shape[-1]} entries but the activation has {d}")
        return sel
    sel = sel.long().reshape(-1)
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= d):
        raise NeuronIndexError(f"neuron index {sel.tolist()} out of range for an activation with {d} neurons")
    mask = torch.zeros(d, dtype=torch.bool, device=act.device)
    mask[sel] = True
    return mask


def _edit(act: Tensor, new: Tensor, position: Position, neurons: NeuronSelector) -> Tensor:
    """``act`` with ``new`` written at the selected positions and neurons (out of place, differentiable)."""
    pos = position_mask(act, position)  # [batch, pos]
    while pos.ndim < act.ndim:
        pos = pos.unsqueeze(-1)
    neu = _neuron_mask(act, neurons)  # [d] or [batch, d]
    if neu.ndim == 2:
        neu = neu[:, None, :]
        while neu.ndim < act.ndim:
            neu = neu.unsqueeze(-2)
    return torch.where(pos & neu, new.to(act.dtype), act)


def scale(factor: float | Tensor, neurons: NeuronSelector = None, position: Position = None) -> HookFn:
    """Multiply the selected activations by ``factor`` (×0 suppresses, ×2 enhances)."""
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        return _edit(act, act * factor, position, neurons)
    return hook


def zero_ablate(neurons: NeuronSelector = None, position: Position = None) -> HookFn:
    """Set the selected activations to 0."""
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        return _edit(act, torch.zeros_like(act), position, neurons)
    return hook


def set_value(value: float | Float[Tensor, "d"] | Float[Tensor, "batch d"], neurons: NeuronSelector = None,
              position: Position = None) -> HookFn:
    """Set the selected activations to ``value`` (a scalar, a ``[d]`` vector, or ``[batch, d]``)."""
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        v = torch.as_tensor(value, device=act.device, dtype=act.dtype)
        if v.ndim == 2:
            v = v[:, None, :]
        return _edit(act, v.expand_as(act), position, neurons)
    return hook


def mean_ablate(mean: Float[Tensor, "d"], neurons: NeuronSelector = None, position: Position = None) -> HookFn:
    """Replace the selected activations by their mean over some reference data (``mean`` is ``[d]``)."""
    return set_value(mean, neurons, position)


def add(delta: Float[Tensor, "d"] | float, neurons: NeuronSelector = None, position: Position = None) -> HookFn:
    """Add ``delta`` to the selected activations (steering)."""
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        return _edit(act, act + torch.as_tensor(delta, device=act.device, dtype=act.dtype), position, neurons)
    return hook


def patch_from(source: Float[Tensor, "batch pos d"], neurons: NeuronSelector = None,
               position: Position = None) -> HookFn:
    """Copy the selected activations from ``source`` (e.g. ``cache["blocks.3.mlp.hook_post"]`` of another run).

    ``source`` must have the activation's shape, or a batch of 1 that is broadcast to every row.
    """
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        src = source.to(act.device)
        if src.shape[1:] != act.shape[1:] or src.shape[0] not in (1, act.shape[0]):
            raise HookShapeError(f"patch source has shape {tuple(src.shape)}, the activation "
                                 f"{tuple(act.shape)} at {getattr(hook, 'name', '?')}")
        return _edit(act, src.expand_as(act), position, neurons)
    return hook


def replace_rows(values: Float[Tensor, "rows d"], rows: Bool[Tensor, "batch"], position: Position) -> HookFn:
    """Write ``values`` (one vector per selected row) at ``position`` of the rows where ``rows`` is true.

    This is the integrated-gradients path: ``values`` is ``α·a`` with ``requires_grad``, so the gradient
    of the output with respect to each row's activation can be read from ``values.grad``.
    """
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        if rows.shape != (act.shape[0],) or values.shape != (int(rows.sum()), act.shape[-1]):
            raise HookShapeError(f"replace_rows: values {tuple(values.shape)} / rows {tuple(rows.shape)} do not "
                                 f"fit the activation {tuple(act.shape)}")
        full = act.new_zeros(act.shape[0], act.shape[-1]).index_put((rows.nonzero()[:, 0],), values.to(act.dtype))
        sel = rows[:, None, None] & position_mask(act, position)[:, :, None]
        return torch.where(sel, full[:, None, :], act)
    return hook


def capture(into: list[Tensor], position: Position = None, neurons: Sequence[int] | None = None) -> HookFn:
    """A hook that appends a detached copy of what it sees to ``into`` and changes nothing.

    With ``position`` (an int, or one position per row) it keeps ``act[row, position[row]]`` → ``[batch, d]``;
    without, every position → ``[batch, pos, d]``. ``neurons`` keeps only those columns.

    >>> import torch
    >>> seen = []
    >>> capture(seen, position=torch.tensor([0, 2]), neurons=[1])(torch.arange(12.).view(2, 3, 2), None)
    >>> seen[0].tolist()
    [[1.0], [11.0]]
    """
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> None:
        x = act.detach()
        if neurons is not None:
            x = x[..., torch.as_tensor(list(neurons), dtype=torch.long, device=x.device)]
        if position is not None:
            x = x[position_mask(act, position)]  # one position per row, in row order
        into.append(x)
    return hook


def compose(*fns: HookFn) -> HookFn:
    """One hook that applies ``fns`` in order (a hook returning ``None`` leaves the activation unchanged)."""
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        for fn in fns:
            out = fn(act, hook)
            act = act if out is None else out
        return act
    return hook


def neuron_hooks(neurons: NeuronSet, make: Callable[[list[int]], HookFn], hook_point: str = "hook_post") -> list[Hook]:
    """One hook per layer of ``neurons``: ``make(indices_in_that_layer)`` built at ``blocks.{l}.mlp.{hook_point}``.

    >>> hooks = neuron_hooks(NeuronSet([(0, 1), (1, 2)]), lambda idx: scale(0.0, idx, position=-1))
    >>> [name for name, _ in hooks]
    ['blocks.0.mlp.hook_post', 'blocks.1.mlp.hook_post']
    """
    return [(hook_name(layer, hook_point), make(idx)) for layer, idx in sorted(neurons.by_layer().items())]


def _checked(name: str, fn: HookFn) -> HookFn:
    """Wrap a hook so that a return value of the wrong shape raises :class:`HookShapeError` right away."""
    def hook(act: Tensor, hook: Any = None) -> Tensor | None:
        out = fn(act, hook)
        if out is not None and (not isinstance(out, Tensor) or out.shape != act.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise HookShapeError(f"hook at {name} returned {got}; it must return a tensor of the activation's "
                                 f"shape {tuple(act.shape)} (or None to leave it unchanged)")
        return out
    return hook


@contextmanager
def hooked(model: Any, fwd_hooks: Sequence[Hook] = (), bwd_hooks: Sequence[Hook] = ()) -> Iterator[Any]:
    """Attach hooks for the duration of a ``with`` block; they are removed on every exit, errors included.

    Unknown hook names raise :class:`~knlens.core.errors.SettingsError` listing close matches before anything is attached.

    >>> from knlens import load_model
    >>> model = load_model("tiny-gpt2")
    >>> with hooked(model, [("blocks.0.mlp.hook_post", zero_ablate())]):
    ...     logits = model("the capital of france is")
    """
    names = set(model.hook_dict)
    for name, _ in [*fwd_hooks, *bwd_hooks]:
        if name not in names:
            raise SettingsError(f"unknown hook point {name!r}{did_you_mean(name, names)}")
    with model.hooks(fwd_hooks=[(n, _checked(n, f)) for n, f in fwd_hooks],
                     bwd_hooks=list(bwd_hooks)):
        yield model
