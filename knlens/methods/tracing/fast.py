"""The fast tracing engine: at each traced token, the cells of every kind and all noise samples as rows of one
staircase run over the positions from that token on; and the checks of the fast and batched engines against
plain forwards (P_corrupted, P_clean).

A cell restoring ``kind`` at token ``t`` over blocks ``[a, e)`` equals the corrupted run below block ``a`` and,
by causal attention, at every position before ``t``. So it enters token ``t``'s staircase (the corrupted run of
positions ``t..`` on the corrupted keys/values of the earlier ones, recorded once per token) at block ``a`` with
the corrupted input there, and only the read-out position is unembedded. Cells that restore the same states
run once (windows clamped at the first or last layer), and of two windows of one kind and token with the same
first block the narrower one forks from the wider one where it ends: below that block they are one run.

The fast engine's check rows run with its cells, and its numbers are kept only when they agree with plain
forwards of the model (:func:`fast_trace`).

>>> [[(u.start, u.end, u.entry, u.parent) for u in g] for g in fork_groups("mlp", [(0, 2), (0, 3), (0, 3), (1, 3)])]
[[(0, 3, 0, -1), (0, 2, 2, 0)], [(1, 3, 1, -1)]]
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.methods.tracing.corruption import EMBED_HOOK, corruption_hook
from knlens.methods.tracing.setup import KIND_POINTS, TraceSetup, run_rows
from knlens.methods.tracing.spans import window_layers
from knlens.run.engine import Quantity, chunks, read_quantity
from knlens.run.hooks import Hook, HookFn, hook_name, hooked
from knlens.run.staircase import Stairs, build_stairs, cache_layers, disagreement, record_blocks

__all__ = ["Unit", "fork_groups", "token_stairs", "fast_trace", "check_batched"]


@dataclass(frozen=True)
class Unit:
    """One run through a token's staircase (a row per noise sample): ``kind`` restored at the token over
    blocks ``[start, end)`` (at every position of the staircase when ``everywhere``; ``kind`` None restores
    nothing), entering at block ``entry`` with the corrupted run's input there or, when ``parent >= 0``, as a
    fork of that unit of its group (whose restorations agree with this one's below ``entry``)."""

    kind: str | None
    start: int
    end: int
    entry: int
    parent: int = -1
    everywhere: bool = False


def fork_groups(kind: str, spans: Iterable[tuple[int, int]]) -> list[list[Unit]]:
    """The units that run the restorations ``spans`` (``[start, end)`` blocks of ``kind`` at one token): one per
    distinct span; per first block a group of the widest span and the narrower ones forking from it where
    they end (see the module's example)."""
    ends: dict[int, set[int]] = {}
    for a, e in spans:
        ends.setdefault(a, set()).add(e)
    groups = []
    for a in sorted(ends):
        wide, *narrow = sorted(ends[a], reverse=True)
        groups.append([Unit(kind, a, wide, a)] + [Unit(kind, a, e, e, parent=0) for e in narrow])
    return groups


def corrupted_prefix(model: Any, tokens: Int[Tensor, "sample t"], hooks: list[Hook]) -> Any:
    """The key/value cache of the corrupted run over the first ``t`` positions."""
    return record_blocks(model, tokens, hooks)[1]


def _corrupt(setup: TraceSetup, start: int, stop: int | None) -> list[Hook]:
    """The corruption hook of a run of positions ``start..stop - 1`` (``stop`` None: to the end)."""
    idx = [i for i, p in enumerate(setup.positions) if p >= start and (stop is None or p < stop)]
    if not idx:
        return []
    samples = torch.arange(setup.corruption.samples)
    return [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values[:, idx],
                                         [setup.positions[i] - start for i in idx], samples))]


