"""Integrated gradients over MLP neurons (Dai et al., 2022; docs/methods.md, integrated gradients).

For layer ``l`` the whole activation row at the target position is moved along the straight path
``b + α(a − b)`` (``b`` = baseline, 0 by default), all other layers and positions stay clean, and

    Attr_i^l = (a_i − b_i) · Σ_k w_k ∂f(b + α_k(a − b)) / ∂x_i

with ``f`` = P(target) (or its log / logit) and quadrature ``(α_k, w_k)`` from :mod:`.grids`; ``b`` is any
:mod:`~knlens.methods.attribution.baselines` baseline (zero, a tensor, a per-row function).

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

Query rows of equal length and target position (the paraphrases of a fact, its teacher-forced rows, or the
prompts of many facts with :func:`attribute_facts`) run together on every engine: one plain forward, one
prefix forward and one clean pass for all of them, and each (layer, step) cell of the staircase carries one
row per prompt (:mod:`.cells`).

Every row is checked against one plain whole-prompt forward (no cache, no staircase): the faster
engines' clean logits and activations at the target position must equal it, and so must ``f`` at the
α = 1 cell of every layer (an extra cell when the grid lacks it, as α = 0 is for completeness), row by row. A
group with a row that fails is recomputed by ``"reference"`` with an
:class:`~knlens.core.errors.EngineFallbackWarning`; the result's ``settings.engine`` is the engine that ran and
``settings.engine_note`` says why.

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

import itertools
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from knlens.core.errors import FactError, NeuronIndexError, SettingsError, TargetError
from knlens.core.facts import Fact
from knlens.core.tokens import MultiToken, Queries, encode, stack
from knlens.core.versions import __version__, environment
from knlens.methods.attribution.adaptive import (DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE, REFINE_GRID, check_budget,
                                                 refine)
from knlens.methods.attribution.baselines import Baseline, check_baseline, describe_baseline
from knlens.methods.attribution.cells import ig_queries, shared_clean_passes
from knlens.methods.attribution.grids import Grid, quadrature
from knlens.methods.attribution.result import Attribution, AttributionSettings, Screen
from knlens.methods.attribution.screen import get_screen, screened
from knlens.run.engine import ENGINES, Engine, Quantity
from knlens.run.hooks import hook_name
from knlens.run.placement import model_dtype, precision_and_place, resolve_dtype

__all__ = ["integrated_gradients", "attribute", "attribute_facts"]

log = logging.getLogger(__name__)


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


def _prompts_and_target(fact: Fact | str | Sequence[str], target: str | None) -> tuple[list[str], str]:
    if isinstance(fact, Fact):
        return list(fact.prompts), fact.target
    if target is None:
        raise TargetError("pass a target with prompts, or a Fact")
    return ([fact] if isinstance(fact, str) else list(fact)), target


def attribute(model: Any, fact: Fact | str | Sequence[str], target: str | None = None, *,
              hook_point: str = "hook_post", layers: Sequence[int] | None = None, steps: int = 20,
              grid: Grid = "right", quantity: Quantity = "prob", baseline: Baseline = "zero",
              multi_token: MultiToken = "teacher_forcing", token_reduce: Literal["mean", "sum"] = "mean",
              engine: Engine = "fast", batch_size: int = 256, progress: bool = False,
              device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
              tolerance: float | None = DEFAULT_TOLERANCE, max_steps: int = DEFAULT_MAX_STEPS,
              screen: Screen | str | None = None) -> list[Attribution]:
    """Integrated-gradients attributions of every prompt of ``fact`` (one :class:`Attribution` each).

    ``fact`` is a :class:`~knlens.Fact`, or prompts with ``target``. A multi-token target is teacher-forced
    on its gold tokens and the per-token attributions are averaged (``token_reduce="mean"``) or summed.
    ``hook_point`` is ``"hook_post"`` (the input of ``W_out``; default), ``"hook_pre"`` or ``"hook_pre_linear"``.
    ``engine`` is ``"fast"`` (default), ``"batched"`` or ``"reference"`` (same numbers; see the module
    docstring); ``batch_size`` is the number of (layer, step, prompt) cells run together, which bounds memory
    (a full scan of a 1 B-parameter model needed 1.4 GiB above its 4.6 GiB of float32 weights at 256, 0.5 GiB
    at 64; see benchmarks/memory.py). Prompts (and teacher-forced rows) of equal length share their passes
    (:func:`~knlens.methods.attribution.cells.ig_queries`); :func:`attribute_facts` does so across facts.
    ``device`` runs the computation there (the model is moved for the call and moved back); ``dtype``
    (``torch.bfloat16``, ``"bf16"``, …) runs the model's matmuls in that precision under autocast, with
    the path points, gradients and their sum in float32; it is recorded in ``settings.dtype``.
    ``tolerance`` (default 0.05) makes the integration adaptive: a prompt whose relative completeness error
    is above it is integrated again on more Gauss–Legendre nodes, doubling up to ``max_steps`` (default
    128), with a :class:`~knlens.core.errors.CompletenessWarning` if it stays above (see
    :mod:`knlens.methods.attribution.adaptive`); ``settings.grid``/``steps`` are then those of the pass kept and
    ``settings.refinement`` lists every pass. ``tolerance=None`` integrates on ``grid``/``steps`` only.
    ``screen`` (``"gradxact"``, ``"gauss2"``, … or a :class:`~knlens.methods.attribution.result.Screen`)
    integrates exactly only the layers a cheap first pass picks, checks against the exact scores that the
    others cannot hold a neuron above ``threshold`` × the top score or in the top ``top_k``, and falls back
    to every layer with a :class:`~knlens.core.errors.ScreenFallbackWarning` when it cannot show that (see
    :mod:`knlens.methods.attribution.screen`); each result's ``screen`` records what was left out.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-gpt2")
    >>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
    >>> [a.scores.shape for a in attribute(model, fact, steps=4)]
    [torch.Size([2, 48]), torch.Size([2, 48])]
    """
    return _attribute_items(model, [_prompts_and_target(fact, target)], hook_point=hook_point, layers=layers,
                            steps=steps, grid=grid, quantity=quantity, baseline=baseline, multi_token=multi_token,
                            token_reduce=token_reduce, engine=engine, batch_size=batch_size, progress=progress,
                            device=device, dtype=dtype, tolerance=tolerance, max_steps=max_steps,
                            screen=screen)[0]


def attribute_facts(model: Any, facts: Sequence[Fact], **kwargs: Any) -> list[list[Attribution]]:
    """:func:`attribute` of several facts in one pass (same keyword arguments): the rows of all facts that
    have one length share their clean passes and staircase runs, and so do the prompts that adaptive
    integration refines. One list of attributions per fact, equal to :func:`attribute` of that fact up to float
    rounding (settings included: the engine recorded for a fact is the one that ran its rows). With
    ``screen``, every fact is screened in one pass, picks its own layers and has its guarantee checked on its
    own; the facts that picked the same layers are integrated together, and those whose check fails together
    on every layer (:func:`~knlens.methods.attribution.screen.screened`).

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-llama")
    >>> facts = [Fact(["the capital of france is"], " paris"), Fact(["the capital of spain is"], " madrid")]
    >>> [[a.target for a in attrs] for attrs in attribute_facts(model, facts, steps=4)]
    [[' paris'], [' madrid']]
    """
    bad = [type(f).__name__ for f in facts if not isinstance(f, Fact)]
    if bad:
        raise FactError(f"attribute_facts takes knlens.Fact values, got {', '.join(dict.fromkeys(bad))}")
    return _attribute_items(model, [_prompts_and_target(f, None) for f in facts], **kwargs) if facts else []


def _attribute_items(model: Any, items: list[tuple[list[str], str]], *, steps: int = 20, grid: Grid = "right",
                     engine: Engine = "fast", batch_size: int = 256, tolerance: float | None = DEFAULT_TOLERANCE,
                     max_steps: int = DEFAULT_MAX_STEPS, screen: Screen | str | None = None, **kw: Any
                     ) -> list[list[Attribution]]:
    """Attributions of ``items`` (prompts, target), adaptive when ``tolerance`` is set: the prompts of every
    item above it are refined together; screened (:func:`_screened`) when ``screen`` is set."""
    if engine not in ENGINES:
        raise SettingsError(f"unknown engine {engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SettingsError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_budget(tolerance, max_steps)
    if screen is not None:
        return _screened(model, items, get_screen(screen), steps=steps, grid=grid, engine=engine,
                         batch_size=batch_size, tolerance=tolerance, max_steps=max_steps, **kw)
    kw = {**kw, "engine": engine, "batch_size": batch_size}
    first = _fixed_grid(model, items, steps=steps, grid=grid, **kw)
    if tolerance is None:
        return first
    owner = [(i, j) for i, (prompts, _) in enumerate(items) for j in range(len(prompts))]

    def rerun(idx: list[int], m: int) -> list[Attribution]:
        """The flat prompts ``idx`` (in order) integrated on ``m`` Gauss–Legendre nodes, grouped by item."""
        picked: dict[int, list[int]] = {}
        for k in idx:
            picked.setdefault(owner[k][0], []).append(owner[k][1])
        sub = [([items[i][0][j] for j in js], items[i][1]) for i, js in picked.items()]
        return [a for attrs in _fixed_grid(model, sub, steps=m, grid=REFINE_GRID, **kw) for a in attrs]

    flat = refine([a for attrs in first for a in attrs], rerun, tolerance, max_steps)
    ends = list(itertools.accumulate(len(p) for p, _ in items))
    return [flat[e - len(p):e] for e, (p, _) in zip(ends, items)]


def _screened(model: Any, items: list[tuple[list[str], str]], screen: Screen, *,
              layers: Sequence[int] | None = None, baseline: Baseline = "zero", **kw: Any) -> list[list[Attribution]]:
    """:func:`_attribute_items` of ``items`` with ``screen``: the unscreened call on any of the items and any
    subset of the layers is the ``run`` of :func:`~knlens.methods.attribution.screen.screened`."""
    layer_ids = _resolve_layers(model, layers)
    check_baseline(baseline, len(layer_ids), model.cfg.d_mlp)

    def run(idx: list[int], subset: list[int], **over: Any) -> list[list[Attribution]]:
        base = baseline[[layer_ids.index(l) for l in subset]] if isinstance(baseline, Tensor) else baseline
        return _attribute_items(model, [items[i] for i in idx], layers=subset, baseline=base, **{**kw, **over})

    with shared_clean_passes():  # the screen's plain forwards, prefix caches and staircases serve every pass
        return screened(len(items), screen, layer_ids, run)


def _fixed_grid(model: Any, items: list[tuple[list[str], str]], *, hook_point: str = "hook_post",
                layers: Sequence[int] | None = None, steps: int = 20, grid: Grid = "right",
                quantity: Quantity = "prob", baseline: Baseline = "zero", multi_token: MultiToken = "teacher_forcing",
                token_reduce: Literal["mean", "sum"] = "mean", engine: Engine = "fast", batch_size: int = 256,
                progress: bool = False, device: str | torch.device | None = None,
                dtype: torch.dtype | str | None = None) -> list[list[Attribution]]:
    """Attributions of ``items`` (prompts, target) on one grid, all their rows run by one
    :func:`~knlens.methods.attribution.cells.ig_queries`."""
    run_dtype = resolve_dtype(dtype)
    layer_ids = _resolve_layers(model, layers)
    names = [hook_name(l, hook_point) for l in layer_ids]
    alphas, weights = quadrature(grid, steps)
    qs = [encode(model, prompts, target, multi_token=multi_token) for prompts, target in items]
    check_baseline(baseline, len(layer_ids), model.cfg.d_mlp)
    with precision_and_place(model, device, run_dtype) as where:
        base = baseline.to(where) if isinstance(baseline, Tensor) else baseline
        rows = ig_queries(model, stack(qs).to(where), names, alphas, weights, base, quantity, engine, batch_size,
                          progress)
    common = dict(
        method="integrated_gradients", model=str(getattr(model.cfg, "model_name", "?")), hook_point=hook_point,
        steps=steps, grid=grid, quantity=quantity, baseline=describe_baseline(baseline), versions=environment(),
        dtype=str(run_dtype or model_dtype(model)).removeprefix("torch."), knlens_version=__version__)
    out, start = [], 0
    for q, (prompts, target) in zip(qs, items):
        mine, start = rows[start:start + len(q)], start + len(q)
        out.append(_attributions(q.to("cpu"), mine, prompts, target, layer_ids, token_reduce, AttributionSettings(
            **common, engine="+".join(dict.fromkeys(r["engine"] for r in mine)),
            engine_note="; ".join(dict.fromkeys(r["note"] for r in mine if r["note"])),
            multi_token="single" if int(q.token_index.max()) == 0 else f"teacher_forcing/{token_reduce}")))
    return out


def _attributions(q: Queries, rows: list[dict[str, Any]], prompts: list[str], target: str, layer_ids: list[int],
                  token_reduce: str, settings: AttributionSettings) -> list[Attribution]:
    """One :class:`Attribution` per prompt from its rows (one per target token, reduced)."""
    reduce = (lambda xs: torch.stack(xs).mean(0)) if token_reduce == "mean" else (lambda xs: torch.stack(xs).sum(0))
    out = []
    for p_idx, prompt in enumerate(prompts):
        mine = [rows[i] for i in (q.prompt_index == p_idx).nonzero()[:, 0].tolist()]
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
