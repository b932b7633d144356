"""Causal tracing (Meng et al., 2022; methods.md §9) as compositions of hooks, batched over cells.

Three runs of one prompt:

* **clean** — the prompt as is; its residual stream, MLP outputs and attention outputs are cached;
* **corrupted** — the subject tokens' embeddings (at ``hook_embed``, the token embeddings as the model adds
  them; GPT-2's positional embeddings are separate and untouched) get Gaussian noise ν·N(0, I) with ν = 3 ×
  the std of the ``hook_embed`` outputs over the vocabulary (10 seeded samples as Meng et al., the same
  noise for every restoration), or are replaced by a fixed vector, or by another subject's embeddings
  (:mod:`knlens.corruption`);
* **restored** — the corrupted run with one (token, layer) state copied back from the clean cache: the
  residual stream (``blocks.{l}.hook_resid_post``), the MLP output (``hook_mlp_out``) or the attention
  output (``hook_attn_out``); for MLP and attention a window of layers around ``l`` (10, as Meng et al.).

Indirect effect of a cell = P_restored − P_corrupted; total effect = P_clean − P_corrupted. As Meng et al.,
only facts the model knows are traced: the clean run's top token must be the target (``known_only=False``
traces any fact; :func:`trace_facts` skips unknown facts with a warning). Engines (same numbers up to float
rounding):

* ``"fast"`` (default) — cells are rows of a :mod:`~knlens.staircase`: a cell restoring layers ``[a, b)`` at
  token ``t`` equals the corrupted run below block ``a`` and, by causal attention, at every token before
  ``t``; so it starts at block ``a`` with the corrupted run's input there and runs tokens ``t..`` only,
  reading the corrupted keys/values of earlier tokens (a masked LM runs ``"batched"``);
* ``"batched"`` — every cell is one batch row of whole-model forwards carrying its own restoration;
* ``"loop"`` — one forward per cell (Meng et al.'s schedule), the reference the tests compare with.

Before ``"fast"`` or ``"batched"`` is used, its cells that restore nothing and everything are checked
against plain forwards of the model (P_corrupted, P_clean); an engine that disagrees is replaced by the
next one down with a warning (:mod:`knlens.tracing_check`). ``Trace.settings["engine"]`` is the engine
that ran and ``settings["engine_note"]`` why another was replaced ("" when none was).

The corruption can target the subject (default), the relation tokens (``corrupt="relation"``: the prompt
tokens that are neither the subject, BOS nor the final token) or explicit positions.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> t = trace(model, "the capital of france is", " paris", subject="france", samples=2,
...           known_only=False)                      # a random model does not know the fact
>>> t.effects["mlp"].shape, t.subject_span, t.settings["engine"]   # [layer, token]; token 4 is "france"
(torch.Size([2, 6]), (4, 5), 'fast')
>>> list(t.to_frame().columns)[:4]
['kind', 'layer', 'position', 'token']
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .compat import cache_keyword_fix
from .corruption import DEFAULT_SAMPLES, EMBED_HOOK, Corruption, corruption_hook, embedding_std
from .engine import chunks, read_quantity
from .errors import NotKnownError, PromptError, TargetError, TracingSettingError
from .hooks import Hook, capture, hook_name, hooked, replace_rows
from .models import is_masked_lm
from .prompts import encode
from .staircase import Stairs, build_stairs, cache_layers, disagreement, recording
from .tracing_check import choose_engine
from .tracing_result import Trace, group_effects
from .tracing_spans import _n_prefix, relation_positions, subject_token_span, token_groups, window_layers
from .versions import environment

__all__ = [
    "Kind", "KINDS", "KIND_POINTS", "DEFAULT_WINDOWS", "DEFAULT_SAMPLES", "EMBED_HOOK", "Corruption", "Trace",
    "trace", "trace_facts", "restore", "window_layers", "subject_token_span", "relation_positions",
    "token_groups", "group_effects", "embedding_std", "corruption_hook", "restore_hooks",
]

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
KIND_POINTS: dict[str, str] = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
DEFAULT_WINDOWS: dict[str, int] = {"resid": 1, "mlp": 10, "attn": 10}
Engine = Literal["fast", "batched", "loop"]
ENGINES: tuple[str, ...] = ("fast", "batched", "loop")
Quantity = Literal["prob", "logprob", "logit"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- restoring

def restore_hooks(clean: Mapping[str, Float[Tensor, "layer pos d"]],
                  masks: Mapping[str, Bool[Tensor, "batch layer pos"]], n_layers: int) -> list[Hook]:
    """Hooks that copy clean states back: row ``r`` restores ``(l, p)`` where ``masks[kind][r, l, p]``.

    ``clean[kind]`` holds the clean run's activations stacked as ``[layer, pos, d]``.
    """
    hooks: list[Hook] = []
    for kind, mask in masks.items():
        for layer in range(n_layers):
            m = mask[:, layer]  # [batch, pos]
            if not bool(m.any()):
                continue
            src = clean[kind][layer]

            def hook(act: Tensor, hook: Any = None, m: Tensor = m, src: Tensor = src) -> Tensor:
                sel = m.to(act.device)[:, :, None]
                return torch.where(sel, src.to(act.device, act.dtype)[None], act)
            hooks.append((hook_name(layer, KIND_POINTS[kind]), hook))
    return hooks


@dataclass(frozen=True)
class _Setup:
    tokens: Int[Tensor, "1 pos"]
    position: int
    target: int
    positions: tuple[int, ...]  # corrupted positions
    subject_span: tuple[int, int] | None
    values: Tensor  # [sample, n, d]
    corruption: Corruption
    n_prefix: int


def _read(model: Any, tokens: Tensor, position: int, target: int, hooks: list[Hook],
          quantity: Quantity) -> Float[Tensor, "batch"]:
    with hooked(model, hooks):
        logits = model(tokens)
    return read_quantity(logits[:, position], torch.full((logits.shape[0],), target, device=logits.device),
                         quantity).cpu()


def _run_rows(model: Any, setup: _Setup, masks: Mapping[str, Tensor], clean: Mapping[str, Tensor],
              quantity: Quantity) -> Float[Tensor, "rows"]:
    """P of each row of ``masks`` (``[rows, layer, pos]`` per kind) averaged over the noise samples."""
    rows = next(iter(masks.values())).shape[0] if masks else 1
    k = setup.corruption.samples
    rep = {kind: m.repeat_interleave(k, 0) for kind, m in masks.items()}
    sample = torch.arange(k).repeat(rows)
    hooks = [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values, setup.positions, sample)),
             *restore_hooks(clean, rep, model.cfg.n_layers)]
    p = _read(model, setup.tokens.expand(rows * k, -1), setup.position, setup.target, hooks, quantity)
    return p.view(rows, k).mean(1)


def _prepare(model: Any, prompt: str, target: str, corruption: Corruption, corrupt: str | Sequence[int],
             subject: str | None, subject_span: tuple[int, int] | None) -> _Setup:
    q = encode(model, [prompt], target)
    row = q.row(0)  # first target token (a multi-token target is traced on its first token)
    tokens, position, tgt = row.tokens, int(row.position[0]), int(row.target[0])
    _, n_prefix = _n_prefix(model, prompt)
    span = subject_span
    if span is None and subject is not None:
        span = subject_token_span(model, prompt, subject)
    if isinstance(corrupt, str):
        if span is None:
            raise PromptError("tracing needs the subject: pass subject=..., subject_span=(start, end), a Fact "
                              "with a subject, or explicit corrupt=[positions]")
        if corrupt == "subject":
            positions = list(range(*span))
        elif corrupt == "relation":
            positions = relation_positions(model, prompt, span)
        else:
            raise TracingSettingError(f"corrupt must be 'subject', 'relation' or a list of positions, "
                                      f"got {corrupt!r}")
    else:
        positions = sorted(int(p) for p in corrupt)
    if not positions or min(positions) < 0 or max(positions) >= tokens.shape[1]:
        raise PromptError(f"corrupted positions {positions} do not fit the {tokens.shape[1]} tokens of {prompt!r}")
    if span is not None and not (0 <= span[0] < span[1] <= tokens.shape[1]):
        raise PromptError(f"subject span {span} does not fit the {tokens.shape[1]} tokens of {prompt!r}")
    values = corruption.values(model, positions, tokens)
    return _Setup(tokens, position, tgt, tuple(positions), span, values, corruption, n_prefix)


@torch.no_grad()
def _clean_cache(model: Any, setup: _Setup, kinds: Sequence[str]
                 ) -> tuple[Float[Tensor, "vocab"], dict[str, Tensor]]:
    """The clean run (a plain forward): its logits at the read-out position and its states per kind."""
    store: dict[str, list[Tensor]] = {k: [] for k in kinds}
    hooks = [(hook_name(layer, KIND_POINTS[kind]), capture(store[kind]))
             for kind in kinds for layer in range(model.cfg.n_layers)]
    with hooked(model, hooks):
        logits = model(setup.tokens)[0, setup.position].float().cpu()
    return logits, {k: torch.cat(v) for k, v in store.items()}  # hooks run in layer order: [layer, pos, d]


def _require_known(model: Any, setup: _Setup, prompt: str, logits: Float[Tensor, "vocab"]) -> None:
    """Raise :class:`NotKnownError` unless the clean run's top token is the target (Meng et al.)."""
    top = int(logits.argmax())
    if top != setup.target:
        probs = logits.softmax(-1)
        top_tok, tgt_tok = model.tokenizer.decode([top]), model.tokenizer.decode([setup.target])
        raise NotKnownError(f"the model does not know this fact: after {prompt!r} its top token is {top_tok!r} "
                            f"(P = {float(probs[top]):.3g}), not the target {tgt_tok!r} "
                            f"(P = {float(probs[setup.target]):.3g}); causal tracing, as Meng et al., traces only "
                            f"facts whose clean top token is the target: pass known_only=False to trace it anyway")


