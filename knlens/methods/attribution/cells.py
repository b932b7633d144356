"""Integrated gradients of one query row on one engine, checked against a plain forward.

:func:`ig_row` runs every (layer, step) cell of one row on the engine asked for. A plain whole-prompt
forward gives the clean logits and activations; the ``fast`` and ``batched`` engines are used only when
their own clean pass (on the prefix cache, through the staircase) and their α = 1 cells agree with it;
otherwise the row is recomputed by ``reference`` with an
:class:`~knlens.core.errors.EngineFallbackWarning`, and the row's ``engine`` / ``note`` say so.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import EngineCheckError, EngineFallbackWarning, NonFiniteError
from knlens.core.models import is_masked_lm
from knlens.core.tokens import Queries
from knlens.methods.attribution.baselines import Baseline, baseline_values
from knlens.run.compat import cache_keyword_fix
from knlens.run.engine import (Engine, Quantity, chunks, forward_from_cache, forward_with_cache, read_quantity,
                               target_logits)
from knlens.run.hooks import capture, hooked, replace_rows
from knlens.run.precision import log_tolerance, low_precision
from knlens.run.staircase import Stairs, build_stairs, cache_layers, disagreement, recording

__all__ = ["ig_row"]

log = logging.getLogger("knlens.methods.attribution.ig")


def _plain_state(model: Any, row: Queries, names: list[str]
                 ) -> tuple[Float[Tensor, "1 vocab"], Float[Tensor, "layer d"], list]:
    """One plain whole-prompt forward (no cache): the logits and activations at the target position that
    every faster path is checked against, and the block calls it made (for a staircase without a prefix)."""
    acts: dict[str, list[Tensor]] = {n: [] for n in names}
    savers = [(n, capture(acts[n], row.position)) for n in names]
    with torch.no_grad(), recording(model) as calls:
        logits = target_logits(model, row, savers)
    return logits, torch.stack([acts[n][0][0] for n in names]), calls


def _cached_state(model: Any, row: Queries, names: list[str], kv: Any
                  ) -> tuple[Float[Tensor, "1 vocab"], Float[Tensor, "layer d"], Any, list]:
    """The target token run on the prefix cache ``kv``: its logits and activations, the cache object the
    blocks got, and the block calls it made."""
    acts: dict[str, list[Tensor]] = {n: [] for n in names}
    cache = copy.deepcopy(kv)
    with torch.no_grad(), recording(model) as calls:
        logits = forward_from_cache(model, row.tokens[:, -1:], cache, [(n, capture(acts[n], -1)) for n in names])[:, -1]
    return logits, torch.stack([acts[n][0][0] for n in names]), cache, calls


def _fallback(engine: str, why: str) -> str:
    warnings.warn(f"integrated gradients: engine {engine!r} fell back to 'reference': {why}",
                  EngineFallbackWarning, stacklevel=4)
    log.warning("engine %r fell back to 'reference': %s", engine, why)
    return f"{engine} -> reference: {why}"


def _run_cells(model: Any, row: Queries, names: list[str], cell_layer: Tensor, start: Tensor, span: Tensor,
               alphas: Tensor, kv: Any, quantity: Quantity, stairs: Stairs | None = None,
               entry: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batch of IG cells: cell ``r`` sets ``names[cell_layer[r]]`` to ``start + alphas[r]·span``.

    Returns ``(grads [cells, d], f [cells])``. With ``kv`` (a prefix cache) only the target token runs;
    with ``stairs`` the cells (sorted by ``entry``, the block each starts at) skip the clean blocks.
    """
    n = len(cell_layer)
    values = (start[cell_layer] + alphas[:, None].to(span.dtype) * span[cell_layer]).detach().requires_grad_(True)
    position: int = -1 if kv is not None else int(row.position[0])
    hooks = []
    if stairs is not None:
        assert entry is not None
        # at the block where rows enter they are the last rows of the batch
        for name in dict.fromkeys(names[i] for i in cell_layer.unique().tolist()):
            sel = torch.tensor([names[i] == name for i in cell_layer.tolist()])
            block = int(entry[sel][0])
            n_here = int((entry <= block).sum())
            rows = torch.zeros(n_here, dtype=torch.bool)
            rows[n_here - int(sel.sum()):] = True
            hooks.append((name, replace_rows(values[sel], rows.to(values.device), position)))
    else:
        for layer in cell_layer.unique().tolist():
            rows = cell_layer == layer
            hooks.append((names[layer], replace_rows(values[rows], rows, position)))
    with torch.enable_grad():
        if stairs is not None:
            with hooked(model, hooks):
                logits = stairs.logits(model, entry)
        elif kv is None:
            batch = row.select(torch.zeros(n, dtype=torch.long))
            logits = target_logits(model, batch, hooks)
        else:
            cache = copy.deepcopy(kv)
            cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=row.tokens.device))
            logits = forward_from_cache(model, row.tokens[:, -1:].expand(n, 1), cache, hooks)[:, -1]
        f = read_quantity(logits, row.target.expand(n), quantity)
        (grads,) = torch.autograd.grad(f.sum(), values)
    return grads.float(), f.detach()


def _block_of(name: str) -> int:
    return int(name.split(".")[1])


