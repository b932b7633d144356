"""Integrated gradients of query rows on one engine, checked against a plain forward.

:func:`ig_queries` splits a batch of query rows (the prompts of one fact or of many, one row per target
token) into groups of equal length and target position, and :func:`ig_rows` runs every (layer, step) cell of
a group's rows on the engine asked for: a cell *unit* is one (layer, α) pair, and each unit carries one row
per prompt of the group, so the prompts share one prefix forward, one clean pass and one staircase run
(:class:`~knlens.run.staircase.Stairs` with a recorded run of several rows). A plain whole-prompt forward of
the group gives the clean logits and activations; the ``fast`` and ``batched`` engines are used only when
their own clean pass (on the prefix cache, through the staircase) and their α = 1 cells agree with it, row by
row; otherwise the group is recomputed by ``reference`` with an
:class:`~knlens.core.errors.EngineFallbackWarning`, and its rows' ``engine`` / ``note`` say so.

>>> import torch
>>> from knlens import load_model, encode
>>> from knlens.methods.attribution.grids import quadrature
>>> model = load_model("tiny-llama")
>>> q = encode(model, ["the capital of france is", "the capital of spain is", "paris is in"], " paris")
>>> alphas, weights = quadrature("right", 4)
>>> rows = ig_queries(model, q, ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"], alphas, weights,
...                   "zero", "prob", "fast", 64)
>>> [r["scores"].shape for r in rows], [r["engine"] for r in rows]
([torch.Size([2, 48]), torch.Size([2, 48]), torch.Size([2, 48])], ['fast', 'fast', 'fast'])
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from knlens.core.errors import EngineCheckError, EngineFallbackWarning, NonFiniteError
from knlens.core.models import is_masked_lm
from knlens.core.tokens import Queries, row_groups
from knlens.methods.attribution.baselines import Baseline, baseline_values
from knlens.run.compat import cache_keyword_fix
from knlens.run.engine import (Engine, Quantity, chunks, forward_from_cache, forward_with_cache, read_quantity,
                               target_logits)
from knlens.run.hooks import capture, hooked, replace_rows
from knlens.run.precision import Tolerance, log_tolerance
from knlens.run.staircase import Stairs, build_stairs, cache_layers, disagreement, recording

__all__ = ["ig_queries", "ig_rows", "shared_clean_passes"]

log = logging.getLogger("knlens.methods.attribution.ig")

_KEPT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("knlens_clean_passes", default=None)


@contextlib.contextmanager
def shared_clean_passes() -> Iterator[None]:
    """Inside the block, :func:`ig_rows` keeps the clean passes of every group of rows it runs (the plain
    forward, the prefix cache, the clean pass on it, the staircase) and reuses them when it runs the same rows
    again, at the same hook points or fewer: the screen and the exact pass of a screened integration share
    them (:mod:`.screen`). What it keeps (per row its logits, activations, prefix key/value cache and one-token
    clean pass) lives until the block ends. The model must not change inside the block.

    >>> from knlens import load_model, encode
    >>> from knlens.methods.attribution.grids import quadrature
    >>> model = load_model("tiny-llama")
    >>> q = encode(model, ["the capital of france is"], " paris")
    >>> names = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    >>> with shared_clean_passes():
    ...     first = ig_queries(model, q, names, *quadrature("right", 2), "zero", "prob", "fast", 64)
    ...     again = ig_queries(model, q, names[1:], *quadrature("right", 8), "zero", "prob", "fast", 64)
    >>> again[0]["activations"].equal(first[0]["activations"][1:])
    True
    """
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def _kept(kind: str, model: Any, rows: Queries, names: list[str], compute: Callable[[list[str]], tuple],
          acts_at: int | None = None) -> tuple:
    """``compute(names)``, or what it gave for these rows before inside :func:`shared_clean_passes`;
    ``acts_at`` is the place of its activations ``[row, layer, d]`` (a result for more hook points serves)."""
    kept = _KEPT.get()
    if kept is None:
        return compute(names)
    key = (kind, id(model), tuple(rows.tokens.shape), rows.tokens.cpu().numpy().tobytes(), tuple(rows.position.tolist()))
    if key in kept and set(names) <= set(kept[key][0]):
        have, value = kept[key]
        if acts_at is None:
            return value
        at = torch.tensor([have.index(n) for n in names], device=value[acts_at].device)
        return (*value[:acts_at], value[acts_at].index_select(1, at), *value[acts_at + 1:])
    value = compute(names)
    kept[key] = (list(names), value)
    return value


def _plain_state(model: Any, rows: Queries, names: list[str], record: bool
                 ) -> tuple[Float[Tensor, "row vocab"], Float[Tensor, "row layer d"], list]:
    """One plain whole-prompt forward (no cache) of the rows: the logits and activations at the target position
    that every faster path is checked against, and, with ``record``, the block calls it made (for a staircase
    without a prefix)."""
    acts: dict[str, list[Tensor]] = {n: [] for n in names}
    savers = [(n, capture(acts[n], rows.position)) for n in names]
    with torch.no_grad(), recording(model) if record else contextlib.nullcontext([]) as calls:
        logits = target_logits(model, rows, savers)
    return logits, torch.stack([acts[n][0] for n in names], dim=1), calls


def _prefix(model: Any, rows: Queries) -> tuple[Any]:
    """The key/value cache of the rows' tokens before the target position."""
    with torch.no_grad():
        return (forward_with_cache(model, rows.tokens[:, :-1])[1],)


