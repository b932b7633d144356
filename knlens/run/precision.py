"""How closely a faster path must reproduce a plain forward, in the precision the model computes in.

In float32 every engine agrees with a plain forward to rounding (the checks use 1e-3 of the largest
value). In bf16/fp16 the *same* computation in batches of another shape runs other kernels with other
summation orders: on a random Llama-8B-shaped model in bf16 on an H100, a plain forward of a prompt alone
and as one row of a batch gave P(target) 1.45e-6 and 1.32e-6 (0.09 nat). A fixed tolerance loose enough
for that would also pass real errors of the same size on a model whose half-precision kernels are
reproducible (a corrupted prefix cache moved the α = 1 cells of the tiny test model by 0.088 nat in bf16
on a CPU). So the tolerance is measured, per query row: the model's own disagreement between a plain
forward of the row alone and of the row as one of ``rows`` copies in a batch — a check independent of the
engine being checked — times :data:`NOISE_FACTOR`, and at least :data:`LOG_FLOOR`.

>>> from knlens import load_model, encode
>>> model = load_model("tiny-llama")
>>> q = encode(model, ["the capital of france is"], " paris")
>>> log_tolerance(model, q.tokens, int(q.position[0]), int(q.target[0]), rows=8) is None   # float32
True
>>> self_disagreement(model, q.tokens, int(q.position[0]), int(q.target[0]), rows=8).quantity < 1e-5
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jaxtyping import Int
from torch import Tensor

from knlens.run.engine import Quantity, forward, read_quantity
from knlens.run.hooks import capture

__all__ = ["Tolerance", "low_precision", "self_disagreement", "log_tolerance", "NOISE_FACTOR", "LOG_FLOOR"]

NOISE_FACTOR = 4.0  # the tolerance over the measured batch-shape noise
LOG_FLOOR = 0.02  # nats: the least tolerance in half precision


def low_precision(model: Any) -> bool:
    """True when ``model`` computes in less than float32: half weights, or autocast on its device."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    return p.dtype != torch.float32 or torch.is_autocast_enabled(p.device.type)


@dataclass(frozen=True)
class Tolerance:
    """How far a faster path may be from a plain forward in half precision: ``quantity`` in nats (log P for
    probabilities, else the quantity itself), ``logits`` for whole logit vectors and ``activations`` for the
    activations of the hook points asked for (absolute; ``None`` when none were asked for)."""

    quantity: float
    logits: float
    activations: float | None = None


@torch.no_grad()
def self_disagreement(model: Any, tokens: Int[Tensor, "1 pos"], position: int, target: int, rows: int,
                      quantity: Quantity = "prob", names: Sequence[str] = ()) -> Tolerance:
    """The largest differences between a plain forward of ``tokens`` alone and as one of ``rows`` copies in
    one batch, read at ``position``: of ``quantity`` (nats), of the whole logit vector and of the
    activations of hook points ``names``."""
    logits, acts = [], []
    for n in (1, max(2, rows)):
        seen: dict[str, list[Tensor]] = {name: [] for name in names}
        hooks = [(name, capture(seen[name], position)) for name in names]
        logits.append(forward(model, tokens.expand(n, -1), hooks)[:, position].float())
        acts.append([seen[name][0].float() for name in names])
    alone, batch = (read_quantity(x, torch.full((x.shape[0],), target, device=x.device), quantity) for x in logits)
    if quantity == "prob":
        alone, batch = alone.clamp_min(1e-30).log(), batch.clamp_min(1e-30).log()
    act_err = max((float((b - a).abs().max()) for a, b in zip(*acts)), default=None)
    return Tolerance(quantity=float((batch - alone).abs().max()),
                     logits=float((logits[1] - logits[0]).abs().max()), activations=act_err)


def log_tolerance(model: Any, tokens: Int[Tensor, "1 pos"], position: int, target: int, rows: int,
                  quantity: Quantity = "prob", names: Sequence[str] = ()) -> Tolerance | None:
    """``None`` in float32; in half precision the tolerances for a faster path against a plain forward:
    ``max(LOG_FLOOR, NOISE_FACTOR × self_disagreement)``, for the quantity, whole logit vectors and the
    activations of ``names``."""
    if not low_precision(model):
        return None
    noise = self_disagreement(model, tokens, position, target, rows, quantity, names)

    def widen(x: float | None) -> float | None:
        return None if x is None else max(LOG_FLOOR, NOISE_FACTOR * x)
    return Tolerance(quantity=widen(noise.quantity), logits=widen(noise.logits),  # type: ignore[arg-type]
                     activations=widen(noise.activations))
