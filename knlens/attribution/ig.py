"""Integrated gradients over MLP neurons (Dai et al., 2022; methods.md §1).

For layer ``l`` the whole activation row at the target position is moved along the straight path
``b + α(a − b)`` (``b`` = baseline, 0 by default), all other layers and positions stay clean, and

    Attr_i^l = (a_i − b_i) · Σ_k w_k ∂f(b + α_k(a − b)) / ∂x_i

with ``f`` = P(target) (or its log / logit) and quadrature ``(α_k, w_k)`` from :mod:`.grids`.

Three engines give the same numbers (up to float rounding):

* ``"reference"`` — the per-layer loop of the published code: for each layer, the full sequence is run
  for every step (in chunks of ``batch_size``); ``L·(m+1)`` sequence forwards per target token.
* ``"batched"`` — every (layer, step) cell is one row of a batch through the whole model. For a
  left-to-right model the prefix before the target position is computed once and its key/value cache
  reused, so each row runs a single token.
* ``"fast"`` (default) — as ``"batched"``, and a row patched at layer ``l`` starts at block ``l``: below
  it the row equals the clean run, so the clean input of block ``l`` is taken from one clean pass and
  blocks ``0..l-1`` are never run again (the batch grows block by block, a "staircase"). The prefix
  keys/values are shared by all rows without copies, and a masked LM's head runs only at ``[MASK]``.
  The blocks are driven with the exact arguments the model's own forward gave them, recorded in the
  clean pass; the engine checks on that pass that its block loop reproduces the model's logits and
  falls back to ``"batched"`` when it does not (an architecture it does not know).

Every row is checked against one plain whole-prompt forward (no cache, no staircase): the faster
engines' clean logits and activations at the target position must equal it, and so must ``f`` at the
α = 1 cell of every layer (an extra cell when the grid lacks it, as α = 0 is for completeness). A row that
fails is recomputed by ``"reference"`` with an :class:`~knlens.errors.EngineFallbackWarning`; the
result's ``settings.engine`` is the engine that ran and ``settings.engine_note`` says why.

``dtype=torch.bfloat16`` runs the model under autocast (bf16 matmuls) while the path points, the
gradients and their quadrature sum stay float32.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> attr = integrated_gradients(model, "the capital of france is", " paris", steps=32)
>>> attr.scores.shape
torch.Size([2, 48])
>>> attr.relative_completeness_error < 0.05     # Σ scores ≈ f(a) − f(baseline) per layer
True
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import __version__
from ..versions import environment
from ..engine import Quantity, chunks, read_quantity, target_logits
from ..compat import cache_keyword_fix
from ..errors import (EngineCheckError, EngineFallbackWarning, NeuronIndexError, NonFiniteError, SettingsError,
                      TargetError)
from ..facts import Fact
from ..hooks import capture, hook_name, hooked, replace_rows
from ..models import is_masked_lm
from ..prompts import MultiToken, Queries, encode
from ..staircase import Stairs, build_stairs, cache_layers, disagreement, recording
from .adaptive import DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE, REFINE_GRID, check_budget, refine
from .grids import Grid, quadrature
from .result import Attribution, AttributionSettings

__all__ = ["integrated_gradients", "attribute", "Engine"]

Engine = Literal["fast", "batched", "reference"]
ENGINES: tuple[str, ...] = ("fast", "batched", "reference")
Baseline = Union[Literal["zero"], Float[Tensor, "layer d"]]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# One query row
# ---------------------------------------------------------------------------------------------------------

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
    with torch.no_grad(), recording(model) as calls, hooked(model, [(n, capture(acts[n], -1)) for n in names]):
        logits = model(row.tokens[:, -1:], past_key_values=cache)[:, -1]
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
            with hooked(model, hooks):
                logits = model(row.tokens[:, -1:].expand(n, 1), past_key_values=cache)[:, -1]
        f = read_quantity(logits, row.target.expand(n), quantity)
        (grads,) = torch.autograd.grad(f.sum(), values)
    return grads.float(), f.detach()


def _block_of(name: str) -> int:
    return int(name.split(".")[1])


def _ig_row(model: Any, row: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
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
        out, why = _ig_cells(model, row, names, alphas, weights, baseline, quantity, engine, batch_size,
                             plain_logits, plain_acts, plain_calls, clean)
        if why is None:
            return out
        note = _fallback(engine, why)
        out, again = _ig_cells(model, row, names, alphas, weights, baseline, quantity, "reference", batch_size,
                               plain_logits, plain_acts, plain_calls, clean)
        if again is not None:
            raise EngineCheckError(f"integrated gradients: even the reference engine disagrees with a plain "
                                   f"forward of the model ({again}); its hooks do not reproduce its own output")
        return {**out, "note": note}


def _ig_cells(model: Any, row: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
              quantity: Quantity, engine: Engine, batch_size: int, plain_logits: Tensor, plain_acts: Tensor,
              plain_calls: list, clean: float) -> tuple[dict[str, Any], str | None]:
    """The IG cells of one row on ``engine``; the second value says why the engine cannot be trusted
    (its clean pass or its α = 1 cells disagree with the plain forward), or is None."""
    causal = not is_masked_lm(model) and int(row.position[0]) > 0
    kv, stairs, ran = None, None, engine
    acts = plain_acts
    if causal and engine != "reference":
        with torch.no_grad():
            _, kv = model(row.tokens[:, :-1], return_type="logits_and_cache")
        logits, acts, cache, calls = _cached_state(model, row, names, kv)
        why = (disagreement(logits, plain_logits, "the cached clean logits")
               or disagreement(acts, plain_acts, "the cached clean activations"))
        if why is not None:
            return {}, f"{why} (the key/value cache is not honoured)"
        if engine == "fast":
            stairs = build_stairs(model, calls, cache=cache, prefix=cache_layers(kv), read_at=-1,
                                  reference=plain_logits)
    elif engine == "fast":
        pos = int(row.position[0])
        stairs = build_stairs(model, plain_calls, cache=None, prefix=None, read_at=pos, reference=plain_logits)
    if engine == "fast" and stairs is None:
        ran = "batched"
        log.info("the staircase does not reproduce this model's logits; running the batched engine")
    acts = acts.float()
    start = torch.zeros_like(acts) if isinstance(baseline, str) else baseline.to(acts)
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
    why = disagreement(f[:, one], torch.full((n_layers,), clean), f"the α = 1 cells' {quantity}")
    if why is not None:
        return {}, why
    scores = span.cpu() * torch.einsum("k,lkd->ld", weights.float(), grads)
    delta = clean - f[:, z]
    if not torch.isfinite(scores).all():
        raise NonFiniteError("integrated gradients produced non-finite scores (check the model's dtype and "
                             "the target quantity; 'logprob' of a near-zero probability can overflow)")
    return {"scores": scores, "activations": acts.cpu(), "delta": delta,
            "completeness_error": (scores.sum(-1) - delta).abs(), "clean": clean, "engine": ran, "note": ""}, None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def _resolve_layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise NeuronIndexError(f"layers {bad} are out of range: the model has {n} layers (0..{n - 1})")
    return list(layers)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise SettingsError(f"unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[key]


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device(getattr(model.cfg, "device", None) or "cpu")


def _model_dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return getattr(model.cfg, "dtype", torch.float32)


@contextlib.contextmanager
def _precision_and_place(model: Any, device: str | torch.device | None, dtype: torch.dtype | None
                         ) -> Iterator[torch.device]:
    """Run on ``device`` (moving the model there for the call, and back) in ``dtype`` (autocast)."""
    home = _model_device(model)
    target = home if device is None else torch.device(device)
    moved = target != home and not (target.type == home.type and target.index is None)
    if moved:
        model.to(target)
    try:
        if dtype is None or dtype == _model_dtype(model):
            yield target
        else:
            with torch.autocast(device_type=target.type, dtype=dtype):
                yield target
    finally:
        if moved:
            model.to(home)


def attribute(model: Any, fact: Fact | str | Sequence[str], target: str | None = None, *,
              hook_point: str = "hook_post", layers: Sequence[int] | None = None, steps: int = 20,
              grid: Grid = "right", quantity: Quantity = "prob", baseline: Baseline = "zero",
              multi_token: MultiToken = "teacher_forcing", token_reduce: Literal["mean", "sum"] = "mean",
              engine: Engine = "fast", batch_size: int = 256, progress: bool = False,
              device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
              tolerance: float | None = DEFAULT_TOLERANCE, max_steps: int = DEFAULT_MAX_STEPS
              ) -> list[Attribution]:
    """Integrated-gradients attributions of every prompt of ``fact`` (one :class:`Attribution` each).

    ``fact`` is a :class:`~knlens.Fact`, or prompts with ``target``. A multi-token target is teacher-forced
    on its gold tokens and the per-token attributions are averaged (``token_reduce="mean"``) or summed.
    ``hook_point`` is ``"hook_post"`` (the input of ``W_out``; default), ``"hook_pre"`` or ``"hook_pre_linear"``.
    ``engine`` is ``"fast"`` (default), ``"batched"`` or ``"reference"`` (same numbers; see the module
    docstring); ``batch_size`` is the number of (layer, step) cells run together, which bounds memory (a
    full scan of a 1 B-parameter model needed 1.4 GiB above its 4.6 GiB of float32 weights at 256, 0.5 GiB
    at 64; see benchmarks/memory.py).
    ``device`` runs the computation there (the model is moved for the call and moved back); ``dtype``
    (``torch.bfloat16``, ``"bf16"``, …) runs the model's matmuls in that precision under autocast, with
    the path points, gradients and their sum in float32; it is recorded in ``settings.dtype``.
    ``tolerance`` (default 0.05) makes the integration adaptive: a prompt whose relative completeness error
    is above it is integrated again on more Gauss–Legendre nodes, doubling up to ``max_steps`` (default
    128), with a :class:`~knlens.errors.CompletenessWarning` if it stays above (see
    :mod:`knlens.attribution.adaptive`); ``settings.grid``/``steps`` are then those of the pass kept and
    ``settings.refinement`` lists every pass. ``tolerance=None`` integrates on ``grid``/``steps`` only.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-gpt2")
    >>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
    >>> [a.scores.shape for a in attribute(model, fact, steps=4)]
    [torch.Size([2, 48]), torch.Size([2, 48])]
    """
    if isinstance(fact, Fact):
        prompts, target = list(fact.prompts), fact.target
    else:
        prompts = [fact] if isinstance(fact, str) else list(fact)
        if target is None:
            raise TargetError("pass a target with prompts, or a Fact")
    if engine not in ENGINES:
        raise SettingsError(f"unknown engine {engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SettingsError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_budget(tolerance, max_steps)
    if tolerance is not None:
        kw: dict[str, Any] = dict(hook_point=hook_point, layers=layers, quantity=quantity, baseline=baseline,
                                  multi_token=multi_token, token_reduce=token_reduce, engine=engine,
                                  batch_size=batch_size, progress=progress, device=device, dtype=dtype,
                                  tolerance=None)
        first = attribute(model, prompts, target, steps=steps, grid=grid, **kw)
        return refine(first, lambda idx, m: attribute(model, [prompts[i] for i in idx], target, steps=m,
                                                      grid=REFINE_GRID, **kw), tolerance, max_steps)
    run_dtype = _resolve_dtype(dtype)
    layer_ids = _resolve_layers(model, layers)
    names = [hook_name(l, hook_point) for l in layer_ids]
    alphas, weights = quadrature(grid, steps)
    q = encode(model, prompts, target, multi_token=multi_token)
    if not isinstance(baseline, str):
        if baseline.shape != (len(layer_ids), model.cfg.d_mlp):
            from ..errors import HookShapeError
            raise HookShapeError(f"baseline has shape {tuple(baseline.shape)}, expected "
                                 f"[layers={len(layer_ids)}, d_mlp={model.cfg.d_mlp}]")
        if not torch.isfinite(baseline).all():
            raise NonFiniteError("the baseline has non-finite values (NaN or inf): every path point would be too")
    with _precision_and_place(model, device, run_dtype) as where:
        q = q.to(where)
        base = baseline if isinstance(baseline, str) else baseline.to(where)
        rows = [_ig_row(model, q.row(i), names, alphas, weights, base, quantity, engine, batch_size)
                for i in tqdm(range(len(q)), desc="integrated gradients", disable=not progress, leave=False)]
    n_tokens = int(q.token_index.max()) + 1
    settings = AttributionSettings(
        method="integrated_gradients", model=str(getattr(model.cfg, "model_name", "?")), hook_point=hook_point,
        steps=steps, grid=grid, quantity=quantity,
        baseline=baseline if isinstance(baseline, str) else "custom tensor",
        engine="+".join(dict.fromkeys(r["engine"] for r in rows)),
        engine_note="; ".join(dict.fromkeys(r["note"] for r in rows if r["note"])), versions=environment(),
        multi_token="single" if n_tokens == 1 else f"teacher_forcing/{token_reduce}",
        dtype=str(run_dtype or _model_dtype(model)).removeprefix("torch."), knlens_version=__version__)
    out = []
    q = q.to("cpu")
    for p_idx, prompt in enumerate(prompts):
        mine = [rows[i] for i in (q.prompt_index == p_idx).nonzero()[:, 0].tolist()]
        reduce = (lambda xs: torch.stack(xs).mean(0)) if token_reduce == "mean" else \
            (lambda xs: torch.stack(xs).sum(0))
        out.append(Attribution(
            prompt=prompt, target=target, settings=settings, layers=tuple(layer_ids),
            scores=reduce([r["scores"] for r in mine]),
            activations=torch.stack([r["activations"] for r in mine]).mean(0),
            delta=reduce([r["delta"] for r in mine]),
            completeness_error=reduce([r["completeness_error"] for r in mine]),
            clean_value=float(torch.tensor([r["clean"] for r in mine]).mean())))
    return out


def integrated_gradients(model: Any, prompt: str, target: str, **kwargs: Any) -> Attribution:
    """Integrated gradients of one prompt (see :func:`attribute` for the keyword arguments)."""
    return attribute(model, [prompt], target, **kwargs)[0]
