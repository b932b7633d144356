"""P(target) with neuron sets moved along the integrated-gradients path, on three engines (docs/methods.md,
suppress and enhance).

An action with factor ``f`` moves each selected neuron to ``b + f·(a − b)`` at the target position
(:func:`path_scale`). :func:`scaled_probs` gives P(target) of every (factor, set, row) and of the clean rows:

* ``"reference"`` — every (set, row) pair is one row of a plain whole-prompt forward with the hooks attached;
* ``"batched"`` — the rows of one length and target position (:func:`~knlens.core.tokens.row_groups`) run
  their prefix once; its key/value cache serves every (factor, set), which runs the target token only (a
  left-to-right model; a masked LM runs whole prompts);
* ``"fast"`` (default) — as ``"batched"``, and a (factor, set) starts at the block of its lowest layer: below
  it the rows are clean, so the staircase (:mod:`knlens.run.staircase`) takes that block's clean input, and
  only the target position is unembedded.

The faster engines pay off with many (factor, set) pairs (a fact's neurons beside 2 × 50 random controls);
with fewer than :data:`MIN_UNITS` every engine runs plain forwards, and the result says ``"reference"``.

The faster engines check themselves against plain whole-prompt forwards of the group's rows: the clean pass
on the prefix cache (every row), the staircase's block loop (its build check), and for every factor the first
set on the group's first row and the last set on its last row. A group that fails is recomputed by
``"reference"`` with an :class:`~knlens.core.errors.EngineFallbackWarning`; :attr:`ScaledProbs.engine` and
``note`` say what ran and why.

>>> from knlens import load_model, encode, NeuronSet
>>> model = load_model("tiny-llama")
>>> q = encode(model, ["the capital of france is", "the capital of spain is"], " paris")
>>> sets = [NeuronSet([(1, 3)]), NeuronSet([(0, 5), (1, 7)]), NeuronSet([(1, 9)]), NeuronSet([(0, 2)])]
>>> fast = scaled_probs(model, q, sets, [0.0, 2.0])
>>> ref = scaled_probs(model, q, sets, [0.0, 2.0], engine="reference")
>>> fast.after.shape, fast.engine, bool(torch.allclose(fast.after, ref.after, rtol=1e-4))
(torch.Size([2, 4, 2]), 'fast', True)
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from knlens.core.errors import EngineFallbackWarning, SettingsError
from knlens.core.models import is_masked_lm
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries, row_groups
from knlens.run.compat import cache_keyword_fix
from knlens.run.engine import (ENGINES, Engine, chunks, forward_from_cache, forward_with_cache, read_quantity,
                               target_logits, target_probs)
from knlens.run.hooks import Hook, HookFn, hook_name, hooked, position_mask
from knlens.run.staircase import Stairs, build_stairs, cache_layers, disagreement, recording

__all__ = ["MIN_UNITS", "ScaledProbs", "path_scale", "set_masks", "scaled_probs"]

log = logging.getLogger(__name__)

MIN_UNITS = 8
"""Fewer (factor, set) pairs than this run on plain forwards whatever the engine: the faster engines' fixed cost
per group of rows (prefix, clean pass, checks) and their small batches then cost more than they save (two
actions on one set, the specificity control, ran 2–4× slower on them; benchmarks/RESULTS.md)."""


def path_scale(factor: float | Float[Tensor, "batch"], rows: Bool[Tensor, "batch d"], position: Tensor | int,
               base: Float[Tensor, "d"] | None = None) -> HookFn:
    """A hook that moves the selected neurons to ``b + factor·(a − b)`` at each row's ``position``.

    ``rows[r]`` selects row ``r``'s neurons; ``factor`` is one number or one per row; ``base`` is the
    baseline ``b`` (0 when ``None``).

    >>> act = torch.tensor([[[1.0, -2.0], [3.0, 4.0]]])            # [batch=1, pos=2, d=2]
    >>> path_scale(2.0, torch.tensor([[True, False]]), torch.tensor([1]), torch.tensor([1.0, 0.0]))(act)
    tensor([[[ 1., -2.],
             [ 5.,  4.]]])
    """
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        b = torch.zeros((), dtype=act.dtype, device=act.device) if base is None else base.to(act)
        f = factor.to(act)[:, None, None] if isinstance(factor, Tensor) else factor
        sel = position_mask(act, position)[:, :, None] & rows.to(act.device)[:, None, :]
        return torch.where(sel, b + f * (act - b), act)
    return hook


def set_masks(sets: Sequence[NeuronSet], n_layers: int, d_mlp: int) -> Bool[Tensor, "set layer d"]:
    """The neuron sets as boolean masks (each set checked against the model's shape)."""
    mask = torch.zeros(len(sets), n_layers, d_mlp, dtype=torch.bool)
    for i, s in enumerate(sets):
        s.check(n_layers, d_mlp)
        for n in s:
            mask[i, n.layer, n.index] = True
    return mask


@dataclass(frozen=True)
class ScaledProbs:
    """P(target) of the clean rows (``clean``, a plain forward) and of every (factor, set, row) (``after``);
    the ``engine`` that ran (``+``-joined when groups of rows differ) and, when one fell back, why (``note``)."""

    clean: Float[Tensor, "row"]
    after: Float[Tensor, "factor set row"]
    engine: str
    note: str


def _hooks(masks: Tensor, factors: Tensor, position: Tensor | int, hook_point: str,
           baseline: Tensor | None) -> list[Hook]:
    """One :func:`path_scale` hook per layer any row's mask touches (``masks`` ``[row, layer, d]``)."""
    return [(hook_name(l, hook_point), path_scale(factors, masks[:, l], position, None if baseline is None
                                                   else baseline[l]))
            for l in masks.any(-1).any(0).nonzero()[:, 0].tolist()]


def _clean(model: Any, q: Queries, batch_size: int) -> Float[Tensor, "row"]:
    """P(target) of every row of ``q`` by plain forwards, rows of similar length together (little padding)."""
    order = torch.argsort(q.attention_mask.sum(1).cpu(), stable=True)
    out = torch.empty(len(q))
    out[order] = target_probs(model, q.select(order), batch_size=batch_size).cpu()
    return out


def _reference(model: Any, q: Queries, masks: Tensor, factors: Tensor, hook_point: str, baseline: Tensor | None,
               batch_size: int) -> Float[Tensor, "factor set row"]:
    """Every (factor, set, row) as one row of a plain whole-prompt forward, in chunks of ``batch_size`` rows of
    similar length."""
    n_sets, n_rows = masks.shape[0], len(q)
    pairs = torch.cartesian_prod(torch.arange(n_sets), torch.arange(n_rows))  # (set, row)
    pairs = pairs[torch.argsort(q.attention_mask.sum(1).cpu()[pairs[:, 1]], stable=True)]
    out = torch.empty(len(factors), n_sets, n_rows)
    for k, factor in enumerate(factors.tolist()):
        for s in chunks(len(pairs), batch_size):
            sub = q.select(pairs[s, 1])
            hooks = _hooks(masks[pairs[s, 0]], torch.full((len(sub),), factor), sub.position, hook_point, baseline)
            out[k, pairs[s, 0], pairs[s, 1]] = target_probs(model, sub, hooks, batch_size=None).cpu()
    return out


def _staircase(model: Any, rows: Queries) -> tuple[Tensor, Any, Stairs | None, str | None]:
    """The group's plain logits at the target, its prefix cache (None for a masked LM or a one-token prompt)
    and staircase (None where the block loop does not reproduce the model), or why the cache is not
    honoured."""
    with torch.no_grad(), recording(model) as plain_calls:
        plain = target_logits(model, rows)
    if is_masked_lm(model) or int(rows.position[0]) == 0:
        return plain, None, build_stairs(model, plain_calls, cache=None, prefix=None, read_at=int(rows.position[0]),
                                         reference=plain), None
    with torch.no_grad():
        _, kv = forward_with_cache(model, rows.tokens[:, :-1])
        cache = copy.deepcopy(kv)
        with recording(model) as calls:
            cached = forward_from_cache(model, rows.tokens[:, -1:], cache)[:, -1]
    for i in range(len(rows)):
        why = disagreement(cached[i], plain[i], "the cached clean logits")
        if why is not None:
            return plain, kv, None, f"{why} (row {i} of {len(rows)}; the key/value cache is not honoured)"
    return plain, kv, build_stairs(model, calls, cache=cache, prefix=cache_layers(kv), read_at=-1,
                                   reference=plain), None


@torch.no_grad()
def _group(model: Any, rows: Queries, masks: Tensor, factors: Tensor, hook_point: str, baseline: Tensor | None,
           engine: Engine, batch_size: int) -> tuple[Tensor, Tensor, str, str | None]:
    """``(clean [row], after [factor, set, row], engine run, why it cannot be trusted or None)`` of a group of
    rows of one length and target position on the ``fast`` or ``batched`` engine."""
    plain, kv, stairs, why = _staircase(model, rows)
    clean = read_quantity(plain, rows.target).cpu()
    if why is not None:
        return clean, torch.empty(0), engine, why
    ran = engine if engine == "batched" or stairs is not None else "batched"
    n_f, n_s, n_r = len(factors), masks.shape[0], len(rows)
    unit_factor, unit_set = factors.repeat_interleave(n_s), torch.arange(n_s).repeat(n_f)
    # a unit starts at the block of its set's lowest layer (an empty set, which changes nothing, at the last)
    lowest = [int(m.any(-1).nonzero()[0, 0]) if bool(m.any()) else masks.shape[1] - 1 for m in masks]
    entry = torch.tensor(lowest)[unit_set]
    order = torch.argsort(entry, stable=True)
    position: Tensor | int = -1 if kv is not None else int(rows.position[0])
    after = torch.empty(n_f * n_s, n_r)
    for s in chunks(len(order), max(1, batch_size // n_r)):
        units = order[s]
        row_masks = masks[unit_set[units]].repeat_interleave(n_r, dim=0)
        row_factors = unit_factor[units].repeat_interleave(n_r)
        cell_row = torch.arange(n_r).repeat(len(units))
        if ran == "fast":
            hooks = _staircase_hooks(row_masks, row_factors, entry[units], n_r, position, hook_point, baseline)
            with hooked(model, hooks):
                logits = stairs.logits(model, entry[units])  # type: ignore[union-attr]
        elif kv is not None:
            cache = copy.deepcopy(kv)
            cache.reorder_cache(cell_row.to(rows.tokens.device))
            hooks = _hooks(row_masks, row_factors, -1, hook_point, baseline)
            logits = forward_from_cache(model, rows.tokens[cell_row, -1:], cache, hooks)[:, -1]
        else:
            sub = rows.select(cell_row)
            logits = target_logits(model, sub, _hooks(row_masks, row_factors, sub.position, hook_point, baseline))
        after[units] = read_quantity(logits, rows.target[cell_row]).cpu().view(len(units), n_r)
    after = after.view(n_f, n_s, n_r)
    return clean, after, ran, _check(model, rows, masks, factors, after, hook_point, baseline)


def _staircase_hooks(row_masks: Tensor, row_factors: Tensor, entry: Tensor, n_r: int, position: int,
                     hook_point: str, baseline: Tensor | None) -> list[Hook]:
    """The hooks of one staircase run of units sorted by ``entry``: at block ``l`` the batch holds the units
    with ``entry ≤ l`` (``n_r`` rows each), so each layer's hook gets the masks and factors of those rows."""
    hooks = []
    for l in row_masks.any(-1).any(0).nonzero()[:, 0].tolist():
        here = int((entry <= l).sum()) * n_r
        hooks.append((hook_name(l, hook_point), path_scale(row_factors[:here], row_masks[:here, l], position,
                                                           None if baseline is None else baseline[l])))
    return hooks


def _check(model: Any, rows: Queries, masks: Tensor, factors: Tensor, after: Tensor, hook_point: str,
           baseline: Tensor | None) -> str | None:
    """Why ``after`` disagrees with plain forwards (the first set on the first row and the last set on the last
    row, every factor), or None."""
    picks = list(dict.fromkeys([(0, 0), (masks.shape[0] - 1, len(rows) - 1)]))
    sub = rows.select(torch.tensor([r for _, r in picks]))
    sel = masks[torch.tensor([s for s, _ in picks])]
    for k, factor in enumerate(factors.tolist()):
        hooks = _hooks(sel, torch.full((len(picks),), factor), sub.position, hook_point, baseline)
        plain = target_probs(model, sub, hooks, batch_size=None).cpu()
        for (s, r), p in zip(picks, plain):
            why = disagreement(after[k, s, r:r + 1], p[None], f"P(target) of set {s} ×{factor:g} on row {r}")
            if why is not None:
                return why
    return None


def scaled_probs(model: Any, q: Queries, sets: Sequence[NeuronSet], factors: Sequence[float], *,
                 hook_point: str = "hook_post", baseline: Float[Tensor, "layer d"] | None = None,
                 engine: Engine = "fast", batch_size: int = 64) -> ScaledProbs:
    """P(target) of every row of ``q`` clean and with each of ``sets`` moved to ``b + f·(a − b)`` for each of
    ``factors`` at the target position (``baseline`` is ``b``, zero when None), on ``engine`` (see the module
    docstring); ``batch_size`` rows run per forward pass."""
    if engine not in ENGINES:
        raise SettingsError(f"unknown engine {engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    masks = set_masks(sets, model.cfg.n_layers, model.cfg.d_mlp)
    f = torch.tensor([float(x) for x in factors])
    if engine == "reference" or len(f) * len(sets) < MIN_UNITS:
        return ScaledProbs(_clean(model, q, batch_size), _reference(model, q, masks, f, hook_point, baseline, batch_size),
                           "reference", "")
    clean = torch.empty(len(q))
    after = torch.empty(len(f), len(sets), len(q))
    ran, notes = [], []
    with cache_keyword_fix(model):
        for group in row_groups(q, batch_size):
            rows = q.select(group)
            c, a, name, why = _group(model, rows, masks, f, hook_point, baseline, engine, batch_size)
            if why is not None:
                warnings.warn(f"suppress / enhance: engine {engine!r} fell back to 'reference': {why}",
                              EngineFallbackWarning, stacklevel=2)
                log.warning("engine %r fell back to 'reference': %s", engine, why)
                notes.append(f"{engine} -> reference: {why}")
                a, name = _reference(model, rows, masks, f, hook_point, baseline, batch_size), "reference"
            clean[group], after[:, :, group] = c, a
            ran.append(name)
    return ScaledProbs(clean, after, "+".join(dict.fromkeys(ran)), "; ".join(dict.fromkeys(notes)))
