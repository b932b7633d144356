"""Structural distance between located neurons from the weights that connect them (Chen et al., 2024,
"Cracking Factual Knowledge"; docs/methods.md, structural distance).

A neuron A = (l_A, a) writes ``a_A · v_A`` into the residual stream, ``v_A = W_out^{l_A}[a, :]``. A later
neuron B = (l_B, b) reads the residual ``r`` through its layer's norm ``x = N(r)`` (RMSNorm: ``γ ⊙ r / rms(r)``).
The structural weight is how strongly B reads A's write, ``w_AB``; the distance is ``d_AB = |1 / w_AB|``.

**Non-gated MLP** (GPT-2): ``post_b = act(x · W_in[:, b])`` and the paper's weight is ``w = v_A · W_in[:, b]``.

**Gated MLP** (Llama, SmolLM2, Gemma): ``post_b = act(g_b) · u_b`` with ``g_b = x · W_gate[:, b]`` and
``u_b = x · W_in[:, b]`` (``W_in`` is the ``up`` projection). B reads A's write through *both* columns. The
first-order change of B's output when A's activation moves by ``δ`` (chain rule, at a clean point ``r``):

    ∂post_b/∂a_A = act'(g_b) · u_b · (J v_A) · W_gate[:, b]  +  act(g_b) · (J v_A) · W_in[:, b],
    J = ∂N(r)/∂r = diag(γ) / rms(r) · (I − r rᵀ / (d · rms(r)²))

``mode="sensitivity"`` (the default) is this derivative, computed exactly by autograd through the model's own
norm and activation at the target position of each prompt and averaged over the prompts: it weighs the gate and
the up column as the clean point does. ``mode="up"`` and ``mode="gate"`` are the weight-only readings
``(γ ⊙ v_A) · W_in[:, b]`` and ``(γ ⊙ v_A) · W_gate[:, b]`` (the norm's gain folded in, its ``1/rms`` scale and
projection dropped), closest to the paper's ``W_out · W_in``. The direction is always A's output into B's input
(the authors' LLaMA branch appears to take the reverse, ``W_in^{l_A} · W_out^{l_B}``; not followed here).

**Span rules.** Direct weights are read between adjacent layers only (``l_B = l_A + 1``); for a gap of 2 or 3 the
distance is the shortest summed distance along a chain of located neurons, one layer per hop
(``scipy.sparse.csgraph.shortest_path`` on the layer-ordered graph); within a layer and beyond ``max_span`` (3)
layers it is infinite, and so is a gap with no chain. The matrix is made symmetric (``min(d_AB, d_BA)``).

>>> import numpy as np
>>> w = np.array([[0, 2.0, 0], [0, 0, -0.5], [0, 0, 0]])      # A→B 2, B→C −0.5
>>> structural_distance(w, [0, 1, 2]).round(2).tolist()
[[inf, 0.5, 2.5], [0.5, inf, 2.0], [2.5, 2.0, inf]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from scipy.sparse import csr_array
from scipy.sparse.csgraph import shortest_path
from torch import Tensor

from knlens.core.errors import SettingsError
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries
from knlens.run.engine import activations_at

__all__ = ["Mode", "MODES", "MAX_SPAN", "structural_distance", "adjacent_weights", "neuron_distances"]

Mode = Literal["sensitivity", "up", "gate"]
MODES: tuple[str, ...] = ("sensitivity", "up", "gate")
MAX_SPAN = 3


def structural_distance(weights: Float[np.ndarray, "n n"], layers: Sequence[int], *,
                        max_span: int = MAX_SPAN) -> Float[np.ndarray, "n n"]:
    """Symmetric distances from the direct weights ``weights[i, j]`` (read only where ``layers[j] == layers[i] + 1``):
    ``|1/w|`` between adjacent layers, the shortest one-layer-per-hop chain for gaps up to ``max_span``, infinite
    within a layer, beyond ``max_span`` or without a chain (see the module docstring)."""
    lay = np.asarray(layers)
    n = len(lay)
    if weights.shape != (n, n):
        raise SettingsError(f"weights has shape {weights.shape}, expected ({n}, {n}) for {n} neurons")
    if max_span < 1:
        raise SettingsError(f"max_span must be at least 1, got {max_span}")
    gap = lay[None, :] - lay[:, None]
    with np.errstate(divide="ignore"):
        direct = np.where((gap == 1) & (weights != 0) & np.isfinite(weights), np.abs(1.0 / weights), 0.0)
    dist = shortest_path(csr_array(direct), method="D", directed=True) if n else np.zeros((0, 0))
    dist = np.where((gap >= 1) & (gap <= max_span), dist, np.inf)
    return np.minimum(dist, dist.T)


def _act(model: Any, layer: int) -> Any:
    hf = getattr(model.blocks[layer].mlp, "original_component", None)
    act = getattr(hf, "act_fn", None) or getattr(hf, "act", None)
    if act is None:
        raise SettingsError(f"layer {layer}'s MLP exposes no activation function (act_fn / act): use mode='up' or "
                            f"'gate' (weight-only) for this architecture")
    return act


def _norm(model: Any, layer: int) -> Any:
    norm = getattr(model.blocks[layer].ln2, "original_component", None)
    if norm is None:
        raise SettingsError(f"layer {layer} has no MLP input norm module (blocks.{layer}.ln2)")
    return norm


def _gain(model: Any, layer: int) -> Float[Tensor, "d_model"]:
    """The norm's per-dimension gain γ, read from its output on ±1 (mean 0, RMS 1: LayerNorm and RMSNorm both
    return γ ⊙ x + bias there, also where γ is stored as 1 + weight)."""
    norm = _norm(model, layer)
    x = torch.ones(model.cfg.d_model)
    x[1::2] = -1.0
    if model.cfg.d_model % 2:
        x[-1] = 0.0                      # keeps the mean 0; the rolled probe reads that dimension
    bias = getattr(norm, "bias", None)
    gains = []
    for probe in (x, x.roll(1)):
        with torch.no_grad():
            out = norm(probe[None, None].to(next(norm.parameters()).dtype))[0, 0].float()
        out = out - (bias.detach().float() if bias is not None else 0.0)
        gains.append(out / probe.where(probe != 0, torch.ones(())))
    return torch.where(x != 0, gains[0], gains[1])


def _post(model: Any, layer: int, idx: Tensor) -> Any:
    """r ↦ post-activations of ``idx`` of ``layer`` (gated or not), through the model's own norm and activation."""
    mlp, norm, act = model.blocks[layer].mlp, _norm(model, layer), _act(model, layer)
    w_in = mlp.W_in.detach().float()[:, idx]
    b_in = getattr(mlp, "b_in", None)
    b_in = b_in.detach().float()[idx] if b_in is not None else 0.0
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    w_gate = mlp.W_gate.detach().float()[:, idx] if gated else None

    def post(r: Tensor) -> Tensor:
        x = norm(r[None, None].to(next(norm.parameters()).dtype))[0, 0].float()
        up = x @ w_in + b_in
        return act(x @ w_gate) * up if w_gate is not None else act(up)
    return post


