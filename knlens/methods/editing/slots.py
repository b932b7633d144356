"""Where a layer's value vectors live: the parameter behind ``W_out`` and the axis that indexes neurons.

TransformerLens' ``blocks.{l}.mlp.W_out`` is ``[d_mlp, d_model]`` on every architecture (row i is neuron
i's value vector, the direction it writes into the residual stream), but it is a *view* whose storage is
the Hugging Face module's weight: ``down_proj.weight`` ``[d_model, d_mlp]`` for gated MLPs (Llama, SmolLM2,
Gemma: an ``nn.Linear``, neurons on axis 1), ``c_proj.weight`` ``[d_mlp, d_model]`` for GPT-2 (a ``Conv1D``,
neurons on axis 0), ``output.dense.weight`` for BERT. An edit writes that parameter; :func:`value_slot`
finds it and checks that it holds exactly ``W_out`` (or its transpose) before anything is written.

>>> from knlens import load_model
>>> value_slot(load_model("tiny-llama"), 0).axis, value_slot(load_model("tiny-gpt2"), 0).axis
(1, 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import EditModelError, NeuronIndexError, SettingsError, TargetError
from knlens.core.tokens import target_tokens

__all__ = ["Slot", "value_slot", "value_vectors", "token_vector", "slot_change", "VectorKind"]

VectorKind = Literal["unembed", "embed"]


@dataclass(frozen=True)
class Slot:
    """Layer ``layer``'s ``W_out``: the parameter ``name`` (as in ``model.named_parameters()``), whose axis
    ``axis`` indexes neurons."""

    layer: int
    name: str
    axis: int


def _parameter_names(model: Any) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def value_slot(model: Any, layer: int) -> Slot:
    """The parameter that stores ``blocks.{layer}.mlp.W_out``, checked to equal it bit for bit.

    Raises :class:`~knlens.core.errors.NeuronIndexError` for a layer outside the model and
    :class:`~knlens.core.errors.EditModelError` for an architecture whose ``W_out`` is not one parameter.
    """
    if not 0 <= layer < model.cfg.n_layers:
        raise NeuronIndexError(f"layer {layer} outside the model's {model.cfg.n_layers} layers")
    mlp = model.blocks[layer].mlp
    module = getattr(getattr(mlp, "out", None), "original_component", None)
    weight = getattr(module, "weight", None)
    name = _parameter_names(model).get(id(weight))
    if name is None:
        raise EditModelError(f"layer {layer}'s MLP has no output projection parameter that knlens can edit "
                             f"(blocks.{layer}.mlp.out.original_component.weight)")
    w_out = mlp.W_out.detach()
    for axis, view in ((0, weight.detach()), (1, weight.detach().T)):
        if view.shape == w_out.shape and torch.equal(view, w_out):
            return Slot(layer, name, axis)
    raise EditModelError(f"the parameter {name} of shape {tuple(weight.shape)} does not hold blocks.{layer}.mlp.W_out "
                         f"{tuple(w_out.shape)}: this architecture's value vectors cannot be edited")


def value_vectors(model: Any, slot: Slot, neurons: list[int] | None = None) -> Float[Tensor, "k d_model"]:
    """The value vectors (rows of ``W_out``) of ``neurons`` of the slot's layer (all when ``None``), a copy."""
    weight = dict(model.named_parameters())[slot.name].detach()
    rows = weight if slot.axis == 0 else weight.T
    if neurons is None:
        return rows.clone()
    idx = torch.as_tensor(neurons, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= rows.shape[0]):
        raise NeuronIndexError(f"neuron {idx.tolist()} outside layer {slot.layer}'s {rows.shape[0]} neurons")
    return rows[idx.to(rows.device)].clone()


def token_vector(model: Any, target: str, kind: VectorKind = "unembed") -> Float[Tensor, "d_model"]:
    """A single-token target's vector: its column of the unembedding ``W_U`` (``"unembed"``, what Dai et al.'s
    edit adds) or its row of the embedding ``W_E`` (``"embed"``). A multi-token target raises
    :class:`~knlens.core.errors.TargetError`."""
    ids = target_tokens(model, target)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise TargetError(f"the target {target!r} is {len(ids)} tokens {pieces}; this edit adds one token's vector, "
                          f"so it needs a single-token target (the rank-one editor takes multi-token targets)")
    tok = ids[0]
    if kind == "unembed":
        return model.W_U[:, tok].detach().clone()
    if kind == "embed":
        return model.W_E[tok].detach().clone()
    raise SettingsError(f"unknown vector kind {kind!r}; use 'unembed' or 'embed'")


def slot_change(slot: Slot, neurons: list[int], rows: Float[Tensor, "k d_model"]
                ) -> tuple[str, int, Tensor, Tensor]:
    """The ``(parameter, axis, index, new values)`` change that writes ``rows`` as the value vectors of
    ``neurons`` (in the parameter's own orientation), for :func:`~knlens.methods.editing.edit.make_edit`."""
    return slot.name, slot.axis, torch.as_tensor(neurons, dtype=torch.long), rows if slot.axis == 0 else rows.T
