"""The pieces every causal-tracing engine shares: the prompt's setup (tokens, corrupted positions, noise
values), the clean run, hooks that restore clean states, and rows of corrupted runs read as one batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from knlens.core.errors import NotKnownError, PromptError, TargetError, TracingSettingError
from knlens.core.tokens import encode
from knlens.methods.tracing.corruption import EMBED_HOOK, Corruption, corruption_hook
from knlens.methods.tracing.spans import prefix_tokens, relation_positions, subject_token_span, window_layers
from knlens.run.engine import Quantity, forward, read_quantity
from knlens.run.hooks import Hook, capture, hook_name

__all__ = ["Kind", "KINDS", "KIND_POINTS", "DEFAULT_WINDOWS", "TraceSetup", "restore_hooks", "run_rows", "prepare",
           "clean_cache", "require_known", "resolve_prompt", "as_corruption", "cell_masks"]

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
KIND_POINTS: dict[str, str] = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
DEFAULT_WINDOWS: dict[str, int] = {"resid": 1, "mlp": 10, "attn": 10}


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
class TraceSetup:
    tokens: Int[Tensor, "1 pos"]
    position: int
    target: int
    positions: tuple[int, ...]  # corrupted positions
    subject_span: tuple[int, int] | None
    values: Tensor  # [sample, n, d]
    corruption: Corruption
    n_prefix: int


def read_rows(model: Any, tokens: Tensor, position: int, target: int, hooks: list[Hook],
          quantity: Quantity) -> Float[Tensor, "batch"]:
    logits = forward(model, tokens, hooks)
    return read_quantity(logits[:, position], torch.full((logits.shape[0],), target, device=logits.device),
                         quantity).cpu()


def run_rows(model: Any, setup: TraceSetup, masks: Mapping[str, Tensor], clean: Mapping[str, Tensor],
              quantity: Quantity) -> Float[Tensor, "rows"]:
    """P of each row of ``masks`` (``[rows, layer, pos]`` per kind) averaged over the noise samples."""
    rows = next(iter(masks.values())).shape[0] if masks else 1
    k = setup.corruption.samples
    rep = {kind: m.repeat_interleave(k, 0) for kind, m in masks.items()}
    sample = torch.arange(k).repeat(rows)
    hooks = [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values, setup.positions, sample)),
             *restore_hooks(clean, rep, model.cfg.n_layers)]
    p = read_rows(model, setup.tokens.expand(rows * k, -1), setup.position, setup.target, hooks, quantity)
    return p.view(rows, k).mean(1)


def prepare(model: Any, prompt: str, target: str, corruption: Corruption, corrupt: str | Sequence[int],
             subject: str | None, subject_span: tuple[int, int] | None) -> TraceSetup:
    q = encode(model, [prompt], target)
    row = q.row(0)  # first target token (a multi-token target is traced on its first token)
    tokens, position, tgt = row.tokens, int(row.position[0]), int(row.target[0])
    _, n_prefix = prefix_tokens(model, prompt)
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
    return TraceSetup(tokens, position, tgt, tuple(positions), span, values, corruption, n_prefix)


@torch.no_grad()
def clean_cache(model: Any, setup: TraceSetup, kinds: Sequence[str]
                 ) -> tuple[Float[Tensor, "vocab"], dict[str, Tensor]]:
    """The clean run (a plain forward): its logits at the read-out position and its states per kind."""
    store: dict[str, list[Tensor]] = {k: [] for k in kinds}
    hooks = [(hook_name(layer, KIND_POINTS[kind]), capture(store[kind]))
             for kind in kinds for layer in range(model.cfg.n_layers)]
    logits = forward(model, setup.tokens, hooks)[0, setup.position].float().cpu()
    return logits, {k: torch.cat(v) for k, v in store.items()}  # hooks run in layer order: [layer, pos, d]


def require_known(model: Any, setup: TraceSetup, prompt: str, logits: Float[Tensor, "vocab"]) -> None:
    """Raise :class:`NotKnownError` unless the clean run's top token is the target (Meng et al.)."""
    top = int(logits.argmax())
    if top != setup.target:
        probs = logits.softmax(-1)
        top_tok, tgt_tok = model.tokenizer.decode([top]), model.tokenizer.decode([setup.target])
        raise NotKnownError(f"the model does not know this fact: after {prompt!r} its top token is {top_tok!r} "
                            f"(P = {float(probs[top]):.3g}), not the target {tgt_tok!r} "
                            f"(P = {float(probs[setup.target]):.3g}); causal tracing, as Meng et al., traces only "
                            f"facts whose clean top token is the target: pass known_only=False to trace it anyway")


def resolve_prompt(fact_or_prompt: Any, target: str | None, subject: str | None, prompt_index: int
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


def as_corruption(c: str | Corruption, **kw: Any) -> Corruption:
    if isinstance(c, Corruption):
        return c
    return Corruption(c, **{k: v for k, v in kw.items() if v is not None})


def cell_masks(kind: str, cells: Sequence[tuple[int, int]], window: int, n_layers: int, n_pos: int
                ) -> Bool[Tensor, "cells layer pos"]:
    m = torch.zeros(len(cells), n_layers, n_pos, dtype=torch.bool)
    for r, (layer, pos) in enumerate(cells):
        m[r, window_layers(layer, window, n_layers), pos] = True
    return m
