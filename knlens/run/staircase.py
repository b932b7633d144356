"""Re-running a model's blocks from any block on: the "staircase" shared by the fast engines.

Integrated gradients patches one layer per row; causal tracing restores a window of layers per row.
Below the first patched block such a row equals a run that has already been made (the clean run for IG,
the corrupted run for tracing), so its computation can start at that block with the input that run gave
it. :class:`Stairs` drives ``model.blocks[k]`` directly with the exact arguments the model's own forward
passed to each block (recorded by :func:`recording`), for a batch that grows block by block as rows
enter. Keys/values of earlier positions come from a :class:`SharedPrefix`, shared by all rows.

A recorded run has ``batch`` rows (1 for IG, the noise samples for tracing); a *unit* of the staircase
is one copy of those rows, so ``units`` rows-groups give ``units · batch`` rows. :func:`build_stairs`
checks that the block loop reproduces the recorded logits and returns ``None`` when it does not (an
architecture it does not know), so that callers fall back to whole-model forwards.

>>> import torch
>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> tokens = model.to_tokens("the capital of france is")
>>> with torch.no_grad(), recording(model) as calls:
...     logits = model(tokens)[:, -1]
>>> stairs = build_stairs(model, calls, cache=None, prefix=None, read_at=-1, reference=logits)
>>> with torch.no_grad():
...     out = stairs.logits(model, torch.tensor([0, 1]))   # one unit entering at block 0, one at block 1
>>> torch.allclose(out, logits.expand(2, -1), atol=1e-5)
True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.core.models import is_masked_lm
from knlens.run.engine import forward_until

__all__ = ["SharedPrefix", "Stairs", "recording", "record_blocks", "FINAL_NORM_IN", "model_tail", "cache_layers",
           "build_stairs", "reproduces", "disagreement"]

log = logging.getLogger(__name__)


def _tile(x: Tensor, n: int) -> Tensor:
    """``x`` (batch ``b`` first) made ``n`` rows: expanded when ``b == 1``, else repeated unit by unit."""
    b = x.shape[0]
    if b == n:
        return x
    if b == 1:
        return x.expand(n, *x.shape[1:])
    return x.repeat(n // b, *([1] * (x.ndim - 1)))


class SharedPrefix:
    """A duck-typed HF key/value cache holding the earlier positions of every layer once, for any batch.

    ``update`` (the only method attention layers call) returns the prefix made fit for the batch
    (broadcast for a one-row prefix, repeated per unit for a prefix of several rows) with the new
    positions' keys/values appended; nothing is stored, so one object serves any number of forwards.
    """

    def __init__(self, prefix: list[tuple[Tensor, Tensor]]):
        self.prefix = prefix

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        pk, pv = self.prefix[layer_idx]
        n = key_states.shape[0]
        keys = torch.cat([_tile(pk.to(key_states.dtype), n), key_states], dim=-2)
        values = torch.cat([_tile(pv.to(value_states.dtype), n), value_states], dim=-2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.prefix[layer_idx][0].shape[-2])


def cache_layers(kv: Any, upto: int | None = None) -> list[tuple[Tensor, Tensor]] | None:
    """The ``(keys, values)`` of every layer of an HF cache (positions ``< upto``), or None if unknown."""
    layers = getattr(kv, "layers", None)
    if not layers or not all(hasattr(l, "keys") and isinstance(l.keys, Tensor) for l in layers):
        return None
    return [(l.keys[..., :upto, :], l.values[..., :upto, :]) for l in layers]


FINAL_NORM_IN = "ln_final.hook_in"  # the final norm's input: the last block's output, before anything is unembedded


def model_tail(model: Any) -> Callable[[Tensor], Tensor] | None:
    """The part of the model after its last block (final norm and unembedding), or None if unknown."""
    hf = getattr(model, "original_model", None)
    if is_masked_lm(model):
        head = getattr(hf, "cls", None)
        return head if callable(head) else None
    if not (hasattr(model, "ln_final") and hasattr(model, "unembed")):
        return None
    cap = getattr(getattr(hf, "config", None), "final_logit_softcapping", None)

    def tail(h: Tensor) -> Tensor:
        logits = model.unembed(model.ln_final(h))
        return torch.tanh(logits / cap) * cap if cap else logits
    return tail


def _fit(x: Any, n: int, batch: int, swap: dict[int, Any]) -> Any:
    """Call arguments recorded for ``batch`` rows made fit for ``n`` rows (tensors tiled, caches swapped)."""
    if id(x) in swap:
        return swap[id(x)]
    if isinstance(x, Tensor):
        return _tile(x, n) if x.ndim >= 2 and x.shape[0] in (1, batch) else x
    if isinstance(x, tuple):
        return tuple(_fit(v, n, batch, swap) for v in x)
    if isinstance(x, list):
        return [_fit(v, n, batch, swap) for v in x]
    if isinstance(x, dict):
        return {k: _fit(v, n, batch, swap) for k, v in x.items()}
    return x


@dataclass
class Stairs:
    """The recorded block calls of one run and what is needed to re-run its blocks from any block on."""

    calls: list[tuple[tuple, dict]]  # each block's (args, kwargs) in the recorded run
    cache: Any  # the cache object the recorded run handed to the blocks (swapped for ``shared``)
    shared: SharedPrefix | None  # None: the blocks get no cache
    tail: Callable[[Tensor], Tensor]
    read_at: int  # the position (of the recorded run's positions) whose logits are read

    def resid(self, block: int) -> Float[Tensor, "batch pos d"]:
        """The recorded input of ``block``."""
        args, kwargs = self.calls[block]
        return args[0] if args else kwargs["hidden_states"]

    @property
    def batch(self) -> int:
        return int(self.resid(0).shape[0])

    def logits(self, model: Any, entry: Int[Tensor, "units"], parent: Int[Tensor, "units"] | None = None
               ) -> Float[Tensor, "rows vocab"]:
        """Logits of units entering at blocks ``entry`` (ascending); see :meth:`final`."""
        return self.tail(self.final(model, entry, parent)[:, None])[:, 0]

    def final(self, model: Any, entry: Int[Tensor, "units"], parent: Int[Tensor, "units"] | None = None
              ) -> Float[Tensor, "rows d"]:
        """The last block's output at ``read_at`` (before the tail) of units entering at blocks ``entry``
        (ascending), each with the recorded input of that block, or, where ``parent[u] >= 0``, with the
        input unit ``parent[u]`` (which entered at an earlier block) has there: a fork of that unit.

        Units that entered stay in the batch, so block ``k`` runs the units with ``entry ≤ k``; the units
        entering at ``k`` are the last ones of the batch there (rows ``unit · batch + i``). Hooks attached
        to the model fire as usual.
        """
        counts = torch.bincount(entry.cpu(), minlength=len(self.calls)).tolist()
        parents = None if parent is None else parent.tolist()
        b = self.batch
        swap = {id(self.cache): self.shared} if self.cache is not None else {}
        h: Tensor | None = None
        for k in range(int(entry.min()), len(self.calls)):
            if counts[k]:
                if parents is None:
                    new = _tile(self.resid(k), counts[k] * b)
                else:
                    first = 0 if h is None else h.shape[0] // b
                    new = torch.cat([self.resid(k) if p < 0 else h[p * b:(p + 1) * b]  # type: ignore[index]
                                     for p in parents[first:first + counts[k]]])
                h = new if h is None else torch.cat([h, new.to(h.dtype)])
            assert h is not None
            args, kwargs = self.calls[k]
            args = _fit(args, h.shape[0], b, swap)
            kwargs = _fit(kwargs, h.shape[0], b, swap)
            if args:
                args = (h, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": h}
            out = model.blocks[k](*args, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        assert h is not None
        return h[:, self.read_at]


@contextlib.contextmanager
def recording(model: Any) -> Iterator[list[tuple[tuple, dict] | None]]:
    """Record every block's call arguments during a forward (torch pre-hooks, removed on exit)."""
    calls: list[tuple[tuple, dict] | None] = [None] * len(model.blocks)

    def rec(k: int) -> Callable:
        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            calls[k] = (args, dict(kwargs))
        return pre

    handles = [b.register_forward_pre_hook(rec(k), with_kwargs=True) for k, b in enumerate(model.blocks)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _cache_in(calls: list[tuple[tuple, dict] | None]) -> Any:
    """The key/value cache object a recorded forward handed to its first block, or None."""
    if not calls or calls[0] is None:
        return None
    args, kwargs = calls[0]
    return next((v for v in (*args, *kwargs.values()) if hasattr(v, "update") and hasattr(v, "get_seq_length")), None)


def record_blocks(model: Any, tokens: Int[Tensor, "batch pos"], hooks: list[Any], *, cache: Any = None
                  ) -> tuple[list[tuple[tuple, dict] | None], Any]:
    """The block calls of a forward over ``tokens`` that continues ``cache`` (or starts a cache of its own),
    with ``hooks`` attached, and the cache its blocks filled. The forward stops before the final norm: nothing
    is unembedded. Use it inside :func:`knlens.run.compat.cache_keyword_fix`."""
    with recording(model) as calls:
        forward_until(model, tokens, FINAL_NORM_IN, hooks, past_key_values=cache, use_cache=True)
    return calls, cache if cache is not None else _cache_in(calls)


def build_stairs(model: Any, calls: list[tuple[tuple, dict] | None] | None, *, cache: Any,
                 prefix: list[tuple[Tensor, Tensor]] | None, read_at: int,
                 reference: Float[Tensor, "batch vocab"] | None, log_tolerance: float | None = None
                 ) -> Stairs | None:
    """A :class:`Stairs` for the recorded ``calls``, or None when the block loop does not reproduce
    ``reference`` (the recorded run's logits at ``read_at``) for two units entering at block 0.

    ``cache`` is the cache object of the recorded run and ``prefix`` the keys/values of the positions
    before its first one (both None for a run without a cache). ``reference=None`` skips the check: the
    caller then checks the staircase's own rows against plain forwards of the model (and catches what the
    block loop raises on an architecture it does not fit).
    """
    tail = model_tail(model)
    if tail is None or calls is None or not calls or any(c is None for c in calls):
        return None
    if (cache is None) != (prefix is None) or (prefix is not None and len(prefix) != len(calls)):
        return None
    if cache is None:  # a cache the forward made for itself is dropped (no earlier positions to read)
        cache = _cache_in(calls)
    plan = Stairs(calls=calls, cache=cache, shared=SharedPrefix(prefix) if prefix is not None else None,
                  tail=tail, read_at=read_at)  # type: ignore[arg-type]
    if reference is None:
        return plan
    try:
        with torch.no_grad():
            check = plan.logits(model, torch.zeros(2, dtype=torch.long))
    except Exception as err:  # noqa: BLE001 - an architecture the block loop does not fit
        log.debug("staircase unavailable (%s: %s); using whole-model forwards", type(err).__name__, err)
        return None
    return plan if reproduces(check, torch.cat([reference, reference]), log_tolerance) else None


def reproduces(check: Float[Tensor, "rows vocab"], reference: Float[Tensor, "rows vocab"],
               log_tolerance: float | None = None) -> bool:
    """Whether staircase logits equal the model's own: to ``log_tolerance`` (nats, measured for a half
    precision by :func:`knlens.run.precision.log_tolerance`) when given, else to 1e-4 of the largest logit
    in float32 and 2e-2 in half precision."""
    err = float((check.float() - reference.float()).abs().max()) if check.shape == reference.shape else float("inf")
    if log_tolerance is not None:
        tol = log_tolerance
    else:
        rel = 1e-4 if reference.dtype == torch.float32 and check.dtype == torch.float32 else 2e-2
        tol = rel * float(reference.float().abs().max().clamp_min(1.0))
    ok = err <= tol
    if not ok:
        log.debug("staircase does not reproduce the model's logits (%.3g apart, tolerance %.3g); "
                  "using whole-model forwards", err, tol)
    return ok


def disagreement(check: Tensor, reference: Tensor, what: str, *, half: bool = False,
                 log_tolerance: float | None = None, absolute_tolerance: float | None = None) -> str | None:
    """``None`` when ``check`` equals ``reference`` (a plain forward's numbers); else a sentence saying how
    far off. With ``log_tolerance`` (nats, from :func:`knlens.run.precision.log_tolerance`), probabilities
    are compared in log space and other values absolutely to it; with ``absolute_tolerance`` (logits), values
    absolutely. Otherwise to 1e-3 of the largest reference value in float32, 5e-2 in half precision
    (``half``, or either tensor in a half dtype).

    >>> disagreement(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0001]), "logits") is None
    True
    >>> disagreement(torch.tensor([3e-8]), torch.tensor([0.75]), "P(target)")
    'P(target) differ from a plain forward by 0.75 (largest value 0.75)'
    >>> disagreement(torch.tensor([1.32e-6]), torch.tensor([1.45e-6]), "P", log_tolerance=0.3) is None
    True
    >>> disagreement(torch.tensor([1e-6]), torch.tensor([4e-6]), "P", log_tolerance=0.3)
    'P differ from a plain forward by 1.39 nats (tolerance 0.3; largest value 4e-06)'
    """
    if check.shape != reference.shape:
        return f"{what} have shape {tuple(check.shape)}, a plain forward's {tuple(reference.shape)}"
    if not reference.numel():
        return None
    got, ref = check.float(), reference.float()
    scale = float(ref.abs().max())
    if log_tolerance is not None or absolute_tolerance is not None:
        if log_tolerance is not None and bool((ref > 0).all()) and bool((got > 0).all()):
            got, ref = got.log(), ref.log()
        tol = log_tolerance if log_tolerance is not None else absolute_tolerance
        err = float((got - ref).abs().max())
        if err == err and err <= tol:  # err == err: NaN never agrees
            return None
        unit = " nats" if log_tolerance is not None else ""
        return f"{what} differ from a plain forward by {err:.3g}{unit} (tolerance {tol:.3g}; largest value {scale:.3g})"
    half = half or check.dtype != torch.float32 or reference.dtype != torch.float32
    rtol = 5e-2 if half else 1e-3
    err = float((got - ref).abs().max())
    if err == err and err <= rtol * scale + 1e-12:
        return None
    return f"{what} differ from a plain forward by {err:.3g} (largest value {scale:.3g})"