def _resolve(fact_or_prompt: Any, target: str | None, subject: str | None, prompt_index: int
             ) -> tuple[str, str, str | None]:
    if isinstance(fact_or_prompt, str):
        if target is None:
            raise TargetError("pass a target with a prompt, or a Fact")
        return fact_or_prompt, target, subject
    prompts = getattr(fact_or_prompt, "prompts", None)
    if prompts is None:
        raise PromptError(f"expected a prompt string or a Fact, got {type(fact_or_prompt).__name__}")
    if not 0 <= prompt_index < len(prompts):
        raise PromptError(f"prompt_index {prompt_index} is outside the fact's {len(prompts)} prompts")
    return prompts[prompt_index], target or fact_or_prompt.target, subject or getattr(fact_or_prompt, "subject", None)


def _as_corruption(c: str | Corruption, **kw: Any) -> Corruption:
    if isinstance(c, Corruption):
        return c
    return Corruption(c, **{k: v for k, v in kw.items() if v is not None})


# ------------------------------------------------------------------------------------- fast engine

def _corrupted_prefix(model: Any, tokens: Int[Tensor, "sample t"], hooks: list[Hook]) -> Any:
    """The key/value cache of the corrupted run over the first ``t`` positions."""
    with hooked(model, hooks):
        _, cache = model(tokens, return_type="logits_and_cache")
    return cache


