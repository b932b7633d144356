"""MEMLA's neuron-masked edit (docs/methods.md, MEMLA): only the value vectors (rows of ``W_out``) of given
neurons move, one trainable group per neuron category (language-independent and language-specific).

For every layer holding the neurons, a trainable update ``Δ_l`` ``[k_l, d_model]`` of exactly those rows
(zero at the start) is optimised with Adam (lr 1e-3, at most 60 steps) on

    loss = 2.5 · NLL(new object) + 2 · P(old object)

on the edit prompt, both at the sequence level and teacher forced: NLL(new) = −Σ_t log P(new_t | prompt,
new_<t), P(old) = Π_t P(old_t | prompt, old_<t), so multi-token objects are handled by teacher forcing.
The loop stops before a step once P(new) > 0.96. Then, as in MEMLA's code, **half** of the learned update is
committed: ``v ← v + ½·Δ``. The model is never written during the optimisation: ``Δ`` enters through hooks
(``mlp.hook_out += hook_post[..., rows] · Δ``, exactly what the row change does), and the committed edit is
checked against those hooks in one plain forward (:class:`~knlens.core.errors.EditModelError` on a mismatch).
MEMLA's LoRA factors (B·A, rank 4 per neuron) are replaced by a full update of the masked rows: the mask, not
the rank, is the constraint.

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is"], " paris")
>>> edit = memla_edit(model, fact, " berlin", {"independent": NeuronSet([(1, 3)]), "specific": NeuronSet([(0, 5)])},
...                   steps=5)
>>> edit.editor, edit.params["steps_run"], sorted(s.name.split(".")[1] for s in edit.slices)
('memla', 5, ['0', '1'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import EditModelError, NoOpEditError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries, encode
from knlens.methods.editing.edit import Edit, check_finite, check_new_target, make_edit
from knlens.methods.editing.slots import slot_change, value_slot, value_vectors
from knlens.run.engine import target_logits
from knlens.run.hooks import Hook, hook_name

__all__ = ["memla_edit", "memla_loss", "sequence_logprob", "NLL_WEIGHT", "OLD_WEIGHT", "STOP_P", "COMMIT"]

NLL_WEIGHT, OLD_WEIGHT = 2.5, 2.0  # MEMLA's code: 2.5·NLL(new) + 2·P(old)
STOP_P = 0.96  # stop once P(new) exceeds it
COMMIT = 0.5  # the share of the learned update written into the weights


def memla_loss(logp_new: Float[Tensor, "prompt"], logp_old: Float[Tensor, "prompt"], *, nll_weight: float = NLL_WEIGHT,
               old_weight: float = OLD_WEIGHT) -> Float[Tensor, ""]:
    """``nll_weight · NLL(new) + old_weight · P(old)`` from sequence log-probabilities, averaged over prompts.

    >>> round(float(memla_loss(torch.tensor([-1.0]), torch.tensor([-2.0]))), 4)       # 2.5·1 + 2·e^-2
    2.7707
    """
    return (nll_weight * -logp_new + old_weight * logp_old.exp()).mean()


def sequence_logprob(logits: Float[Tensor, "batch vocab"], q: Queries) -> Float[Tensor, "prompt"]:
    """log P of each prompt's whole target from the teacher-forced rows of ``q``: the sum over its tokens.

    >>> from knlens import load_model
    >>> m = load_model("tiny-gpt2")
    >>> q = encode(m, ["the capital of"], " paris is")
    >>> sequence_logprob(torch.zeros(len(q), m.cfg.d_vocab), q).shape
    torch.Size([1])
    """
    rows = torch.arange(len(q), device=logits.device)
    lp = logits.float().log_softmax(-1)[rows, q.target.to(logits.device)]
    out = torch.zeros(len(q.prompts), device=lp.device, dtype=lp.dtype)
    return out.index_add(0, q.prompt_index.to(lp.device), lp)


def _groups(model: Any, neurons: NeuronSet | Mapping[str, NeuronSet]) -> dict[str, NeuronSet]:
    groups = {"neurons": neurons} if isinstance(neurons, NeuronSet) else dict(neurons)
    for name, s in groups.items():
        s.check(model.cfg.n_layers, model.cfg.d_mlp)
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if groups[a] & groups[b]:
                raise SettingsError(f"MEMLA's neuron groups {a!r} and {b!r} share {sorted(groups[a] & groups[b])[:3]}; "
                                    f"each neuron belongs to one category")
    if not any(len(s) for s in groups.values()):
        raise NoOpEditError(f"no neurons to edit: MEMLA's groups {', '.join(groups) or '(none)'} are all empty")
    return groups


def _delta_hooks(parts: list[tuple[int, list[int], Tensor]]) -> list[Hook]:
    """Hooks adding ``hook_post[..., rows] @ Δ`` of every ``(layer, rows, Δ)`` part to its layer's MLP output:
    the forward of ``W_out`` with ``Δ`` added to those rows."""
    hooks: list[Hook] = []
    for layer in sorted({l for l, _, _ in parts}):
        mine = [(torch.tensor(rows), d) for l, rows, d in parts if l == layer]
        seen: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any = None, seen: dict[str, Tensor] = seen) -> None:
            seen["post"] = act

        def add(out: Tensor, hook: Any = None, seen: dict[str, Tensor] = seen,
                mine: list[tuple[Tensor, Tensor]] = mine) -> Tensor:
            post = seen.pop("post")
            for idx, d in mine:
                out = out + (post[..., idx.to(out.device)].to(d.dtype) @ d).to(out.dtype)
            return out
        hooks += [(hook_name(layer), keep), (hook_name(layer, "mlp.hook_out"), add)]
    return hooks


def _logps(model: Any, q_new: Queries, q_old: Queries, hooks: list[Hook]) -> tuple[Tensor, Tensor]:
    return (sequence_logprob(target_logits(model, q_new, hooks), q_new),
            sequence_logprob(target_logits(model, q_old, hooks), q_old))


def memla_edit(model: Any, fact: Fact, new_target: str, neurons: NeuronSet | Mapping[str, NeuronSet], *,
               prompt: int = 0, steps: int = 60, lr: float = 1e-3, nll_weight: float = NLL_WEIGHT,
               old_weight: float = OLD_WEIGHT, stop_p: float = STOP_P, commit: float = COMMIT,
               check_tol: float = 1e-3) -> Edit:
    """Rewrite ``fact.prompts[prompt]`` (old object ``fact.target``) to ``new_target`` on the value vectors of
    ``neurons``: one :class:`~knlens.core.neurons.NeuronSet`, or named disjoint groups (MEMLA's
    ``{"independent": LIKN, "specific": the edit language's own}``). See the module docstring; the model is not
    changed, apply the returned :class:`~knlens.methods.editing.edit.Edit`. ``params`` records the groups, the
    steps run, the loss and P(new) at the end of the optimisation (``p_new_full``, with the whole update) and
    with the committed share (``p_new``), and the full learned update per layer (``update``).
    """
    check_finite(lr=lr, nll_weight=nll_weight, old_weight=old_weight, stop_p=stop_p, commit=commit)
    if steps < 1:
        raise SettingsError(f"steps must be at least 1, got {steps}")
    if not 0.0 < commit <= 1.0:
        raise SettingsError(f"commit must be in (0, 1] (the share of the learned update written), got {commit}")
    if not 0 <= prompt < len(fact.prompts):
        raise SettingsError(f"prompt {prompt} outside the fact's {len(fact.prompts)} prompts")
    check_new_target(model, fact.target, new_target)
    groups = _groups(model, neurons)
    union = NeuronSet.union(groups.values())
    layers = dict(sorted(union.by_layer().items()))
    text = fact.prompts[prompt]
    q_new, q_old = encode(model, [text], new_target), encode(model, [text], fact.target)
    device = q_new.tokens.device
    # one trainable update per (category, layer), zero at the start; Adam keeps one parameter group per category
    parts = [(name, l, rows, torch.zeros(len(rows), model.cfg.d_model, device=device, requires_grad=True))
             for name, s in groups.items() for l, rows in sorted(s.by_layer().items())]
    opt = torch.optim.Adam([{"params": [d for g, _, _, d in parts if g == name], "name": name}
                            for name in groups if any(g == name for g, _, _, _ in parts)], lr=lr)
    hooks = _delta_hooks([(l, rows, d) for _, l, rows, d in parts])
    ran, loss_v, p_full = 0, float("nan"), float("nan")
    with torch.enable_grad():
        for ran in range(steps + 1):
            logp_new, logp_old = _logps(model, q_new, q_old, hooks)
            loss = memla_loss(logp_new, logp_old, nll_weight=nll_weight, old_weight=old_weight)
            loss_v, p_full = float(loss.detach()), float(logp_new.detach().exp().mean())
            if p_full > stop_p or ran == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    full = {l: torch.zeros(len(rows), model.cfg.d_model, dtype=torch.float64) for l, rows in layers.items()}
    for _, l, rows, d in parts:  # the layer's rows in sorted order, whatever the category
        full[l][[layers[l].index(r) for r in rows]] = d.detach().double().cpu()
    changes, committed = [], {}
    for l, rows in layers.items():
        slot = value_slot(model, l)
        v = value_vectors(model, slot, rows)
        new = (v.double().cpu() + commit * full[l]).to(v.dtype)
        committed[l] = (new.double() - v.double().cpu()).float()
        changes.append(slot_change(slot, rows, new))
    params = {"fact": fact.name or text, "prompt": text, "target_old": fact.target, "target_new": new_target,
              "groups": groups, "neurons": union, "steps": steps, "steps_run": ran, "lr": lr,
              "nll_weight": nll_weight, "old_weight": old_weight, "stop_p": stop_p, "commit": commit,
              "loss": loss_v, "p_new_full": p_full,
              "update": {str(l): full[l].float() for l in layers}}
    if all(not bool(d.any()) for d in full.values()):
        raise NoOpEditError(f"MEMLA made no update: P(new) = {p_full:.3g} > {stop_p} before any step")
    with torch.no_grad():
        hooks = _delta_hooks([(l, rows, committed[l].to(device)) for l, rows in layers.items()])
        hooked_p = float(_logps(model, q_new, q_old, hooks)[0].exp().mean())
    edit = make_edit(model, "memla", {**params, "p_new": hooked_p}, changes)
    with torch.no_grad(), edit.apply(model):
        written = float(_logps(model, q_new, q_old, [])[0].exp().mean())
    if abs(written - hooked_p) > check_tol * max(hooked_p, 1e-6) + 1e-7:
        raise EditModelError(f"MEMLA's committed rows give P(new) = {written:.6g} in a plain forward but "
                             f"{hooked_p:.6g} through the hooks it was optimised with: this architecture's "
                             f"blocks.l.mlp.hook_out is not hook_post · W_out")
    return edit