def ig_row(model: Any, row: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
            quantity: Quantity, engine: Engine, batch_size: int) -> dict[str, Any]:
    """Integrated gradients of one query row, for all hook points ``names``.

    A plain whole-prompt forward gives the clean logits and activations. The ``fast`` and ``batched``
    engines are used only when their own clean pass (on the prefix cache, through the staircase) agrees
    with it, and when their α = 1 cells give the clean value again; otherwise the row is recomputed by
    the ``reference`` engine with a warning, and the returned ``engine`` / ``note`` say so.
    """
    with cache_keyword_fix(model):
        plain_logits, plain_acts, plain_calls = _plain_state(model, row, names)
        clean = float(read_quantity(plain_logits, row.target, quantity)[0])
        cells = len(names) * (len(alphas) + 2)
        tol = log_tolerance(model, row.tokens, int(row.position[0]), int(row.target[0]),
                            min(cells, batch_size or cells), quantity)
        out, why = _ig_cells(model, row, names, alphas, weights, baseline, quantity, engine, batch_size,
                             plain_logits, plain_acts, plain_calls, clean, tol)
        if why is None:
            return out
        note = _fallback(engine, why)
        out, again = _ig_cells(model, row, names, alphas, weights, baseline, quantity, "reference", batch_size,
                               plain_logits, plain_acts, plain_calls, clean, tol)
        if again is not None:
            raise EngineCheckError(f"integrated gradients: even the reference engine disagrees with a plain "
                                   f"forward of the model ({again}); its hooks do not reproduce its own output")
        return {**out, "note": note}


def _ig_cells(model: Any, row: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
              quantity: Quantity, engine: Engine, batch_size: int, plain_logits: Tensor, plain_acts: Tensor,
              plain_calls: list, clean: float, tol: float | None) -> tuple[dict[str, Any], str | None]:
    """The IG cells of one row on ``engine``; the second value says why the engine cannot be trusted
    (its clean pass or its α = 1 cells disagree with the plain forward, to ``tol`` nats in half
    precision), or is None."""
    causal = not is_masked_lm(model) and int(row.position[0]) > 0
    kv, stairs, ran = None, None, engine
    acts = plain_acts
    if causal and engine != "reference":
        with torch.no_grad():
            _, kv = forward_with_cache(model, row.tokens[:, :-1])
        logits, acts, cache, calls = _cached_state(model, row, names, kv)
        why = (disagreement(logits, plain_logits, "the cached clean logits", half=low_precision(model))
               or disagreement(acts, plain_acts, "the cached clean activations", half=low_precision(model)))
        if why is not None:
            return {}, f"{why} (the key/value cache is not honoured)"
        if engine == "fast":
            stairs = build_stairs(model, calls, cache=cache, prefix=cache_layers(kv), read_at=-1,
                                  reference=plain_logits, log_tolerance=tol)
    elif engine == "fast":
        pos = int(row.position[0])
        stairs = build_stairs(model, plain_calls, cache=None, prefix=None, read_at=pos, reference=plain_logits,
                              log_tolerance=tol)
    note = ""
    if engine == "fast" and stairs is None:
        ran, note = "batched", "fast -> batched: the staircase does not reproduce this model's logits"
        log.info("the staircase does not reproduce this model's logits; running the batched engine")
    acts = acts.float()
    start = baseline_values(baseline, model, row, names, acts)
    span = acts - start
    n_layers, m = len(names), len(alphas)
    # every layer gets the m grid points plus α = 0 (the baseline value, for the completeness check) and
    # α = 1 (the clean value, checked against the plain forward), unless the grid has them already
    grid = alphas.to(acts.device)
    extra = [a for a in (0.0, 1.0) if not bool((grid == a).any())]
    grid = torch.cat([grid, grid.new_tensor(extra)])
    z, one = int((grid == 0).nonzero()[0]), int((grid == 1).nonzero()[0])
    g_n = len(grid)
    cell_layer = torch.arange(n_layers, device=acts.device).repeat_interleave(g_n)
    cell_alpha = grid.repeat(n_layers)
    grads = torch.empty(len(cell_layer), acts.shape[-1])
    f = torch.empty(len(cell_layer), dtype=torch.float32)
    if ran == "reference":
        groups = [torch.arange(l * g_n, (l + 1) * g_n) for l in range(n_layers)]
    elif stairs is not None:  # rows sorted by the block they start at
        blocks = torch.tensor([_block_of(n) for n in names])
        groups = [torch.argsort(blocks[cell_layer.cpu()], stable=True)]
    else:
        groups = [torch.arange(len(cell_layer))]
    for group in groups:
        for s in chunks(len(group), batch_size):
            idx = group[s]
            entry = blocks[cell_layer[idx].cpu()] if stairs is not None else None
            g, v = _run_cells(model, row, names, cell_layer[idx], start, span, cell_alpha[idx],
                              kv, quantity, stairs, entry)
            grads[idx], f[idx] = g.cpu(), v.float().cpu()
    grads = grads.view(n_layers, g_n, -1)[:, :m]
    f = f.view(n_layers, g_n)
    why = disagreement(f[:, one], torch.full((n_layers,), clean), f"the α = 1 cells' {quantity}",
                       log_tolerance=tol)
    if why is not None:
        return {}, why
    scores = span.cpu() * torch.einsum("k,lkd->ld", weights.float(), grads)
    delta = clean - f[:, z]
    if not torch.isfinite(scores).all():
        raise NonFiniteError("integrated gradients produced non-finite scores (check the model's dtype and "
                             "the target quantity; 'logprob' of a near-zero probability can overflow)")
    return {"scores": scores, "activations": acts.cpu(), "delta": delta,
            "completeness_error": (scores.sum(-1) - delta).abs(), "clean": clean, "engine": ran, "note": note}, None