@dataclass(frozen=True)
class _TokenRun:
    """The corrupted run of positions ``t..position`` on the cached corrupted prefix of positions ``< t``:
    its staircase (which reproduces it, checked by :func:`~knlens.staircase.build_stairs`) and the
    quantity it gave at the read-out position, averaged over the noise samples."""

    stairs: Stairs
    p_cached: float


def _stairs_from(model: Any, setup: _Setup, t: int, quantity: Quantity) -> _TokenRun | None:
    """The :class:`_TokenRun` from token ``t`` (all noise samples as rows), or None when no staircase
    reproduces it. Call it within :func:`~knlens.compat.cache_keyword_fix`."""
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
    cache = _corrupted_prefix(model, tokens[:, :t], corrupt(before, 0)) if t > 0 else None
    with recording(model) as calls, hooked(model, corrupt(after, t)):
        logits = model(tokens[:, t:], past_key_values=cache)[:, -1]
    prefix = cache_layers(cache, t) if cache is not None else None
    stairs = build_stairs(model, calls, cache=cache, prefix=prefix, read_at=-1, reference=logits)
    if stairs is None:
        return None
    target = torch.full((logits.shape[0],), setup.target, device=logits.device)
    return _TokenRun(stairs, float(read_quantity(logits, target, quantity).mean()))


