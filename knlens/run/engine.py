"""Whole-model forwards: batched, chunked, with hooks attached.

Every method builds hooks and calls these functions (or, for the fast IG and tracing engines, the
block-by-block re-runs of :mod:`knlens.run.staircase`, with the same hooks); no method calls the model
itself. The vocabulary shared by every method is here too: the :data:`Quantity` read at the target and the
:data:`Engine` names (``"fast"``, ``"batched"``, ``"reference"``: the plain forwards every fast path is
checked against).
Hooks are given either as a list or as a function of the chunk of :class:`~knlens.core.tokens.Queries`
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
from jaxtyping import Float, Int
from torch import Tensor

from knlens.core.errors import NonFiniteError, SettingsError
from knlens.core.tokens import Queries
from knlens.run.hooks import Hook, capture, hooked

__all__ = ["Quantity", "QUANTITIES", "Engine", "ENGINES", "HookSpec", "forward", "forward_with_cache",
           "forward_from_cache", "forward_until", "target_logits", "read_quantity", "target_probs", "activations_at",
           "chunks", "resolve_hooks"]

Quantity = Literal["prob", "logprob", "logit"]
QUANTITIES: tuple[str, ...] = ("prob", "logprob", "logit")
Engine = Literal["fast", "batched", "reference"]
ENGINES: tuple[str, ...] = ("fast", "batched", "reference")
HookSpec = Union[Sequence[Hook], Callable[[Queries], Sequence[Hook]]]


def resolve_hooks(hooks: HookSpec, q: Queries) -> list[Hook]:
    return list(hooks(q) if callable(hooks) else hooks)


def chunks(n: int, size: int | None) -> list[slice]:
    """Slices of ``range(n)`` of at most ``size`` (all at once for ``None``)."""
    size = n if not size else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def forward(model: Any, tokens: Int[Tensor, "batch pos"], hooks: Sequence[Hook] = (), *,
            attention_mask: Int[Tensor, "batch pos"] | None = None,
            stop_at_layer: int | None = None) -> Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch pos d_model"]:
    """Logits of one plain whole-prompt forward (no cache) with ``hooks`` attached; the reference every
    fast path is checked against. ``stop_at_layer=l`` runs blocks ``0..l-1`` only and returns the residual
    stream (for hooks that only read those blocks).

    >>> from knlens import load_model
    >>> model = load_model("tiny-llama")
    >>> forward(model, model.to_tokens("the capital of france is")).shape
    torch.Size([1, 6, 72])
    """
    kw: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    if stop_at_layer is not None:
        kw["stop_at_layer"] = stop_at_layer
    with hooked(model, list(hooks)):
        return model(tokens, **kw)


def forward_with_cache(model: Any, tokens: Int[Tensor, "batch pos"], hooks: Sequence[Hook] = ()
                       ) -> tuple[Float[Tensor, "batch pos vocab"], Any]:
    """Logits and the key/value cache of a forward over ``tokens`` (the shared prefix of the fast engines).
    Use it inside :func:`knlens.run.compat.cache_keyword_fix`."""
    with hooked(model, list(hooks)):
        return model(tokens, return_type="logits_and_cache")


def forward_from_cache(model: Any, tokens: Int[Tensor, "batch new"], cache: Any, hooks: Sequence[Hook] = ()
                       ) -> Float[Tensor, "batch new vocab"]:
    """Logits of ``tokens`` continuing the positions held in ``cache`` (from :func:`forward_with_cache`).
    Use it inside :func:`knlens.run.compat.cache_keyword_fix`."""
    with hooked(model, list(hooks)):
        return model(tokens, past_key_values=cache)


class _Reached(Exception):
    """Ends a forward at the hook point :func:`forward_until` stops at."""


def forward_until(model: Any, tokens: Int[Tensor, "batch pos"], point: str, hooks: Sequence[Hook] = (),
                  **call: Any) -> Tensor:
    """What hook point ``point`` sees in a forward over ``tokens`` with ``hooks`` attached; the forward stops
    there, so nothing after it is computed. ``call`` goes to the model's call (e.g. ``past_key_values``). The
    hooks are removed on every exit, errors included; a forward that ends without passing ``point`` raises
    :class:`~knlens.core.errors.SettingsError`.

    >>> from knlens import load_model
    >>> model = load_model("tiny-llama")
    >>> forward_until(model, model.to_tokens("the capital"), "ln_final.hook_in").shape   # the last block's output
    torch.Size([1, 3, 32])
    """
    seen: list[Tensor] = []

    def stop(act: Tensor, hook: Any = None) -> None:
        seen.append(act)
        raise _Reached

    try:
        with hooked(model, [*hooks, (point, stop)]):
            model(tokens, **call)
    except _Reached:
        return seen[0]
    raise SettingsError(f"the model's forward never reached the hook point {point!r}; it cannot stop there")


def target_logits(model: Any, q: Queries, hooks: HookSpec = ()) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's target position, with ``hooks`` attached (gradients flow if enabled)."""
    logits = forward(model, q.tokens, resolve_hooks(hooks, q), attention_mask=q.attention_mask)
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
    raise SettingsError(f"unknown target quantity {quantity!r}; use 'prob', 'logprob' or 'logit'")


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
        forward(model, sub.tokens, [*resolve_hooks(hooks, sub), *[(n, capture(store[n], sub.position)) for n in names]],
                attention_mask=sub.attention_mask)
    return {n: torch.cat(v) for n, v in store.items()}
