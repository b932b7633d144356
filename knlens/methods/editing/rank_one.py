"""A rank-one edit of one MLP layer's output projection, after ROME (Meng et al., 2022; docs/methods.md,
rank-one edit).

With ``M`` = ``W_out`` ``[d_mlp, d_model]`` of layer l (the MLP writes ``k·M``):

1. **key** ``k*``: the neuron activations (``hook_post``) at the subject's last token of the edit prompt,
   averaged over ``prefixes`` (ROME averages over ~20 text prefixes the model samples; knlens' default is the
   bare prompt, and any prefixes can be given);
2. **value** ``v* = k*·M + δ``: ``δ`` is added to the MLP output at the subject's last token and optimised
   with Adam so that the new target is predicted (mean per-token NLL, teacher forced, over the prompts),
   plus ``kl_factor``·KL(original ‖ edited) of the next token after "<subject> is a" (ROME's essence term)
   and ``weight_decay``·‖δ‖²/‖o‖² (o: the original MLP output there); ‖δ‖ is clamped to
   ``clamp_norm``·‖o‖ after every step, and the loop stops early when the loss drops below 0.05;
3. **update** ``M' = M + u rᵀ`` with ``u = C⁻¹k* / (k*ᵀC⁻¹k*)`` and ``r = v* − k*·M``, ``C`` the keys'
   second moment (:func:`~knlens.methods.editing.covariance.key_covariance`), so that ``k*·M' = v*`` exactly.

Defaults are ROME's for GPT-2 XL: 20 steps, lr 0.5, weight decay 0.5, clamp 4, KL factor 0.0625.

>>> from knlens import load_model, Fact
>>> model = load_model("tiny-gpt2")
>>> fact = Fact(["the capital of france is"], " paris", subject="france")
>>> edit = rank_one_edit(model, fact, " berlin", layer=0, covariance=torch.eye(48), steps=3)
>>> k, v, w = edit.params["key"], edit.params["value"], edit.slices[0].new      # c_proj.weight: [d_mlp, d_model]
>>> torch.allclose(k @ w, v, atol=1e-4)
True
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import PromptError, SettingsError
from knlens.core.facts import Fact
from knlens.core.models import is_masked_lm
from knlens.core.tokens import Queries, encode
from knlens.methods.editing.covariance import key_covariance
from knlens.methods.editing.edit import Edit, check_finite, check_new_target, make_edit
from knlens.methods.editing.slots import slot_change, value_slot, value_vectors
from knlens.methods.tracing.spans import subject_token_span
from knlens.run.engine import activations_at, target_logits
from knlens.run.hooks import add, hook_name

__all__ = ["rank_one_edit", "rank_one_update", "default_layer", "ESSENCE_TEMPLATE"]

ESSENCE_TEMPLATE = "{} is a"  # ROME's prompt for the KL term that keeps the subject's other properties
STOP_LOSS = 0.05


def default_layer(model: Any) -> int:
    """knlens' default edit layer when none is given: a quarter of the way up (ROME edits GPT-2 XL at 17 of
    48, GPT-J at 5 of 28 — early-middle MLPs, chosen there by causal tracing; trace your model to choose)."""
    return model.cfg.n_layers // 4


def _subject_positions(model: Any, q: Queries, subject: str) -> Tensor:
    """Each row's position of the subject's last token (rows of one prompt share it)."""
    last = torch.tensor([subject_token_span(model, p, subject)[1] - 1 for p in q.prompts], device=q.position.device)
    return last[q.prompt_index]


def _read(model: Any, q: Queries, subject_pos: Tensor, delta: Tensor, layer: int) -> Float[Tensor, "batch vocab"]:
    """Logits at the read positions of ``q`` with ``delta`` added to the MLP output at ``subject_pos``."""
    return target_logits(model, q, [(hook_name(layer, "mlp.hook_out"), add(delta, position=subject_pos))])


def rank_one_update(weights: Float[Tensor, "d_mlp d_model"], key: Float[Tensor, "d_mlp"],
                    value: Float[Tensor, "d_model"], covariance: Float[Tensor, "d_mlp d_mlp"], *,
                    ridge: float = 1e-4) -> Float[Tensor, "d_mlp d_model"]:
    """``M + u rᵀ`` with ``u = C⁻¹k / (kᵀC⁻¹k)``, ``r = v − k·M``: the least change (in the metric ``C``) that makes
    ``k·M' = v`` (computed in float64, returned in ``weights``' dtype). ``C`` gets ``ridge``·mean(diag C) added
    to its diagonal; the constraint holds for any ridge.

    >>> m = rank_one_update(torch.zeros(3, 2), torch.tensor([1.0, 0, 0]), torch.tensor([2.0, 5.0]), torch.eye(3))
    >>> (torch.tensor([1.0, 0, 0]) @ m).tolist()
    [2.0, 5.0]
    """
    m, k, v, c = weights.double(), key.double(), value.double(), covariance.double()
    c = c + ridge * c.diagonal().mean().clamp_min(1e-30) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    u = torch.linalg.solve(c, k)
    scale = u @ k
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise SettingsError(f"kᵀC⁻¹k = {float(scale)}: the key statistics cannot serve this key (too few texts?)")
    return (m + torch.outer(u / scale, v - k @ m)).to(weights.dtype)


def rank_one_edit(model: Any, fact: Fact, new_target: str, *, layer: int | None = None, prompt: int = 0,
                  prefixes: Sequence[str] = ("",), covariance: Float[Tensor, "d_mlp d_mlp"] | None = None,
                  steps: int = 20, lr: float = 0.5, weight_decay: float = 0.5, clamp_norm: float = 4.0,
                  kl_factor: float = 0.0625, ridge: float = 1e-4, n_texts: int = 1000, seed: int = 0,
                  cache_dir: str | os.PathLike[str] | None | Literal[False] = None) -> Edit:
    """Rewrite ``fact.prompts[prompt]`` → ``new_target`` (any number of tokens) at ``layer``'s ``W_out``.

    ``fact.subject`` must be given (the key is read at its last token). ``covariance``: the keys' second
    moment; ``None`` computes it with :func:`~knlens.methods.editing.covariance.key_covariance` (``n_texts``,
    ``seed``, ``cache_dir``). The model is not changed; apply the returned edit.
    """
    if is_masked_lm(model):
        raise SettingsError("the rank-one edit is for left-to-right models (it predicts the target after the prompt)")
    if fact.subject is None:
        raise PromptError("the rank-one edit reads its key at the subject's last token: give the fact a subject")
    if steps < 1:
        raise SettingsError(f"steps must be at least 1, got {steps}")
    check_finite(lr=lr, weight_decay=weight_decay, clamp_norm=clamp_norm, kl_factor=kl_factor, ridge=ridge)
    if not 0 <= prompt < len(fact.prompts):
        raise SettingsError(f"prompt {prompt} outside the fact's {len(fact.prompts)} prompts")
    check_new_target(model, fact.target, new_target)
    layer = default_layer(model) if layer is None else layer
    slot = value_slot(model, layer)
    text = fact.prompts[prompt]
    prompts = list(dict.fromkeys(f"{p.strip()} {text}".strip() for p in prefixes))
    # one batch: the (prefixed) edit prompts teacher forced on the new object, then the essence prompt's last token
    q = encode(model, [*prompts, ESSENCE_TEMPLATE.format(fact.subject)], new_target)
    essence = q.prompt_index == len(prompts)
    q = q.select(~essence | (q.token_index == 0))
    essence, rows = q.prompt_index == len(prompts), torch.arange(len(q), device=q.position.device)
    at = _subject_positions(model, q, fact.subject)
    keys = dataclasses.replace(q, position=at).select(~essence & (q.token_index == 0))
    key = activations_at(model, keys, [hook_name(layer)])[hook_name(layer)].double().mean(0).cpu()
    out0 = activations_at(model, keys.select([0]), [hook_name(layer, "mlp.hook_out")])
    target_norm = out0[hook_name(layer, "mlp.hook_out")][0].double().norm().item()
    delta = torch.zeros(model.cfg.d_model, device=at.device, requires_grad=True)
    with torch.no_grad():
        base = _read(model, q, at, delta, layer)[essence].float().log_softmax(-1)
    opt = torch.optim.Adam([delta], lr=lr)
    per_prompt = torch.bincount(q.prompt_index)
    ran, nll = 0, float("nan")
    with torch.enable_grad():
        for ran in range(1, steps + 1):
            logp = _read(model, q, at, delta, layer).float().log_softmax(-1)
            tok = -logp[rows, q.target]
            nll_t = (tok / per_prompt[q.prompt_index])[~essence].sum() / len(prompts)  # per token, then per prompt
            kl = torch.nn.functional.kl_div(logp[essence], base, log_target=True, reduction="batchmean")
            loss = nll_t + kl_factor * kl + weight_decay * delta.norm() ** 2 / target_norm ** 2
            nll = float(nll_t.detach())
            if float(loss.detach()) < STOP_LOSS:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                cap = clamp_norm * target_norm
                if float(delta.norm()) > cap:
                    delta.mul_(cap / delta.norm())
    weights = value_vectors(model, slot).double().cpu()
    value = key @ weights + delta.detach().double().cpu()
    cov = key_covariance(model, layer, n_texts=n_texts, seed=seed, cache_dir=cache_dir) if covariance is None \
        else covariance
    new = rank_one_update(weights, key, value, cov.cpu(), ridge=ridge)
    params = {"fact": fact.name or text, "prompt": text, "subject": fact.subject, "target_old": fact.target,
              "target_new": new_target, "layer": layer, "prefixes": list(prefixes), "steps": steps,
              "steps_run": ran, "final_nll": nll, "lr": lr, "weight_decay": weight_decay, "clamp_norm": clamp_norm,
              "kl_factor": kl_factor, "ridge": ridge, "covariance": "given" if covariance is not None else
              f"text_sample part 0, n={n_texts}, seed={seed}", "key": key.float(), "value": value.float(),
              "delta": delta.detach().float().cpu()}
    return make_edit(model, "rank-one", params, [slot_change(slot, list(range(model.cfg.d_mlp)), new.float())])