def _token_stairs(model: Any, setup: _Setup, tokens: Sequence[int], quantity: Quantity
                  ) -> dict[int, _TokenRun] | None:
    """One staircase per restored token (shared by every kind), or None when the model's blocks cannot be
    driven directly or a token lies after the read-out position (only with padding; rare)."""
    if max(tokens) > setup.position:
        return None
    out = {}
    for t in sorted(set(tokens)):
        run = _stairs_from(model, setup, t, quantity)
        if run is None:
            return None
        out[t] = run
    return out


def _fast_cells(model: Any, setup: _Setup, kind: str, cells: Sequence[tuple[int, int]], window: int,
                clean: Mapping[str, Tensor], quantity: Quantity, batch_size: int,
                runs: Mapping[int, _TokenRun]) -> Tensor:
    """P of each cell (averaged over the noise samples) by the staircases of :func:`_token_stairs`.

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
            out[torch.tensor(part)] = _stairs_read(model, setup, stairs, entry, hooks, quantity)
    return out


def _stairs_read(model: Any, setup: _Setup, stairs: Stairs, entry: Int[Tensor, "units"], hooks: list[Hook],
                 quantity: Quantity) -> Float[Tensor, "units"]:
    """The quantity of each unit of ``stairs`` entering at ``entry``, averaged over the noise samples."""
    with hooked(model, hooks):
        logits = stairs.logits(model, entry)
    target = torch.full((logits.shape[0],), setup.target, device=logits.device)
    return read_quantity(logits, target, quantity).cpu().view(len(entry), -1).mean(1)


def _check_fast(model: Any, setup: _Setup, runs: Mapping[int, _TokenRun] | None, clean: Mapping[str, Tensor],
                p_clean: float, p_corr: float, quantity: Quantity) -> str | None:
    """Why the fast engine cannot be trusted, or None. Every token's cached corrupted run (which its
    staircase reproduces) must give P_corrupted; the staircase of the first corrupted token with block 0's
    clean output restored at all its positions must give P_clean."""
    if runs is None:
        return ("its staircase cannot be built or does not reproduce the model's own forward on this model "
                "(or a traced token lies after the read-out position)")
    nothing = torch.tensor([r.p_cached for r in runs.values()])
    why = disagreement(nothing, torch.full_like(nothing, p_corr), "P_corrupted through the cached prefix")
    if why is not None:
        return why
    first = min(setup.positions)
    run = runs.get(first) or _stairs_from(model, setup, first, quantity)
    if run is None:
        return f"no staircase can be built at the first corrupted token {first}"
    state = clean["resid"][0, first:setup.position + 1]  # block 0's clean output at the staircase's positions
    hooks = [(hook_name(0, KIND_POINTS["resid"]), lambda act, hook: state.to(act.device, act.dtype).expand_as(act))]
    everything = _stairs_read(model, setup, run.stairs, torch.zeros(1, dtype=torch.long), hooks, quantity)
    return disagreement(everything, torch.tensor([p_clean]), "P_clean through the cached prefix")


def _check_batched(model: Any, setup: _Setup, clean: Mapping[str, Tensor], p_clean: float, p_corr: float,
                   quantity: Quantity) -> str | None:
    """Why the batched engine cannot be trusted, or None: as rows of one batch, restoring nothing must give
    P_corrupted and restoring block 0's clean output at every position P_clean."""
    masks = torch.zeros(2, model.cfg.n_layers, setup.tokens.shape[1], dtype=torch.bool)
    masks[1, 0] = True
    got = _run_rows(model, setup, {"resid": masks}, clean, quantity)
    return disagreement(got, torch.tensor([p_corr, p_clean]), "P_corrupted and P_clean as rows of one batch")


