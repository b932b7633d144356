"""Causal tracing (Meng et al., 2022; docs/methods.md, causal tracing) as compositions of hooks, batched over cells.

Three runs of one prompt:

* **clean** — the prompt as is; its residual stream, MLP outputs and attention outputs are cached;
* **corrupted** — the subject tokens' embeddings (at ``hook_embed``, the token embeddings as the model adds
  them; GPT-2's positional embeddings are separate and untouched) get Gaussian noise ν·N(0, I) with ν = 3 ×
  the std of the ``hook_embed`` outputs over the vocabulary (10 seeded samples as Meng et al., the same
  noise for every restoration), or are replaced by a fixed vector, or by another subject's embeddings
  (:mod:`knlens.methods.tracing.corruption`);
* **restored** — the corrupted run with one (token, layer) state copied back from the clean cache: the
  residual stream (``blocks.{l}.hook_resid_post``), the MLP output (``hook_mlp_out``) or the attention
  output (``hook_attn_out``); for MLP and attention a window of layers around ``l`` (10, as Meng et al.).

Indirect effect of a cell = P_restored − P_corrupted; total effect = P_clean − P_corrupted. As Meng et al.,
only facts the model knows are traced: the clean run's top token must be the target (``known_only=False``
traces any fact; :func:`trace_facts` skips unknown facts with a warning). Engines (same numbers up to float
rounding):

* ``"fast"`` (default) — cells are rows of a :mod:`~knlens.run.staircase`: a cell restoring layers ``[a, b)`` at
  token ``t`` equals the corrupted run below block ``a`` and, by causal attention, at every token before
  ``t``; so it starts at block ``a`` with the corrupted run's input there and runs tokens ``t..`` only,
  reading the corrupted keys/values of earlier tokens. The cells of every kind at a token and all noise
  samples share one staircase run, cells restoring the same states run once, and only the read-out position
  is unembedded (:mod:`~knlens.methods.tracing.fast`; a masked LM runs ``"batched"``);
* ``"batched"`` — every cell is one batch row of whole-model forwards carrying its own restoration;
* ``"reference"`` — one plain forward per cell (Meng et al.'s schedule), the reference the others are
  checked against.

An engine's cells that restore nothing and everything are checked against plain forwards of the model
(P_corrupted, P_clean) before its numbers are used (``"fast"`` runs them as rows of the same staircase runs
as its cells); an engine that disagrees is replaced by the
next one down with a warning (:mod:`knlens.methods.tracing.check`). ``Trace.settings.engine`` is the engine
that ran and ``settings.engine_note`` why another was replaced ("" when none was).

The corruption can target the subject (default), the relation tokens (``corrupt="relation"``: the prompt
tokens that are neither the subject, BOS nor the final token) or explicit positions.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> t = trace(model, "the capital of france is", " paris", subject="france", samples=2,
...           known_only=False)                      # a random model does not know the fact
>>> t.effects["mlp"].shape, t.subject_span, t.settings.engine   # [layer, token]; token 4 is "france"
(torch.Size([2, 6]), (4, 5), 'fast')
>>> list(t.to_frame().columns)[:4]
['kind', 'layer', 'position', 'token']
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from knlens.core.errors import NotKnownError, TracingSettingError
from knlens.core.models import is_masked_lm
from knlens.core.versions import __version__, environment
from knlens.methods.tracing.check import choose_engine
from knlens.methods.tracing.corruption import EMBED_HOOK, Corruption
from knlens.methods.tracing.fast import check_batched, fast_trace
from knlens.methods.tracing.result import Trace, TraceSettings
from knlens.methods.tracing.setup import (DEFAULT_WINDOWS, KIND_POINTS, KINDS, as_corruption, cell_masks,
                                          clean_cache, prepare, require_known, resolve_prompt, run_rows)
from knlens.run.compat import cache_keyword_fix
from knlens.run.engine import ENGINES, Engine, Quantity, chunks, read_quantity
from knlens.run.precision import log_tolerance

__all__ = ["trace", "trace_facts", "restore"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ tracing

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
    prompt, target, subject = resolve_prompt(fact_or_prompt, target, subject, prompt_index)
    corruption = as_corruption(corruption)
    setup = prepare(model, prompt, target, corruption, corrupt, subject, subject_span)
    restored = dict(restored or {})
    for kind, m in restored.items():
        if kind not in KIND_POINTS:
            raise TracingSettingError(f"unknown kind {kind!r}; use one of {KINDS}")
        if tuple(m.shape) != (model.cfg.n_layers, setup.tokens.shape[1]):
            raise TracingSettingError(f"restored[{kind!r}] has shape {tuple(m.shape)}, expected "
                             f"[{model.cfg.n_layers}, {setup.tokens.shape[1]}]")
    clean = clean_cache(model, setup, list(restored))[1] if restored else {}
    masks = {k: m.bool()[None] for k, m in restored.items()}
    return float(run_rows(model, setup, masks, clean, quantity)[0])


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
            of whole-model forwards) or ``"reference"`` (one plain forward per cell). An engine whose check against
            plain forwards fails is replaced by the next one down, with a warning (see the module).
            ``batch_size`` bounds the rows (cells × noise samples) of one forward, and so the memory (a
            staircase run of ``fast`` holds as much as the logits of ``batch_size`` whole-prompt rows).
        skip_prefix: do not run cells before the first corrupted token of a left-to-right model: their
            states are the same in the clean and the corrupted run, so their effect is 0 by causality.
        known_only: raise :class:`~knlens.core.errors.NotKnownError` when the clean run's top token is not the
            (first) target token, as Meng et al. trace only known facts; False traces any fact.

    Returns a :class:`Trace`.
    """
    prompt, target, subject = resolve_prompt(fact_or_prompt, target, subject, prompt_index)
    if isinstance(corruption, str) and corruption == "substitute" and other is None:
        raise TracingSettingError("corruption='substitute' needs other=<another subject>")
    corruption = as_corruption(corruption, other=other)
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
    setup = prepare(model, prompt, target, corruption, corrupt, subject, subject_span)
    n_layers, n_pos = model.cfg.n_layers, setup.tokens.shape[1]
    clean_logits, clean = clean_cache(model, setup, sorted({*kinds, "resid"}))  # resid: the engine checks
    if known_only:
        require_known(model, setup, prompt, clean_logits)
    p_clean = float(read_quantity(clean_logits[None], torch.tensor([setup.target]), quantity)[0])
    p_corr = float(run_rows(model, setup, {}, clean, quantity)[0])
    pos_list = list(range(n_pos)) if positions is None else [int(p) % n_pos for p in positions]
    skip = skip_prefix and not is_masked_lm(model)
    if skip:
        pos_list = [p for p in pos_list if p >= min(setup.positions)]
    layer_list = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    cells = [(l, t) for l in layer_list for t in pos_list]
    asked, note = engine, ""
    if engine == "fast" and is_masked_lm(model):
        asked, note = "batched", "fast -> batched: a masked LM (the staircase needs causal attention)"
    effects, fast = {}, {}

    tolerance = log_tolerance(model, setup.tokens, setup.position, setup.target, batch_size, quantity)
    tol = None if tolerance is None else tolerance.quantity

    def check_fast() -> str | None:  # the fast engine's check rows run with its cells
        got, why = fast_trace(model, setup, kinds, cells, windows, clean, p_clean, p_corr, quantity, batch_size, tol)
        fast.update(got)
        return why
    with cache_keyword_fix(model):
        checks = {"fast": check_fast,
                  "batched": lambda: check_batched(model, setup, clean, p_clean, p_corr, quantity, tol)}
        used, why = choose_engine(asked, checks) if cells else (asked, "")
        for kind in kinds:
            if used == "fast":
                p = fast[kind]
            else:
                p = torch.empty(len(cells))
                size = 1 if used == "reference" else max(1, batch_size // corruption.samples)
                for s in chunks(len(cells), size):
                    m = cell_masks(kind, cells[s], windows[kind], n_layers, n_pos)
                    p[s] = run_rows(model, setup, {kind: m}, clean, quantity)
            eff = torch.zeros(n_layers, n_pos)
            for (l, t), v in zip(cells, p.tolist()):
                eff[l, t] = v - p_corr
            effects[kind] = eff
    tok_strs = tuple(model.tokenizer.convert_ids_to_tokens(setup.tokens[0].tolist()))
    top = int(clean_logits.argmax())
    settings = TraceSettings(
        model=getattr(model.cfg, "model_name", "?"), kinds=tuple(kinds), windows=windows,
        corrupt=corrupt if isinstance(corrupt, str) else "positions", corruption=corruption.describe(model),
        embed_hook=EMBED_HOOK, hook_points={k: KIND_POINTS[k] for k in kinds}, quantity=quantity, engine=used,
        engine_requested=engine, engine_note="; ".join(n for n in (note, why) if n),
        target_token=model.tokenizer.convert_ids_to_tokens([setup.target])[0],
        clean_top_token=model.tokenizer.convert_ids_to_tokens([top])[0], known=top == setup.target,
        known_only=known_only, position=int(setup.position), n_prefix=int(setup.n_prefix), skip_prefix=skip,
        samples=int(corruption.samples), knlens_version=__version__, versions=environment())
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
