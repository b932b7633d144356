"""Dai et al.'s knowledge-neuron edits on the value slots (rows of ``W_out``) of a fact's neurons, and the
random-neuron control of the same norm (docs/methods.md, editing).

* :func:`kn_update` — each value vector ``v`` of the fact's neurons moves away from the old object's vector
  and towards the new one's: ``v ← v + s·(−λ₁·‖v‖/‖e_o‖·e_o + λ₂·‖v‖/‖e_o'‖·e_o')`` (λ₁ = 1, λ₂ = 8 as in
  Dai et al.'s code; ``e`` the token's unembedding column). ``s`` is the sign of the neuron's mean activation
  on the fact's prompts (``sign="activation"``, the default): a neuron writes ``a·v``, so in a gated MLP,
  where ``a = silu(gate)·up`` is often negative, adding ``e_o'`` to ``v`` with ``a < 0`` would push the
  output *away* from the new object. ``sign="none"`` is Dai's formula as published (``s = 1``).
* :func:`kn_erase` — the value vectors are set to a neutral vector: the unknown token's vector (Dai et al.'s
  paper, ``neutral="unk"``), zero (their code, ``"zero"``) or the mean over the vocabulary (``"mean"``).
* :func:`random_neuron_edit` — ``n`` random neurons of a layer, their value vectors moved in a random
  direction with a given Frobenius norm: the control an editor must beat.

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is"], " paris", subject="france")
>>> edit = kn_update(model, fact, " berlin", NeuronSet([(1, 3), (1, 7)]))
>>> edit.editor, [tuple(s.new.shape) for s in edit.slices]        # down_proj.weight is [d_model, d_mlp]
('kn-update', [(32, 2)])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import NoOpEditError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.methods.editing.edit import Edit, check_finite, check_new_target, make_edit
from knlens.methods.editing.slots import VectorKind, slot_change, token_vector, value_slot, value_vectors
from knlens.run.engine import activations_at
from knlens.run.hooks import hook_name

__all__ = ["kn_update", "kn_erase", "random_neuron_edit", "LAMBDA_OLD", "LAMBDA_NEW"]

LAMBDA_OLD, LAMBDA_NEW = 1.0, 8.0  # Dai et al.'s code (docs/methods.md, editing)
Sign = Literal["activation", "none"]
Neutral = Literal["unk", "zero", "mean"]


def _neurons(model: Any, neurons: NeuronSet) -> dict[int, list[int]]:
    if not len(neurons):
        raise NoOpEditError("no neurons to edit: the neuron set is empty")
    neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    return dict(sorted(neurons.by_layer().items()))


def _signs(model: Any, fact: Fact, layers: dict[int, list[int]]) -> dict[int, Float[Tensor, "_"]]:
    """Per layer, the sign (±1) of each neuron's mean activation at the prompts' last token."""
    q = encode(model, list(fact.prompts), fact.target)
    q = q.select(q.token_index == 0)  # the prompts themselves, not the teacher-forced continuations
    acts = activations_at(model, q, [hook_name(l) for l in layers])
    out = {}
    for l, idx in layers.items():
        mean = acts[hook_name(l)][:, idx].float().mean(0).cpu()
        out[l] = torch.where(mean < 0, -1.0, 1.0)
    return out


def kn_update(model: Any, fact: Fact, new_target: str, neurons: NeuronSet, *, lambda1: float = LAMBDA_OLD,
              lambda2: float = LAMBDA_NEW, vectors: VectorKind = "unembed", sign: Sign = "activation") -> Edit:
    """Dai et al.'s update of ``fact`` (old object ``fact.target``) to ``new_target`` on ``neurons``' value slots.

    Both targets must be single tokens. ``vectors``: the tokens' ``"unembed"`` (default) or ``"embed"`` vectors.
    ``sign``: ``"activation"`` (flip the step for neurons whose mean activation on the fact's prompts is
    negative) or ``"none"`` (Dai's formula as published). The model is not changed; apply the returned edit.
    """
    check_finite(lambda1=lambda1, lambda2=lambda2)
    if sign not in ("activation", "none"):
        raise SettingsError(f"sign must be 'activation' or 'none', got {sign!r}")
    check_new_target(model, fact.target, new_target)
    e_old, e_new = token_vector(model, fact.target, vectors), token_vector(model, new_target, vectors)
    layers = _neurons(model, neurons)
    signs = _signs(model, fact, layers) if sign == "activation" else {l: torch.ones(len(i)) for l, i in layers.items()}
    changes = []
    for l, idx in layers.items():
        slot = value_slot(model, l)
        v = value_vectors(model, slot, idx).float()
        norm = v.norm(dim=1, keepdim=True)
        step = -lambda1 * norm / e_old.norm() * e_old.float() + lambda2 * norm / e_new.norm() * e_new.float()
        changes.append(slot_change(slot, idx, v + signs[l][:, None].to(v) * step.to(v)))
    params = {"fact": fact.name or fact.prompts[0], "target_old": fact.target, "target_new": new_target,
              "neurons": neurons, "lambda1": float(lambda1), "lambda2": float(lambda2), "vectors": vectors,
              "sign": sign, "signs": torch.cat([signs[l] for l in layers])}
    return make_edit(model, "kn-update", params, changes)


def _neutral(model: Any, neutral: Neutral, vectors: VectorKind) -> Float[Tensor, "d_model"]:
    if neutral == "zero":
        return torch.zeros(model.cfg.d_model)
    if neutral == "mean":
        table = model.W_U.T if vectors == "unembed" else model.W_E
        return table.detach().float().mean(0)
    if neutral == "unk":
        unk = model.tokenizer.unk_token_id
        if unk is None:
            raise SettingsError("the tokenizer has no unknown token; erase with neutral='zero' or 'mean'")
        return (model.W_U[:, unk] if vectors == "unembed" else model.W_E[unk]).detach().float()
    raise SettingsError(f"unknown neutral vector {neutral!r}; use 'unk', 'zero' or 'mean'")


def kn_erase(model: Any, neurons: NeuronSet, *, neutral: Neutral = "unk", vectors: VectorKind = "unembed") -> Edit:
    """Set ``neurons``' value slots to a neutral vector: the unknown token's (``"unk"``, Dai et al.'s paper),
    ``"zero"`` (their code) or the vocabulary's ``"mean"``; ``vectors`` picks unembedding or embedding."""
    layers = _neurons(model, neurons)
    e = _neutral(model, neutral, vectors)
    changes = []
    for l, idx in layers.items():
        slot = value_slot(model, l)
        changes.append(slot_change(slot, idx, e[None, :].expand(len(idx), -1)))
    return make_edit(model, "kn-erase", {"neurons": neurons, "neutral": neutral, "vectors": vectors}, changes)


def random_neuron_edit(model: Any, counts: Mapping[int, int], norm: float, *, seed: int = 0,
                       exclude: NeuronSet | None = None) -> Edit:
    """``counts[l]`` random neurons of each layer ``l`` (none of ``exclude``), their value vectors moved by one
    random Gaussian direction scaled to Frobenius norm ``norm`` over all of them — e.g. another edit's
    ``delta_norm``: the control an editor must beat.

    >>> from knlens import load_model
    >>> round(random_neuron_edit(load_model("tiny-gpt2"), {1: 3}, 2.5).delta_norm, 4)
    2.5
    """
    check_finite(norm=norm)
    if norm <= 0 or not counts or min(counts.values()) < 1:
        raise NoOpEditError(f"a random edit needs neurons and a positive norm, got counts {dict(counts)}, norm {norm}")
    g = torch.Generator().manual_seed(seed)
    picked: dict[int, list[int]] = {}
    for layer, n in sorted(counts.items()):
        taken = {x.index for x in (exclude or NeuronSet()) if x.layer == layer}
        pool = torch.tensor([i for i in range(model.cfg.d_mlp) if i not in taken])
        if n > len(pool):
            raise SettingsError(f"{n} random neurons asked for in layer {layer}, which has {len(pool)} to draw from")
        picked[layer] = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values.tolist()
    direction = torch.randn(sum(counts.values()), model.cfg.d_model, generator=g, dtype=torch.float64)
    delta = direction * (norm / direction.norm())
    changes, start = [], 0
    for layer, idx in picked.items():
        slot = value_slot(model, layer)
        v = value_vectors(model, slot, idx)
        changes.append(slot_change(slot, idx, (v.double().cpu() + delta[start:start + len(idx)]).to(v.dtype)))
        start += len(idx)
    neurons = NeuronSet([(l, i) for l, idx in picked.items() for i in idx])
    return make_edit(model, "random-neurons", {"neurons": neurons, "norm": float(norm), "seed": seed}, changes)