# ------------------------------------------------------------------------------------------ tracing

def _cell_masks(kind: str, cells: Sequence[tuple[int, int]], window: int, n_layers: int, n_pos: int
                ) -> Bool[Tensor, "cells layer pos"]:
    m = torch.zeros(len(cells), n_layers, n_pos, dtype=torch.bool)
    for r, (layer, pos) in enumerate(cells):
        m[r, window_layers(layer, window, n_layers), pos] = True
    return m


@torch.no_grad()
def restore(model: Any, fact_or_prompt: Any, target: str | None = None, *,
            restored: Mapping[str, Bool[Tensor, "layer pos"]] | None = None,
            corruption: str | Corruption = "noise", corrupt: str | Sequence[int] = "subject",
            subject: str | None = None, subject_span: tuple[int, int] | None = None, prompt_index: int = 0,
            quantity: Quantity = "prob") -> float:
    """P(target) of the corrupted run with an arbitrary set of clean states restored.

    ``restored[kind]`` is a boolean ``[layer, pos]`` mask of the states copied back (all at once, in one
    run). No mask gives P_corrupted; every layer of ``"resid"`` at every token gives P_clean.

    >>> from knlens import load_model
    >>> model = load_model("tiny-gpt2")
    >>> import torch
    >>> p = restore(model, "the capital of france is", " paris", subject="france",
    ...             restored={"resid": torch.ones(2, 6, dtype=torch.bool)})
    """
    prompt, target, subject = _resolve(fact_or_prompt, target, subject, prompt_index)
    corruption = _as_corruption(corruption)
    setup = _prepare(model, prompt, target, corruption, corrupt, subject, subject_span)
    restored = dict(restored or {})
    for kind, m in restored.items():
        if kind not in KIND_POINTS:
            raise TracingSettingError(f"unknown kind {kind!r}; use one of {KINDS}")
        if tuple(m.shape) != (model.cfg.n_layers, setup.tokens.shape[1]):
            raise TracingSettingError(f"restored[{kind!r}] has shape {tuple(m.shape)}, expected "
                             f"[{model.cfg.n_layers}, {setup.tokens.shape[1]}]")
    clean = _clean_cache(model, setup, list(restored))[1] if restored else {}
    masks = {k: m.bool()[None] for k, m in restored.items()}
    return float(_run_rows(model, setup, masks, clean, quantity)[0])