def _cached_state(model: Any, rows: Queries, names: list[str], kv: Any
                  ) -> tuple[Float[Tensor, "row vocab"], Float[Tensor, "row layer d"], Any, list]:
    """The target token of every row run on the prefix cache ``kv``: logits and activations, the cache object
    the blocks got, and the block calls it made."""
    acts: dict[str, list[Tensor]] = {n: [] for n in names}
    cache = copy.deepcopy(kv)
    with torch.no_grad(), recording(model) as calls:
        logits = forward_from_cache(model, rows.tokens[:, -1:], cache,
                                    [(n, capture(acts[n], -1)) for n in names])[:, -1]
    return logits, torch.stack([acts[n][0] for n in names], dim=1), cache, calls


def _per_row(check: Tensor, reference: Tensor, what: str, **tolerance: Any) -> str | None:
    """:func:`~knlens.run.staircase.disagreement` of every row on its own (as strict as a one-row check)."""
    for i in range(reference.shape[0]):
        why = disagreement(check[i], reference[i], what, **tolerance)
        if why is not None:
            return why + (f" (row {i} of a group of {reference.shape[0]})" if reference.shape[0] > 1 else "")
    return None


def _fallback(engine: str, why: str) -> str:
    warnings.warn(f"integrated gradients: engine {engine!r} fell back to 'reference': {why}",
                  EngineFallbackWarning, stacklevel=5)
    log.warning("engine %r fell back to 'reference': %s", engine, why)
    return f"{engine} -> reference: {why}"


