"""The fast tracing engine: cells as batch rows of a staircase that starts each cell at its first restored
block and runs only the tokens from the restored one on (causal attention), reading the corrupted run's
keys/values of earlier tokens from a cache; and the checks of the fast and batched engines against plain
forwards (P_corrupted, P_clean)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.methods.tracing.corruption import EMBED_HOOK, corruption_hook
from knlens.methods.tracing.setup import KIND_POINTS, TraceSetup, run_rows
from knlens.methods.tracing.spans import window_layers
from knlens.run.engine import Quantity, chunks, forward_from_cache, forward_with_cache, read_quantity
from knlens.run.hooks import Hook, hook_name, hooked, replace_rows
from knlens.run.staircase import Stairs, build_stairs, cache_layers, disagreement, recording

__all__ = ["TokenRun", "token_stairs", "fast_cells", "check_fast", "check_batched"]

def corrupted_prefix(model: Any, tokens: Int[Tensor, "sample t"], hooks: list[Hook]) -> Any:
    """The key/value cache of the corrupted run over the first ``t`` positions."""
    return forward_with_cache(model, tokens, hooks)[1]


@dataclass(frozen=True)
class TokenRun:
    """The corrupted run of positions ``t..position`` on the cached corrupted prefix of positions ``< t``:
    its staircase (which reproduces it, checked by :func:`~knlens.run.staircase.build_stairs`) and the
    quantity it gave at the read-out position, averaged over the noise samples."""

    stairs: Stairs
    p_cached: float


def stairs_from(model: Any, setup: TraceSetup, t: int, quantity: Quantity) -> TokenRun | None:
    """The :class:`TokenRun` from token ``t`` (all noise samples as rows), or None when no staircase
    reproduces it. Call it within :func:`~knlens.run.compat.cache_keyword_fix`."""
    k = setup.corruption.samples
    samples = torch.arange(k)
    tokens = setup.tokens[:, :setup.position + 1].expand(k, -1)
    before = [i for i, p in enumerate(setup.positions) if p < t]
    after = [i for i, p in enumerate(setup.positions) if p >= t]

    def corrupt(idx: list[int], offset: int) -> list[Hook]:
        if not idx:
            return []
        return [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values[:, idx],
                                             [setup.positions[i] - offset for i in idx], samples))]
    cache = corrupted_prefix(model, tokens[:, :t], corrupt(before, 0)) if t > 0 else None
    with recording(model) as calls:
        logits = forward_from_cache(model, tokens[:, t:], cache, corrupt(after, t))[:, -1]
    prefix = cache_layers(cache, t) if cache is not None else None
    stairs = build_stairs(model, calls, cache=cache, prefix=prefix, read_at=-1, reference=logits)
    if stairs is None:
        return None
    target = torch.full((logits.shape[0],), setup.target, device=logits.device)
    return TokenRun(stairs, float(read_quantity(logits, target, quantity).mean()))


def token_stairs(model: Any, setup: TraceSetup, tokens: Sequence[int], quantity: Quantity
                  ) -> dict[int, TokenRun] | None:
    """One staircase per restored token (shared by every kind), or None when the model's blocks cannot be
    driven directly or a token lies after the read-out position (only with padding; rare)."""
    if max(tokens) > setup.position:
        return None
    out = {}
    for t in sorted(set(tokens)):
        run = stairs_from(model, setup, t, quantity)
        if run is None:
            return None
        out[t] = run
    return out


def fast_cells(model: Any, setup: TraceSetup, kind: str, cells: Sequence[tuple[int, int]], window: int,
                clean: Mapping[str, Tensor], quantity: Quantity, batch_size: int,
                runs: Mapping[int, TokenRun]) -> Tensor:
    """P of each cell (averaged over the noise samples) by the staircases of :func:`token_stairs`.

    A cell restoring ``kind`` at token ``t`` over layers ``[a, b)`` equals the corrupted run below block
    ``a`` and at positions before ``t`` (causal attention), so it enters at block ``a`` with the corrupted
    input there and runs positions ``t..`` only, reading keys/values of earlier positions from the
    corrupted run. Cells of one token share one staircase, sorted by the block they enter at.
    """
    k, n_layers = setup.corruption.samples, model.cfg.n_layers
    out = torch.empty(len(cells))
    by_token: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(cells):
        by_token.setdefault(t, []).append(i)
    for t, idx in by_token.items():
        stairs = runs[t].stairs
        span = {i: window_layers(cells[i][0], window, n_layers) for i in idx}
        idx = sorted(idx, key=lambda i: span[i][0])
        src = clean[kind][:, t]  # [layer, d]
        for s in chunks(len(idx), max(1, batch_size // k)):
            part = idx[s]
            entry = torch.tensor([span[i][0] for i in part])
            end = torch.tensor([span[i][-1] + 1 for i in part])
            hooks = []
            for layer in range(int(entry.min()), int(end.max())):
                present = int((entry <= layer).sum())  # units in the batch at this block (sorted by entry)
                restore = (end[:present] > layer).repeat_interleave(k)
                if bool(restore.any()):
                    values = src[layer].expand(int(restore.sum()), -1)
                    hooks.append((hook_name(layer, KIND_POINTS[kind]), replace_rows(values, restore, 0)))
            out[torch.tensor(part)] = stairs_read(model, setup, stairs, entry, hooks, quantity)
    return out


def stairs_read(model: Any, setup: TraceSetup, stairs: Stairs, entry: Int[Tensor, "units"], hooks: list[Hook],
                 quantity: Quantity) -> Float[Tensor, "units"]:
    """The quantity of each unit of ``stairs`` entering at ``entry``, averaged over the noise samples."""
    with hooked(model, hooks):
        logits = stairs.logits(model, entry)
    target = torch.full((logits.shape[0],), setup.target, device=logits.device)
    return read_quantity(logits, target, quantity).cpu().view(len(entry), -1).mean(1)


def check_fast(model: Any, setup: TraceSetup, runs: Mapping[int, TokenRun] | None, clean: Mapping[str, Tensor],
                p_clean: float, p_corr: float, quantity: Quantity, tol: float | None = None) -> str | None:
    """Why the fast engine cannot be trusted, or None. Every token's cached corrupted run (which its
    staircase reproduces) must give P_corrupted; the staircase of the first corrupted token with block 0's
    clean output restored at all its positions must give P_clean."""
    if runs is None:
        return ("its staircase cannot be built or does not reproduce the model's own forward on this model "
                "(or a traced token lies after the read-out position)")
    nothing = torch.tensor([r.p_cached for r in runs.values()])
    why = disagreement(nothing, torch.full_like(nothing, p_corr), "P_corrupted through the cached prefix",
                        log_tolerance=tol)
    if why is not None:
        return why
    first = min(setup.positions)
    run = runs.get(first) or stairs_from(model, setup, first, quantity)
    if run is None:
        return f"no staircase can be built at the first corrupted token {first}"
    state = clean["resid"][0, first:setup.position + 1]  # block 0's clean output at the staircase's positions
    hooks = [(hook_name(0, KIND_POINTS["resid"]), lambda act, hook: state.to(act.device, act.dtype).expand_as(act))]
    everything = stairs_read(model, setup, run.stairs, torch.zeros(1, dtype=torch.long), hooks, quantity)
    return disagreement(everything, torch.tensor([p_clean]), "P_clean through the cached prefix",
                        log_tolerance=tol)


def check_batched(model: Any, setup: TraceSetup, clean: Mapping[str, Tensor], p_clean: float, p_corr: float,
                   quantity: Quantity, tol: float | None = None) -> str | None:
    """Why the batched engine cannot be trusted, or None: as rows of one batch, restoring nothing must give
    P_corrupted and restoring block 0's clean output at every position P_clean."""
    masks = torch.zeros(2, model.cfg.n_layers, setup.tokens.shape[1], dtype=torch.bool)
    masks[1, 0] = True
    got = run_rows(model, setup, {"resid": masks}, clean, quantity)
    return disagreement(got, torch.tensor([p_corr, p_clean]), "P_corrupted and P_clean as rows of one batch",
                        log_tolerance=tol)
