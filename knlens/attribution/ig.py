"""Integrated gradients over MLP neurons (Dai et al., 2022; methods.md §1).

For layer ``l`` the whole activation row at the target position is moved along the straight path
``b + α(a − b)`` (``b`` = baseline, 0 by default), all other layers and positions stay clean, and

    Attr_i^l = (a_i − b_i) · Σ_k w_k ∂f(b + α_k(a − b)) / ∂x_i

with ``f`` = P(target) (or its log / logit) and quadrature ``(α_k, w_k)`` from :mod:`.grids`.

Two engines give the same numbers:

* ``"reference"`` — the per-layer loop of the published code: for each layer, the full sequence is run
  for every step (in chunks of ``batch_size``).
* ``"fast"`` (default) — every (layer, step) cell is one row of a batch. For a left-to-right model
  the prefix before the target position is computed once and its key/value cache reused, so each
  row runs a single token. Masked LMs (no causal structure) batch the full sequence.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> attr = integrated_gradients(model, "the capital of france is", " paris", steps=8)
>>> attr.scores.shape
torch.Size([2, 48])
>>> attr.relative_completeness_error < 0.1
True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import __version__
from ..engine import Quantity, chunks, read_quantity, target_logits
from ..errors import NeuronIndexError, NonFiniteError
from ..facts import Fact
from ..hooks import hook_name, hooked, replace_rows
from ..models import is_masked_lm
from ..prompts import MultiToken, Queries, encode
from .grids import Grid, quadrature
from .result import Attribution, AttributionSettings

__all__ = ["integrated_gradients", "attribute", "Engine"]

Engine = Literal["fast", "reference"]
Baseline = Union[Literal["zero"], Float[Tensor, "layer d"]]


def _clean_state(model: Any, row: Queries, names: list[str], kv: Any, quantity: Quantity
                 ) -> tuple[Float[Tensor, "layer d"], float]:
    """Clean activations at the target position for every hook in ``names``, and the clean f."""
    acts: dict[str, Tensor] = {}

    def saver(name: str):
        return lambda act, hook: acts.__setitem__(name, act[0, pos].detach())

    with torch.no_grad():
        if kv is None:
            pos = int(row.position[0])
            with hooked(model, [(n, saver(n)) for n in names]):
                logits = model(row.tokens, attention_mask=row.attention_mask)[:, pos]
        else:
            pos = -1
            with hooked(model, [(n, saver(n)) for n in names]):
                logits = model(row.tokens[:, -1:], past_key_values=copy.deepcopy(kv))[:, -1]
    value = float(read_quantity(logits, row.target, quantity)[0])
    return torch.stack([acts[n] for n in names]), value


def _run_cells(model: Any, row: Queries, names: list[str], cell_layer: Tensor, start: Tensor, span: Tensor,
               alphas: Tensor, kv: Any, quantity: Quantity) -> tuple[Tensor, Tensor]:
    """One batch of IG cells: cell ``r`` sets layer ``cell_layer[r]`` to ``start + alphas[r]·span``.

    Returns ``(grads [cells, d], f [cells])``. With ``kv`` (a prefix cache) only the target token runs.
    """
    n = len(cell_layer)
    values = (start[cell_layer] + alphas[:, None].to(span.dtype) * span[cell_layer]).detach().requires_grad_(True)
    hooks = []
    for layer in cell_layer.unique().tolist():
        rows = cell_layer == layer
        hooks.append((names[layer], replace_rows(values[rows], rows, -1 if kv is not None else row.position[0])))
    with torch.enable_grad():
        if kv is None:
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


def _ig_row(model: Any, row: Queries, names: list[str], alphas: Tensor, weights: Tensor, baseline: Baseline,
            quantity: Quantity, engine: Engine, batch_size: int) -> dict[str, Any]:
    """Integrated gradients of one query row, for all hook points ``names``."""
    causal = not is_masked_lm(model) and int(row.position[0]) > 0
    kv = None
    if causal and engine == "fast":
        with torch.no_grad():
            _, kv = model(row.tokens[:, :-1], return_type="logits_and_cache")
    acts, clean = _clean_state(model, row, names, kv, quantity)
    start = torch.zeros_like(acts) if isinstance(baseline, str) else baseline.to(acts)
    span = acts - start
    n_layers, m = len(names), len(alphas)
    # every layer gets the m grid points plus α = 0 (the baseline value, for the completeness check)
    grid = torch.cat([alphas, alphas.new_zeros(1)]).to(acts.device)
    cell_layer = torch.arange(n_layers, device=acts.device).repeat_interleave(m + 1)
    cell_alpha = grid.repeat(n_layers)
    grads = torch.empty(len(cell_layer), acts.shape[-1])
    f = torch.empty(len(cell_layer), dtype=torch.float32)
    groups = [torch.arange(len(cell_layer))] if engine == "fast" else \
        [torch.arange(l * (m + 1), (l + 1) * (m + 1)) for l in range(n_layers)]
    for group in groups:
        for s in chunks(len(group), batch_size):
            idx = group[s]
            g, v = _run_cells(model, row, names, cell_layer[idx], start, span, cell_alpha[idx],
                              kv if engine == "fast" else None, quantity)
            grads[idx], f[idx] = g.cpu(), v.float().cpu()
    grads = grads.view(n_layers, m + 1, -1)[:, :m]
    f = f.view(n_layers, m + 1)
    scores = span.float().cpu() * torch.einsum("k,lkd->ld", weights.float(), grads)
    delta = clean - f[:, m]
    if not torch.isfinite(scores).all():
        raise NonFiniteError("integrated gradients produced non-finite scores (check the model's dtype and "
                             "the target quantity; 'logprob' of a near-zero probability can overflow)")
    return {"scores": scores, "activations": acts.float().cpu(), "delta": delta,
            "completeness_error": (scores.sum(-1) - delta).abs(), "clean": clean}


def _resolve_layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise NeuronIndexError(f"layers {bad} are out of range: the model has {n} layers (0..{n - 1})")
    return list(layers)


def attribute(model: Any, fact: Fact | str | Sequence[str], target: str | None = None, *,
              hook_point: str = "hook_post", layers: Sequence[int] | None = None, steps: int = 20,
              grid: Grid = "right", quantity: Quantity = "prob", baseline: Baseline = "zero",
              multi_token: MultiToken = "teacher_forcing", token_reduce: Literal["mean", "sum"] = "mean",
              engine: Engine = "fast", batch_size: int = 64, progress: bool = False) -> list[Attribution]:
    """Integrated-gradients attributions of every prompt of ``fact`` (one :class:`Attribution` each).

    ``fact`` is a :class:`~knlens.Fact`, or prompts with ``target``. A multi-token target is teacher-forced
    on its gold tokens and the per-token attributions are averaged (``token_reduce="mean"``) or summed.
    ``hook_point`` is ``"hook_post"`` (the input of ``W_out``; default), ``"hook_pre"`` or ``"hook_pre_linear"``.

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
            raise ValueError("pass a target with prompts, or a Fact")
    if engine not in ("fast", "reference"):
        raise ValueError(f"unknown engine {engine!r}; use 'fast' or 'reference'")
    layer_ids = _resolve_layers(model, layers)
    names = [hook_name(l, hook_point) for l in layer_ids]
    alphas, weights = quadrature(grid, steps)
    q = encode(model, prompts, target, multi_token=multi_token)
    if not isinstance(baseline, str):
        if baseline.shape != (len(layer_ids), model.cfg.d_mlp):
            from ..errors import HookShapeError
            raise HookShapeError(f"baseline has shape {tuple(baseline.shape)}, expected "
                                 f"[layers={len(layer_ids)}, d_mlp={model.cfg.d_mlp}]")
    rows = [_ig_row(model, q.row(i), names, alphas, weights, baseline, quantity, engine, batch_size)
            for i in tqdm(range(len(q)), desc="integrated gradients", disable=not progress, leave=False)]
    n_tokens = int(q.token_index.max()) + 1
    settings = AttributionSettings(
        method="integrated_gradients", model=str(getattr(model.cfg, "model_name", "?")), hook_point=hook_point,
        steps=steps, grid=grid, quantity=quantity,
        baseline=baseline if isinstance(baseline, str) else "custom tensor", engine=engine,
        multi_token="single" if n_tokens == 1 else f"teacher_forcing/{token_reduce}",
        dtype=str(model.cfg.dtype).removeprefix("torch."), knlens_version=__version__)
    out = []
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