def _sensitivity(model: Any, l_a: int, idx_a: Tensor, idx_b: Tensor, resid: Float[Tensor, "prompt d_model"]
                 ) -> Float[Tensor, "a b"]:
    v = model.blocks[l_a].mlp.W_out.detach().float()[idx_a]                       # [a, d_model]
    post = _post(model, l_a + 1, idx_b)
    jac = torch.stack([torch.autograd.functional.jacobian(post, r.float()) for r in resid])  # [prompt, b, d_model]
    return torch.einsum("pbd,ad->ab", jac, v) / len(resid)


def _weight_only(model: Any, l_a: int, idx_a: Tensor, idx_b: Tensor, mode: str) -> Float[Tensor, "a b"]:
    mlp_b = model.blocks[l_a + 1].mlp
    if mode == "gate" and not getattr(model.cfg, "gated_mlp", False):
        raise SettingsError("mode='gate' needs a gated MLP (silu(gate)·up); this model's MLP has no W_gate")
    cols = (mlp_b.W_gate if mode == "gate" else mlp_b.W_in).detach().float()[:, idx_b]
    v = model.blocks[l_a].mlp.W_out.detach().float()[idx_a] * _gain(model, l_a + 1)
    return v @ cols


def adjacent_weights(model: Any, neurons: NeuronSet, *, mode: Mode = "sensitivity", q: Queries | None = None
                     ) -> Float[np.ndarray, "n n"]:
    """``w[i, j]`` for every pair of ``neurons`` (in the set's order) with ``layer_j = layer_i + 1``, 0 elsewhere.
    ``mode="sensitivity"`` needs ``q`` (the prompts whose target positions are the clean points)."""
    if mode not in MODES:
        raise SettingsError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    if mode == "sensitivity" and q is None:
        raise SettingsError("mode='sensitivity' reads the clean point of prompts: pass q (encode(model, prompts, target))")
    neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    items = list(neurons)
    n = len(items)
    out = np.zeros((n, n))
    layers = sorted({nr.layer for nr in items})
    pairs = [l for l in layers if l + 1 in layers]
    resid: dict[int, Tensor] = {}
    if mode == "sensitivity" and pairs:
        names = {l + 1: f"blocks.{l + 1}.ln2.hook_in" for l in pairs}
        acts = activations_at(model, q.select([int(i) for i in (q.token_index == 0).nonzero()[:, 0]]),  # type: ignore[union-attr]
                              list(names.values()))
        resid = {l: acts[names[l + 1]].float().cpu() for l in pairs}
    for l in pairs:
        rows = [i for i, nr in enumerate(items) if nr.layer == l]
        cols = [j for j, nr in enumerate(items) if nr.layer == l + 1]
        idx_a = torch.tensor([items[i].index for i in rows])
        idx_b = torch.tensor([items[j].index for j in cols])
        with torch.no_grad() if mode != "sensitivity" else torch.enable_grad():
            w = (_sensitivity(model, l, idx_a, idx_b, resid[l]) if mode == "sensitivity"
                 else _weight_only(model, l, idx_a, idx_b, mode))
        out[np.ix_(rows, cols)] = w.detach().double().numpy()
    return out


def neuron_distances(model: Any, neurons: NeuronSet, *, mode: Mode = "sensitivity", q: Queries | None = None,
                     max_span: int = MAX_SPAN) -> Float[np.ndarray, "n n"]:
    """The symmetric structural distance matrix of ``neurons`` (in the set's order): :func:`adjacent_weights`
    turned into distances by :func:`structural_distance`.

    >>> from knlens import load_model, NeuronSet
    >>> m = load_model("tiny-llama")
    >>> d = neuron_distances(m, NeuronSet([(0, 1), (0, 2), (1, 5)]), mode="up")
    >>> bool(np.isinf(d[0, 1])), bool(np.isfinite(d[0, 2])), bool((d == d.T).all())
    (True, True, True)
    """
    w = adjacent_weights(model, neurons, mode=mode, q=q)
    return structural_distance(w, [nr.layer for nr in neurons], max_span=max_span)