def _run_cells(model: Any, rows: Queries, names: list[str], unit_layer: Tensor, start: Tensor, span: Tensor,
               unit_alpha: Tensor, kv: Any, quantity: Quantity, stairs: Stairs | None = None,
               entry: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batch of IG units: unit ``u`` sets ``names[unit_layer[u]]`` of every row ``p`` of the group to
    ``start[p, l] + unit_alpha[u]·span[p, l]``; batch row ``u·P + p``.

    Returns ``(grads [units·P, d], f [units·P])``. With ``kv`` (a prefix cache of the ``P`` rows) only the target
    token runs; with ``stairs`` the units (sorted by ``entry``, the block each starts at) skip the clean blocks.
    """
    n_rows = len(rows)
    cell_row = torch.arange(n_rows, device=start.device).repeat(len(unit_layer))
    cell_layer = unit_layer.repeat_interleave(n_rows)
    alpha = unit_alpha.repeat_interleave(n_rows)[:, None].to(span.dtype)
    values = (start[cell_row, cell_layer] + alpha * span[cell_row, cell_layer]).detach().requires_grad_(True)
    position: int = -1 if kv is not None else int(rows.position[0])
    hooks = []
    if stairs is not None:
        assert entry is not None
        # at the block where units enter they are the last units of the batch
        for name in dict.fromkeys(names[i] for i in unit_layer.tolist()):
            sel = torch.tensor([names[i] == name for i in unit_layer.tolist()])
            n_here = int((entry <= int(entry[sel][0])).sum())
            here = torch.zeros(n_here, dtype=torch.bool)
            here[n_here - int(sel.sum()):] = True
            hooks.append((name, replace_rows(values[sel.repeat_interleave(n_rows).to(values.device)],
                                             here.repeat_interleave(n_rows).to(values.device), position)))
    else:
        for layer in cell_layer.unique().tolist():
            sel = cell_layer == layer
            hooks.append((names[layer], replace_rows(values[sel], sel, position)))
    with torch.enable_grad():
        if stairs is not None:
            with hooked(model, hooks):
                logits = stairs.logits(model, entry)
        elif kv is None:
            logits = target_logits(model, rows.select(cell_row.cpu()), hooks)
        else:
            cache = copy.deepcopy(kv)
            cache.reorder_cache(cell_row)
            logits = forward_from_cache(model, rows.tokens[cell_row, -1:], cache, hooks)[:, -1]
        f = read_quantity(logits, rows.target[cell_row], quantity)
        (grads,) = torch.autograd.grad(f.sum(), values)
    return grads.float(), f.detach()


def _block_of(name: str) -> int:
    return int(name.split(".")[1])


def ig_queries(model: Any, q: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
               quantity: Quantity, engine: Engine, batch_size: int, progress: bool = False) -> list[dict[str, Any]]:
    """Integrated gradients of every row of ``q`` (rows of any prompts and targets), for all hook points
    ``names``: one dict per row (see :func:`ig_rows`), in row order. Rows of equal length and target position
    are run together (:func:`~knlens.core.tokens.row_groups`, at most ``batch_size`` rows a group)."""
    out: list[dict[str, Any] | None] = [None] * len(q)
    for group in tqdm(row_groups(q, batch_size), desc="integrated gradients", disable=not progress, leave=False):
        for i, row in zip(group.tolist(), ig_rows(model, q.select(group), names, alphas, weights, baseline,
                                                  quantity, engine, batch_size)):
            out[i] = row
    return out  # type: ignore[return-value]


def ig_rows(model: Any, rows: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
            quantity: Quantity, engine: Engine, batch_size: int) -> list[dict[str, Any]]:
    """Integrated gradients of query rows of one length and target position, for all hook points ``names``:
    per row ``scores``, ``integral`` (the path's gradient integral Σ_k w_k ∂f/∂x, so that scores = (a − b) ·
    integral), ``activations``, ``delta``, ``completeness_error`` (``[layer, d]`` / ``[layer]``),
    ``clean`` (f at the clean point), ``engine`` (the one that ran) and ``note`` (why it fell back, or "").

    A plain whole-prompt forward of the rows gives the clean logits and activations. The ``fast`` and
    ``batched`` engines are used only when their own clean pass (on the prefix cache, through the staircase)
    agrees with it and their α = 1 cells give every row's clean value again; otherwise the rows are
    recomputed by the ``reference`` engine with a warning, and the returned ``engine`` / ``note`` say so.
    """
    with cache_keyword_fix(model):
        record = is_masked_lm(model) or int(rows.position[0]) == 0  # no prefix cache: the staircase needs them
        plain_logits, plain_acts, plain_calls = _kept("plain", model, rows, names,
                                                      lambda ns: _plain_state(model, rows, ns, record), acts_at=1)
        clean = read_quantity(plain_logits, rows.target, quantity).float().cpu()
        cells = len(rows) * len(names) * (len(alphas) + 2)
        tol = log_tolerance(model, rows.tokens[:1], int(rows.position[0]), int(rows.target[0]),
                            min(cells, batch_size or cells), quantity, names)
        out, why = _ig_cells(model, rows, names, alphas, weights, baseline, quantity, engine, batch_size,
                             plain_logits, plain_acts, plain_calls, clean, tol)
        if why is None:
            return out
        note = _fallback(engine, why)
        out, again = _ig_cells(model, rows, names, alphas, weights, baseline, quantity, "reference", batch_size,
                               plain_logits, plain_acts, plain_calls, clean, tol)
        if again is not None:
            raise EngineCheckError(f"integrated gradients: even the reference engine disagrees with a plain "
                                   f"forward of the model ({again}); its hooks do not reproduce its own output")
        return [{**o, "note": note} for o in out]


def _ig_cells(model: Any, rows: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
              quantity: Quantity, engine: Engine, batch_size: int, plain_logits: Tensor, plain_acts: Tensor,
              plain_calls: list, clean: Tensor, tol: Tolerance | None
              ) -> tuple[list[dict[str, Any]], str | None]:
    """The IG cells of a group of rows on ``engine``; the second value says why the engine cannot be trusted
    (its clean pass or its α = 1 cells disagree with the plain forward for some row, to ``tol`` in half
    precision), or is None."""
    causal = not is_masked_lm(model) and int(rows.position[0]) > 0
    kv, stairs, ran = None, None, engine
    acts = plain_acts
    if causal and engine != "reference":
        (kv,) = _kept("prefix", model, rows, [], lambda ns: _prefix(model, rows))
        logits, acts, cache, calls = _kept("cached", model, rows, names, lambda ns: _cached_state(model, rows, ns, kv),
                                           acts_at=1)
        why = (_per_row(logits, plain_logits, "the cached clean logits",
                        absolute_tolerance=None if tol is None else tol.logits)
               or _per_row(acts, plain_acts, "the cached clean activations",
                           absolute_tolerance=None if tol is None else tol.activations))
        if why is not None:
            return [], f"{why} (the key/value cache is not honoured)"
        if engine == "fast":
            (stairs,) = _kept(f"stairs {tol}", model, rows, [], lambda ns: (build_stairs(
                model, calls, cache=cache, prefix=cache_layers(kv), read_at=-1, reference=plain_logits,
                log_tolerance=None if tol is None else tol.logits),))
    elif engine == "fast":
        (stairs,) = _kept(f"stairs {tol}", model, rows, [], lambda ns: (build_stairs(
            model, plain_calls, cache=None, prefix=None, read_at=int(rows.position[0]), reference=plain_logits,
            log_tolerance=None if tol is None else tol.logits),))
    note = ""
    if engine == "fast" and stairs is None:
        ran, note = "batched", "fast -> batched: the staircase does not reproduce this model's logits"
        log.info("the staircase does not reproduce this model's logits; running the batched engine")
    acts = acts.float()
    start = torch.stack([baseline_values(baseline, model, rows.row(p), names, acts[p]) for p in range(len(rows))])
    span = acts - start
    n_rows, n_layers, m = len(rows), len(names), len(alphas)
    # every layer gets the m grid points plus α = 0 (the baseline value, for the completeness check) and
    # α = 1 (the clean value, checked against the plain forward), unless the grid has them already
    grid = alphas.to(acts.device)
    extra = [a for a in (0.0, 1.0) if not bool((grid == a).any())]
    grid = torch.cat([grid, grid.new_tensor(extra)])
    z, one = int((grid == 0).nonzero()[0]), int((grid == 1).nonzero()[0])
    g_n = len(grid)
    unit_layer = torch.arange(n_layers, device=acts.device).repeat_interleave(g_n)
    unit_alpha = grid.repeat(n_layers)
    grads = torch.empty(len(unit_layer), n_rows, acts.shape[-1])
    f = torch.empty(len(unit_layer), n_rows, dtype=torch.float32)
    if ran == "reference":
        groups = [torch.arange(l * g_n, (l + 1) * g_n) for l in range(n_layers)]
    elif stairs is not None:  # units sorted by the block they start at
        blocks = torch.tensor([_block_of(n) for n in names])
        groups = [torch.argsort(blocks[unit_layer.cpu()], stable=True)]
    else:
        groups = [torch.arange(len(unit_layer))]
    for group in groups:
        for s in chunks(len(group), max(1, batch_size // n_rows)):
            idx = group[s]
            entry = blocks[unit_layer[idx].cpu()] if stairs is not None else None
            g, v = _run_cells(model, rows, names, unit_layer[idx], start, span, unit_alpha[idx], kv, quantity,
                              stairs, entry)
            grads[idx], f[idx] = g.cpu().view(len(idx), n_rows, -1), v.float().cpu().view(len(idx), n_rows)
    grads = grads.view(n_layers, g_n, n_rows, -1)[:, :m].permute(2, 0, 1, 3)  # [row, layer, step, d]
    f = f.view(n_layers, g_n, n_rows).permute(2, 0, 1)  # [row, layer, grid point]
    why = _per_row(f[:, :, one], clean[:, None].expand(n_rows, n_layers), f"the α = 1 cells' {quantity}",
                   log_tolerance=None if tol is None else tol.quantity)
    if why is not None:
        return [], why
    span = span.cpu()
    out = []
    for p in range(n_rows):
        integral = torch.einsum("k,lkd->ld", weights.float(), grads[p])  # Σ_k w_k ∂f/∂x along the path
        scores = span[p] * integral
        delta = clean[p] - f[p, :, z]
        if not torch.isfinite(scores).all():
            raise NonFiniteError("integrated gradients produced non-finite scores (check the model's dtype and "
                                 "the target quantity; 'logprob' of a near-zero probability can overflow)")
        out.append({"scores": scores, "integral": integral, "activations": acts[p].cpu(), "delta": delta,
                    "completeness_error": (scores.sum(-1) - delta).abs(), "clean": float(clean[p]), "engine": ran,
                    "note": note})
    return out, None
