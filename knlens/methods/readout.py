"""Suppress (or scale) neuron sets at the target position and read the whole next-token distribution there: the
log-probabilities of chosen tokens and the top prediction, clean and with each set moved, e.g. the probabilities
of singular, plural and neutral continuations and how often the top prediction flips
(docs/methods.md, syntax and the KN thesis critique).

Each set moves its neurons to ``b + f·(a − b)`` at each row's target position (:func:`~knlens.methods.scaling.path_scale`,
``b`` = 0, ``f`` = 0 suppresses); every other position and neuron keeps its clean value. Every (set, row) is one row
of a plain whole-prompt forward, the reference the faster engines of :mod:`knlens.methods.scaling` are checked
against; they read one target token per row, this reads many.

>>> from knlens import load_model, encode, NeuronSet
>>> model = load_model("tiny-llama")
>>> q = encode(model, ["the capital of france is", "this dog is"], " paris")
>>> ids = torch.tensor([[7, 8], [7, 9]])                           # two tokens read per row
>>> r = readout(model, q, [NeuronSet([(1, 3)]), NeuronSet([(0, 5)])], ids)
>>> r.clean.shape, r.after.shape, r.argmax_after.shape
(torch.Size([2, 2]), torch.Size([2, 2, 2]), torch.Size([2, 2]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.core.errors import HookShapeError, NonFiniteError
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries
from knlens.methods.scaling import path_scale, set_masks
from knlens.run.engine import chunks, target_logits
from knlens.run.hooks import hook_name

__all__ = ["Readout", "readout"]


@dataclass(frozen=True)
class Readout:
    """Log-probabilities of the tokens read (``clean`` ``[row, k]``, ``after`` ``[set, row, k]``) and the top
    prediction over the whole vocabulary (``argmax_clean`` ``[row]``, ``argmax_after`` ``[set, row]``)."""

    clean: Float[Tensor, "row k"]
    after: Float[Tensor, "set row k"]
    argmax_clean: Int[Tensor, "row"]
    argmax_after: Int[Tensor, "set row"]


@torch.no_grad()
def _read(model: Any, q: Queries, tokens: Tensor, masks: Tensor | None, factor: float,
          hook_point: str) -> tuple[Tensor, Tensor]:
    hooks = [] if masks is None else [
        (hook_name(l, hook_point), path_scale(factor, masks[l][None, :].expand(len(q), -1), q.position))
        for l in masks.any(-1).nonzero()[:, 0].tolist()]
    logp = target_logits(model, q, hooks).float().log_softmax(-1)
    if not torch.isfinite(logp).all():
        raise NonFiniteError("the model produced non-finite log-probabilities")
    return logp.gather(1, tokens.to(logp.device)).cpu(), logp.argmax(-1).cpu()


def readout(model: Any, q: Queries, sets: Sequence[NeuronSet], tokens: Int[Tensor, "row k"], *,
            factor: float = 0.0, hook_point: str = "hook_post", batch_size: int = 64) -> Readout:
    """Clean and per-set log-probabilities of ``tokens[r]`` at row ``r``'s target position, and the top
    predictions, with each of ``sets`` moved by ``factor`` there (see the module docstring)."""
    if tokens.ndim != 2 or tokens.shape[0] != len(q):
        raise HookShapeError(f"tokens must be [rows={len(q)}, k], got {tuple(tokens.shape)}")
    masks = set_masks(sets, model.cfg.n_layers, model.cfg.d_mlp)
    clean = torch.empty(tokens.shape, dtype=torch.float32)
    after = torch.empty((len(sets), *tokens.shape), dtype=torch.float32)
    top_clean = torch.empty(len(q), dtype=torch.long)
    top_after = torch.empty(len(sets), len(q), dtype=torch.long)
    for s in chunks(len(q), batch_size):
        rows = torch.arange(len(q))[s]
        sub = q.select(rows)
        clean[s], top_clean[s] = _read(model, sub, tokens[s], None, factor, hook_point)
        for i in range(len(sets)):
            after[i, s], top_after[i, s] = _read(model, sub, tokens[s], masks[i], factor, hook_point)
    return Readout(clean, after, top_clean, top_after)