def token_stairs(model: Any, setup: TraceSetup, tokens: Sequence[int]) -> dict[int, Stairs] | None:
    """One staircase per token (shared by every kind): the corrupted run of the positions from that token to
    the read-out position on the corrupted keys/values of the earlier ones, the noise samples as rows. Each
    later token's keys/values are the earlier recording's cache, cut. None when a staircase cannot be built
    or a token lies after the read-out position (only with padding; rare). Call it within
    :func:`~knlens.run.compat.cache_keyword_fix`."""
    if max(tokens) > setup.position:
        return None
    rows = setup.tokens[:, :setup.position + 1].expand(setup.corruption.samples, -1)
    out: dict[int, Stairs] = {}
    full = None  # the cache of the corrupted run over every position, once a token has been recorded
    for t in sorted(set(tokens)):
        cache = None
        if t > 0 and full is not None and hasattr(full, "crop"):
            cache = copy.deepcopy(full)
            cache.crop(t - cache.get_seq_length())  # a negative count: that many positions removed
        elif t > 0:
            cache = corrupted_prefix(model, rows[:, :t], _corrupt(setup, 0, t))
        calls, full = record_blocks(model, rows[:, t:], _corrupt(setup, t, None), cache=cache)
        prefix = cache_layers(cache, t) if cache is not None else None
        stairs = build_stairs(model, calls, cache=cache, prefix=prefix, read_at=-1, reference=None)
        if stairs is None:
            return None
        out[t] = stairs
    return out


def _restore(state: Float[Tensor, "pos d"], upto: Int[Tensor, "batch"]) -> HookFn:
    """Hook: row ``r`` gets the clean ``state`` at its first ``upto[r]`` positions."""
    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        sel = torch.arange(act.shape[1], device=act.device)[None, :] < upto.to(act.device)[:, None]
        return torch.where(sel[:, :, None], state.to(act.device, act.dtype)[None], act)
    return hook


def _restore_hooks(units: Sequence[Unit], clean: Mapping[str, Tensor], t: int, position: int, k: int,
                   n_layers: int) -> list[Hook]:
    """The restorations of ``units`` (sorted by entry; ``k`` rows each) in token ``t``'s staircase."""
    hooks = []
    for kind in dict.fromkeys(u.kind for u in units if u.kind is not None):
        for layer in range(units[0].entry, n_layers):
            here = [u for u in units if u.entry <= layer]  # the units in the batch at this block
            upto = torch.tensor([(position + 1 - t if u.everywhere else 1)
                                 if u.kind == kind and u.start <= layer < u.end else 0 for u in here])
            if bool(upto.any()):
                state = clean[kind][layer, t:position + 1]
                hooks.append((hook_name(layer, KIND_POINTS[kind]), _restore(state, upto.repeat_interleave(k))))
    return hooks


def _packs(groups: list[list[Unit]], size: int) -> list[list[list[Unit]]]:
    """Consecutive groups packed into runs of at most ``size`` units (a larger group runs alone)."""
    packs: list[list[list[Unit]]] = [[]]
    for g in groups:
        if packs[-1] and sum(map(len, packs[-1])) + len(g) > size:
            packs.append([])
        packs[-1].append(g)
    return packs