@torch.no_grad()
def trace(model: Any, fact_or_prompt: Any, target: str | None = None, *,
          kinds: Sequence[str] = KINDS, corruption: str | Corruption = "noise",
          corrupt: str | Sequence[int] = "subject", subject: str | None = None,
          subject_span: tuple[int, int] | None = None, window: int | Mapping[str, int] | None = None,
          samples: int | None = None, seed: int | None = None, noise_scale: float | None = None,
          other: str | None = None, positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
          prompt_index: int = 0, quantity: Quantity = "prob", engine: Engine = "fast",
          batch_size: int = 64, skip_prefix: bool = True, known_only: bool = True) -> Trace:
    """Causal trace of one prompt: the indirect effect of restoring every (layer, token) cell per kind.

    Arguments:
        fact_or_prompt: a prompt (with ``target``) or a Fact (its ``prompts[prompt_index]`` and subject).
        kinds: among ``"resid"``, ``"mlp"``, ``"attn"``.
        corruption: ``"noise"`` (default), ``"replace"``, ``"substitute"`` (with ``other=``) or a
            :class:`Corruption`; ``samples``, ``seed``, ``noise_scale`` override its fields.
        samples: noise samples averaged, default 10 as Meng et al. (every cell runs once per sample; on
            SmolLM2-135M the fast engine traces all three kinds of a 6-token prompt in about 10 s on a
            quiet 2-core CPU, 2.4× the time of 3 samples; benchmarks/RESULTS.md).
        corrupt: ``"subject"`` (default), ``"relation"`` or explicit positions.
        subject / subject_span: the subject as text in the prompt, or its ``[start, end)`` token span.
        window: layers restored around each cell (default 1 for resid, 10 for mlp/attn), int or per kind.
        positions / layers: restrict the traced cells (default all tokens and layers); others stay 0.
        engine: ``"fast"`` (default: cells as batch rows of a staircase that starts each cell at its first
            restored layer and runs only the tokens from the restored one on), ``"batched"`` (cells as rows
            of whole-model forwards) or ``"loop"`` (one forward per cell). An engine whose check against
            plain forwards fails is replaced by the next one down, with a warning (see the module).
            ``batch_size`` bounds the rows (cells × noise samples) of one forward, and so the memory.
        skip_prefix: do not run cells before the first corrupted token of a left-to-right model: their
            states are the same in the clean and the corrupted run, so their effect is 0 by causality.
        known_only: raise :class:`~knlens.errors.NotKnownError` when the clean run's top token is not the
            (first) target token, as Meng et al. trace only known facts; False traces any fact.

    Returns a :class:`Trace`.
    """
    prompt, target, subject = _resolve(fact_or_prompt, target, subject, prompt_index)
    if isinstance(corruption, str) and corruption == "substitute" and other is None:
        raise TracingSettingError("corruption='substitute' needs other=<another subject>")
    corruption = _as_corruption(corruption, other=other)
    overrides = {k: v for k, v in {"samples": samples, "seed": seed, "scale": noise_scale, "other": other}.items()
                 if v is not None}
    if overrides:
        corruption = replace(corruption, **overrides)
    for kind in kinds:
        if kind not in KIND_POINTS:
            raise TracingSettingError(f"unknown kind {kind!r}; use one of {KINDS}")
    if engine not in ENGINES:
        raise TracingSettingError(f"unknown engine {engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    if batch_size < 1:
        raise TracingSettingError(f"batch_size must be at least 1, got {batch_size}")
    windows = {k: (window.get(k, DEFAULT_WINDOWS[k]) if isinstance(window, Mapping)
                   else DEFAULT_WINDOWS[k] if window is None else int(window)) for k in kinds}
    if any(w < 1 for w in windows.values()):
        raise TracingSettingError(f"windows must be at least 1 layer, got {windows}")
    setup = _prepare(model, prompt, target, corruption, corrupt, subject, subject_span)
    n_layers, n_pos = model.cfg.n_layers, setup.tokens.shape[1]
    clean_logits, clean = _clean_cache(model, setup, sorted({*kinds, "resid"}))  # resid: the engine checks
    if known_only:
        _require_known(model, setup, prompt, clean_logits)
    p_clean = float(read_quantity(clean_logits[None], torch.tensor([setup.target]), quantity)[0])
    p_corr = float(_run_rows(model, setup, {}, clean, quantity)[0])
    pos_list = list(range(n_pos)) if positions is None else [int(p) % n_pos for p in positions]
    skip = skip_prefix and not is_masked_lm(model)
    if skip:
        pos_list = [p for p in pos_list if p >= min(setup.positions)]
    layer_list = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    cells = [(l, t) for l in layer_list for t in pos_list]
    asked, note = engine, ""
    if engine == "fast" and is_masked_lm(model):
        asked, note = "batched", "fast -> batched: a masked LM (the staircase needs causal attention)"
    effects = {}
    with cache_keyword_fix(model):
        runs = _token_stairs(model, setup, [t for _, t in cells], quantity) if asked == "fast" and cells else None
        checks = {"fast": lambda: _check_fast(model, setup, runs, clean, p_clean, p_corr, quantity),
                  "batched": lambda: _check_batched(model, setup, clean, p_clean, p_corr, quantity)}
        used, why = choose_engine(asked, checks) if cells else (asked, "")
        for kind in kinds:
            if used == "fast":
                assert runs is not None
                p = _fast_cells(model, setup, kind, cells, windows[kind], clean, quantity, batch_size, runs)
            else:
                p = torch.empty(len(cells))
                size = 1 if used == "loop" else max(1, batch_size // corruption.samples)
                for s in chunks(len(cells), size):
                    m = _cell_masks(kind, cells[s], windows[kind], n_layers, n_pos)
                    p[s] = _run_rows(model, setup, {kind: m}, clean, quantity)
            eff = torch.zeros(n_layers, n_pos)
            for (l, t), v in zip(cells, p.tolist()):
                eff[l, t] = v - p_corr
            effects[kind] = eff
    from . import __version__
    tok_strs = tuple(model.tokenizer.convert_ids_to_tokens(setup.tokens[0].tolist()))
    top = int(clean_logits.argmax())
    settings = {"model": getattr(model.cfg, "model_name", "?"), "kinds": list(kinds), "windows": windows,
                "corrupt": corrupt if isinstance(corrupt, str) else "positions",
                "corruption": corruption.describe(model), "embed_hook": EMBED_HOOK,
                "hook_points": {k: KIND_POINTS[k] for k in kinds}, "quantity": quantity,
                "engine": used, "engine_requested": engine, "engine_note": "; ".join(n for n in (note, why) if n),
                "target_token": model.tokenizer.convert_ids_to_tokens([setup.target])[0],
                "clean_top_token": model.tokenizer.convert_ids_to_tokens([top])[0], "known": top == setup.target,
                "known_only": known_only, "position": setup.position, "n_prefix": setup.n_prefix,
                "skip_prefix": skip, "samples": corruption.samples, "knlens_version": __version__,
                "versions": environment()}
    return Trace(prompt, target, tok_strs, setup.subject_span, setup.positions, effects, p_clean, p_corr,
                 settings)


def trace_facts(model: Any, facts: Sequence[Any], *, known_only: bool = True, **trace_kw: Any) -> list[Trace]:
    """:func:`trace` of each fact (its ``prompts[prompt_index]``), skipping the facts the model does not know
    (clean top token not the target) with one warning that names them, as Meng et al. trace known facts
    only; ``known_only=False`` traces them all. Feed the result to :func:`group_effects`.

    >>> from knlens import Fact, load_model
    >>> model = load_model("tiny-llama")
    >>> facts = [Fact(["the capital of france is"], " paris", subject="france", name="capital-france")]
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     traces = trace_facts(model, facts, samples=1)
    >>> len(traces), "skipped 1 of 1 facts the model does not know" in str(caught[0].message)
    (0, True)
    """
    traces, skipped = [], []
    for i, fact in enumerate(facts):
        try:
            traces.append(trace(model, fact, known_only=known_only, **trace_kw))
        except NotKnownError:
            skipped.append(getattr(fact, "name", None) or f"#{i} {fact.prompts[trace_kw.get('prompt_index', 0)]!r}")
    if skipped:
        msg = (f"causal tracing skipped {len(skipped)} of {len(facts)} facts the model does not know (its clean top "
               f"token is not the target; Meng et al. trace known facts only): {', '.join(skipped)}; pass "
               f"known_only=False to trace them too")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return traces
