"""Whole-model forwards: batched, chunked, with hooks attached.

Every method builds hooks and calls these functions (or, for the fast IG and tracing engines, the
block-by-block re-runs of :mod:`knlens.staircase`, with the same hooks); none opens its own loop over
the model.
Hooks are given either as a list or as a function of the chunk of :class:`~knlens.prompts.Queries`
being run (for hooks that need each row's position), and are always removed afterwards.

>>> from knlens import load_model, encode
>>> model = load_model("tiny-llama")
>>> q = encode(model, ["the capital of france is"], " paris")
>>> target_probs(model, q).shape
torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import NonFiniteError
from .hooks import Hook, capture, hooked
from .prompts import Queries

__all__ = ["Quantity", "HookSpec", "target_logits", "read_quantity", "target_probs", "activations_at",
           "chunks", "resolve_hooks"]

Quantity = Literal["prob", "logprob", "logit"]
HookSpec = Union[Sequence[Hook], Callable[[Queries], Sequence[Hook]]]


def resolve_hooks(hooks: HookSpec, q: Queries) -> list[Hook]:
    return list(hooks(q) if callable(hooks) else hooks)


def chunks(n: int, size: int | None) -> list[slice]:
    """Slices of ``range(n)`` of at most ``size`` (all at once for ``None``)."""
    size = n if not size else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def target_logits(model: Any, q: Queries, hooks: HookSpec = ()) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's target position, with ``hooks`` attached (gradients flow if enabled)."""
    with hooked(model, resolve_hooks(hooks, q)):
        logits = model(q.tokens, attention_mask=q.attention_mask)
    return logits[torch.arange(len(q), device=logits.device), q.position]


def read_quantity(logits: Float[Tensor, "batch vocab"], target: Tensor,
                  quantity: Quantity = "prob") -> Float[Tensor, "batch"]:
    """The target's probability, log-probability or logit (computed in float32)."""
    logits = logits.float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    if quantity == "logit":
        return logits[rows, target]
    logp = logits.log_softmax(-1)[rows, target]
    if quantity == "logprob":
        return logp
    if quantity == "prob":
        return logp.exp()
    raise ValueError(f"unknown target quantity {quantity!r}; use 'prob', 'logprob' or 'logit'")


@torch.no_grad()
def target_probs(model: Any, q: Queries, hooks: HookSpec = (), *, quantity: Quantity = "prob",
                 batch_size: int | None = 64) -> Float[Tensor, "batch"]:
    """``P(target)`` (or another :data:`Quantity`) of every row, with ``hooks`` attached, in chunks."""
    out = []
    for s in chunks(len(q), batch_size):
        sub = q.select(torch.arange(len(q))[s])
        out.append(read_quantity(target_logits(model, sub, hooks), sub.target, quantity))
    result = torch.cat(out)
    if not torch.isfinite(result).all():
        raise NonFiniteError(f"the model produced non-finite target {quantity}s: {result.tolist()}")
    return result


@torch.no_grad()
def activations_at(model: Any, q: Queries, names: Sequence[str], hooks: HookSpec = (), *,
                   batch_size: int | None = 64) -> dict[str, Float[Tensor, "batch d"]]:
    """The activations of hook points ``names`` at each row's target position (hooks attached)."""
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in chunks(len(q), batch_size):
        sub = q.select(torch.arange(len(q))[s])
        with hooked(model, [*resolve_hooks(hooks, sub), *[(n, capture(store[n], sub.position)) for n in names]]):
            model(sub.tokens, attention_mask=sub.attention_mask)
    return {n: torch.cat(v) for n, v in store.items()}