def run_units(model: Any, setup: TraceSetup, stairs: Stairs, t: int, groups: list[list[Unit]],
              clean: Mapping[str, Tensor], budget: int) -> Iterator[tuple[list[Unit], Float[Tensor, "rows d"]]]:
    """The units of ``groups`` run through token ``t``'s staircase, in runs of at most ``budget``
    row-positions (groups taken by their first block, so that a run's units enter close together): per run
    its units (in row order, ``samples`` rows each) and their last block's output at the read-out position."""
    k, n_pos = setup.corruption.samples, setup.position + 1 - t
    for pack in _packs(sorted(groups, key=lambda g: g[0].entry), max(1, budget // (k * n_pos))):
        units, parent = [], []
        for g in pack:
            parent += [len(units) + u.parent if u.parent >= 0 else -1 for u in g]
            units += g
        order = sorted(range(len(units)), key=lambda i: units[i].entry)
        where = {i: j for j, i in enumerate(order)}
        ranked = [units[i] for i in order]
        entry = torch.tensor([u.entry for u in ranked])
        parents = torch.tensor([where[parent[i]] if parent[i] >= 0 else -1 for i in order])
        with hooked(model, _restore_hooks(ranked, clean, t, setup.position, k, model.cfg.n_layers)):
            final = stairs.final(model, entry, parents)
        yield ranked, final


def fast_trace(model: Any, setup: TraceSetup, kinds: Sequence[str], cells: Sequence[tuple[int, int]],
               windows: Mapping[str, int], clean: Mapping[str, Tensor], p_clean: float, p_corr: float,
               quantity: Quantity, batch_size: int, tol: float | None = None) -> tuple[dict[str, Tensor], str | None]:
    """P of every ``(layer, token)`` cell per kind (averaged over the noise samples), and why the engine
    cannot be trusted (None when it can). Call it within :func:`~knlens.run.compat.cache_keyword_fix`.

    Each token's staircase also runs a unit restoring nothing, which must give the plain forward's
    P_corrupted; the first corrupted token's, a unit with block 0's clean output restored at every position,
    which must give P_clean. Memory is bounded as a whole-model forward of ``batch_size`` rows bounds it by its
    logits: an unembedding takes at most ``batch_size × prompt length`` rows, and a staircase run as many
    row-positions of MLP activations as that is floats of logits.
    """
    first, n_layers, k = min(setup.positions), model.cfg.n_layers, setup.corruption.samples
    rows = batch_size * setup.tokens.shape[1]
    budget = rows * max(1, model.cfg.d_vocab // (getattr(model.cfg, "d_mlp", None) or 4 * model.cfg.d_model))
    tokens = sorted({t for _, t in cells} | {first})
    cannot = "its staircase cannot be built or run on this model (or a traced token lies after the read-out position)"
    runs = token_stairs(model, setup, tokens)
    if runs is None:
        return {}, cannot
    nothing, everything = Unit(None, 0, 0, 0), Unit("resid", 0, 1, 0, everywhere=True)
    span = {kind: {l: (w[0], w[-1] + 1) for l, _ in cells for w in [window_layers(l, windows[kind], n_layers)]}
            for kind in kinds}  # the blocks [start, end) each layer's cell restores
    ran: list[tuple[int, list[Unit]]] = []
    finals = []
    try:
        for t in tokens:
            groups = [[nothing]] + ([[everything]] if t == first else [])
            for kind in kinds:
                groups += fork_groups(kind, {span[kind][l] for l, c in cells if c == t})
            for ranked, final in run_units(model, setup, runs[t], t, groups, clean, budget):
                ran.append((t, ranked))
                finals.append(final)
        h = torch.cat(finals)
        target = torch.full((h.shape[0],), setup.target, device=h.device)
        p = torch.cat([read_quantity(runs[first].tail(h[s, None])[:, 0], target[s], quantity).cpu()
                       for s in chunks(h.shape[0], rows)]).view(-1, k).mean(1).tolist()
    except Exception as err:  # noqa: BLE001 - an architecture the block loop does not fit
        return {}, f"{cannot}: {type(err).__name__}: {err}"
    values = iter(p)
    got = {(t, u): next(values) for t, ranked in ran for u in ranked}
    by_span = {(t, u.kind, u.start, u.end): v for (t, u), v in got.items() if not u.everywhere}
    out = {kind: torch.tensor([by_span[(t, kind, *span[kind][l])] for l, t in cells]) for kind in kinds}
    p_nothing = torch.tensor([got[(t, nothing)] for t in tokens])
    return out, (disagreement(p_nothing, torch.full_like(p_nothing, p_corr), "P_corrupted through the cached prefix",
                              log_tolerance=tol)
                 or disagreement(torch.tensor([got[(first, everything)]]), torch.tensor([p_clean]),
                                 "P_clean through the cached prefix", log_tolerance=tol))


def check_batched(model: Any, setup: TraceSetup, clean: Mapping[str, Tensor], p_clean: float, p_corr: float,
                   quantity: Quantity, tol: float | None = None) -> str | None:
    """Why the batched engine cannot be trusted, or None: as rows of one batch, restoring nothing must give
    P_corrupted and restoring block 0's clean output at every position P_clean."""
    masks = torch.zeros(2, model.cfg.n_layers, setup.tokens.shape[1], dtype=torch.bool)
    masks[1, 0] = True
    got = run_rows(model, setup, {"resid": masks}, clean, quantity)
    return disagreement(got, torch.tensor([p_corr, p_clean]), "P_corrupted and P_clean as rows of one batch",
                        log_tolerance=tol)
