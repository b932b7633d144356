"""Attention versus MLP at the neuron level (Chen et al., ICLR 2025): how much of a neuron's activation at
the last token arrives through attention.

* :func:`attention_patch` — patch attention outputs at the last token from a paraphrase or a corrupted
  run and measure the neurons' activations and P(target) (:class:`AttentionPatch`);
* :func:`synapse_scaling` — scale the attention weights on the most-attended positions ("knowledge
  synapses", :func:`attended_positions`) by α with :func:`scale_attention`, random other positions as
  control and the attention mass of both recorded.

>>> import torch
>>> pat = torch.tensor([[[[0.5, 0.25, 0.25]]]])          # [batch, head, query, key]
>>> torch.equal(scale_attention(1.0, [1])(pat, None), pat)   # α = 1 changes nothing, bit for bit
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from knlens.core.errors import PromptError, SelectionError, SettingsError
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.methods.attention_results import AttentionPatch, AttentionPatchSettings, SynapseScaling, SynapseSettings
from knlens.methods.tracing.corruption import EMBED_HOOK, Corruption, corruption_hook
from knlens.methods.tracing.spans import prefix_tokens, subject_token_span
from knlens.run.engine import Quantity, forward, read_quantity
from knlens.run.hooks import Hook, HookFn, hook_name

__all__ = ["AttentionPatch", "AttentionPatchSettings", "attention_patch", "scale_attention", "attended_positions",
           "SynapseScaling", "SynapseSettings", "synapse_scaling"]


def _neuron_reads(neurons: NeuronSet, position: int, store: dict[int, list[Tensor]]) -> list[Hook]:
    hooks = []
    for layer, idx in sorted(neurons.by_layer().items()):
        ix = torch.tensor(idx)

        def save(act: Tensor, hook: Any = None, layer: int = layer, ix: Tensor = ix) -> None:
            store[layer].append(act[:, position, ix.to(act.device)].detach().float().cpu())
        hooks.append((hook_name(layer, "hook_post"), save))
    return hooks


def _gather(neurons: NeuronSet, store: dict[int, list[Tensor]]) -> Tensor:
    """``[batch, neuron]`` activations in the order of ``neurons``' by_layer listing."""
    by = sorted(neurons.by_layer().items())
    return torch.cat([store[layer][0] for layer, _ in by], dim=1) if by else torch.zeros(0, 0)


def _ordered(neurons: NeuronSet) -> list[tuple[int, int]]:
    return [(layer, i) for layer, idx in sorted(neurons.by_layer().items()) for i in idx]


def _read_run(model: Any, tokens: Tensor, position: int, target: int, neurons: NeuronSet,
              hooks: list[Hook], quantity: Quantity = "prob") -> tuple[Tensor, Tensor]:
    """The target's ``quantity`` ``[batch]`` and the neurons' activations ``[batch, neuron]`` at ``position``."""
    store: dict[int, list[Tensor]] = {layer: [] for layer in neurons.by_layer()}
    logits = forward(model, tokens, [*hooks, *_neuron_reads(neurons, position, store)])[:, position]
    target_row = torch.full((logits.shape[0],), target, device=logits.device)
    return read_quantity(logits, target_row, quantity).cpu(), _gather(neurons, store)


def _single(model: Any, prompt: str, target: str) -> tuple[Tensor, int, int]:
    row = encode(model, [prompt], target).row(0)
    return row.tokens, int(row.position[0]), int(row.target[0])


def _source_attention(model: Any, tokens: Tensor, position: int, layers: Sequence[int], hook_point: str,
                      hooks: list[Hook]) -> dict[int, Tensor]:
    store: dict[int, Tensor] = {}
    saves = []
    for layer in layers:
        def save(act: Tensor, hook: Any = None, layer: int = layer) -> None:
            store[layer] = act[:, position].detach().float().mean(0)  # mean over noise samples
        saves.append((hook_name(layer, hook_point), save))
    forward(model, tokens, [*hooks, *saves])
    return store


@torch.no_grad()
def attention_patch(model: Any, prompt: str, target: str, neurons: NeuronSet, *,
                    source: str | Corruption, subject: str | None = None, layers: Sequence[int] | None = None,
                    hook_point: Literal["hook_attn_out", "attn.hook_z"] = "hook_attn_out",
                    heads: Sequence[int] | None = None) -> AttentionPatch:
    """How much of the neurons' activation at the last token is carried by attention.

    The attention output at the last token of ``prompt`` (``hook_attn_out``, or ``attn.hook_z`` with
    ``heads`` to patch single heads) is replaced by its value in a *source* run: another prompt (a
    paraphrase; its own last token) or the same prompt under a :class:`~knlens.methods.tracing.trace.Corruption` of
    ``subject``. Row "clean" is unpatched; one row per layer in ``layers`` (default: every layer up to
    the neurons' deepest layer), and row "all" patches all of them at once. Every row runs in one batch.

    >>> from knlens import load_model, NeuronSet
    >>> model = load_model("tiny-llama")
    >>> r = attention_patch(model, "the capital of france is", " paris", NeuronSet([(1, 3)]),
    ...                     source="the capital city of france is")
    >>> r.probs["patched"].tolist()
    ['0', '1', 'all']
    """
    if hook_point not in ("hook_attn_out", "attn.hook_z"):
        raise SettingsError(f"hook_point must be 'hook_attn_out' or 'attn.hook_z', got {hook_point!r}")
    if heads is not None and hook_point != "attn.hook_z":
        raise SettingsError("patching single heads needs hook_point='attn.hook_z'")
    if not len(neurons):
        raise SelectionError("attention_patch needs at least one neuron")
    neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    tokens, pos, tgt = _single(model, prompt, target)
    deepest = max(neurons.layers)
    layer_list = list(range(deepest + 1)) if layers is None else sorted(int(l) for l in layers)
    if isinstance(source, Corruption):
        if subject is None:
            raise PromptError("a corrupted source needs the subject")
        span = subject_token_span(model, prompt, subject)
        positions = list(range(*span))
        vals = source.values(model, positions)
        k = source.samples
        chook = corruption_hook(source, vals, positions, torch.arange(k))
        src = _source_attention(model, tokens.expand(k, -1), pos, layer_list, hook_point, [(EMBED_HOOK, chook)])
        src_desc: Any = source.describe(model)
    else:
        s_tokens, s_pos, s_tgt = _single(model, source, target)
        src = _source_attention(model, s_tokens, s_pos, layer_list, hook_point, [])
        src_desc = source
    configs = [[l] for l in layer_list] + [layer_list]
    labels = [str(l) for l in layer_list] + ["all"]
    n_rows = 1 + len(configs)
    hooks = []
    for layer in layer_list:
        rows = torch.tensor([False] + [layer in c for c in configs])
        value = src[layer]

        def patch(act: Tensor, hook: Any = None, rows: Tensor = rows, value: Tensor = value) -> Tensor:
            out = act.clone()
            r = rows.to(act.device)
            v = value.to(act.device, act.dtype)
            if heads is None:
                out[r, pos] = v
            else:
                h = torch.tensor(list(heads), device=act.device)
                sub = out[r, pos]
                sub[:, h] = v[h]
                out[r, pos] = sub
            return out
        hooks.append((hook_name(layer, hook_point), patch))
    p, acts = _read_run(model, tokens.expand(n_rows, -1), pos, tgt, neurons, hooks)
    order = _ordered(neurons)
    recs, prec = [], []
    for r, label in enumerate(labels, start=1):
        prec.append({"patched": label, "p_clean": float(p[0]), "p_patched": float(p[r])})
        for j, (layer, idx) in enumerate(order):
            a0, a1 = float(acts[0, j]), float(acts[r, j])
            recs.append({"patched": label, "layer": layer, "neuron": idx, "act_clean": a0, "act_patched": a1,
                         "change": a1 - a0, "relative": (a1 - a0) / abs(a0) if a0 != 0 else float("nan")})
    settings = AttentionPatchSettings(prompt, target, src_desc, neurons, hook_point,
                                      tuple(int(h) for h in heads) if heads is not None else None,
                                      tuple(layer_list))
    return AttentionPatch(pd.DataFrame(recs), pd.DataFrame(prec), settings)


def scale_attention(alpha: float | Float[Tensor, "batch"], keys: Bool[Tensor, "batch key"] | Sequence[int],
                    query: int = -1, heads: Sequence[int] | None = None) -> HookFn:
    """Hook for ``blocks.{l}.attn.hook_pattern``: multiply the attention weights from ``query`` to
    ``keys`` by α and renormalise the row to its original sum.

    ``alpha`` is a scalar or one value per batch row; ``keys`` positions (shared) or a ``[batch, key]``
    mask. With α = 1 the pattern is returned unchanged (bit for bit).

    >>> import torch
    >>> pat = torch.tensor([[[[0.5, 0.25, 0.25]]]])          # [batch, head, query, key]
    >>> [round(x, 4) for x in scale_attention(3.0, [1])(pat, None)[0, 0, 0].tolist()]   # renormalised
    [0.3333, 0.5, 0.1667]
    """
    def hook(act: Float[Tensor, "batch head q k"], hook: Any = None) -> Float[Tensor, "batch head q k"]:
        b, h, nq, nk = act.shape
        a = torch.as_tensor(alpha, dtype=act.dtype, device=act.device)
        a = a.expand(b) if a.ndim == 0 else a
        if isinstance(keys, Tensor) and keys.dtype == torch.bool:
            km = keys.to(act.device)
        else:
            km = torch.zeros(b, nk, dtype=torch.bool, device=act.device)
            km[:, [int(k) for k in keys]] = True
        hm = torch.ones(h, dtype=torch.bool, device=act.device)
        if heads is not None:
            hm = torch.zeros(h, dtype=torch.bool, device=act.device)
            hm[list(heads)] = True
        qi = query % nq
        row = act[:, :, qi, :]  # [b, h, k]
        sel = (km[:, None, :] & hm[None, :, None]).to(act.dtype)
        extra = (a - 1)[:, None, None] * row * sel  # exactly 0 where α = 1
        new_row = (row + extra) / (1 + extra.sum(-1, keepdim=True))
        out = act.clone()
        out[:, :, qi, :] = new_row
        return out
    return hook


def _attention_from(model: Any, tokens: Tensor, query: int, layers: Sequence[int]) -> Float[Tensor, "key"]:
    """Attention weight from position ``query`` to every position, mean over heads and ``layers``."""
    store: list[Tensor] = []
    saves = [(hook_name(l, "attn.hook_pattern"),
              lambda act, hook: store.append(act[0, :, query].detach().float().mean(0).cpu())) for l in layers]
    with torch.no_grad():
        forward(model, tokens[:1], saves)
    return torch.stack(store).mean(0)


def attended_positions(model: Any, prompt: str, *, k: int = 1, layers: Sequence[int] | None = None,
                       exclude_bos: bool = True, n_controls: int = 1, seed: int = 0
                       ) -> tuple[list[int], list[list[int]]]:
    """The ``k`` positions the last token attends to most (mean over heads and ``layers``: the "knowledge
    synapses"), and ``n_controls`` random draws of ``k`` other positions (the control; uniform among the
    positions that are not top, so they are neither chosen for low nor for high attention). BOS (with
    ``exclude_bos``) and the last token itself are never candidates.

    >>> from knlens import load_model
    >>> top, controls = attended_positions(load_model("tiny-gpt2"), "the capital of france is", n_controls=2)
    >>> len(top), [len(c) for c in controls], any(set(top) & set(c) for c in controls)
    (1, [1, 1], False)
    """
    tokens = model.to_tokens(prompt)
    n = tokens.shape[1]
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    mean = _attention_from(model, tokens, n - 1, layer_list)
    _, n_pre = prefix_tokens(model, prompt)
    cand = list(range(n_pre if exclude_bos else 0, n - 1))
    if len(cand) < k + 1 or k < 1:
        raise PromptError(f"{prompt!r} has {len(cand)} candidate positions; k = {k} synapses need at least "
                          f"{k + 1} (one left for the control)")
    ranked = sorted(cand, key=lambda p: float(mean[p]), reverse=True)
    top, rest = sorted(ranked[:k]), ranked[k:]
    gen = torch.Generator().manual_seed(seed)
    controls = [sorted(rest[int(i)] for i in torch.randperm(len(rest), generator=gen)[:k]) for _ in range(n_controls)]
    return top, controls


@torch.no_grad()
def synapse_scaling(model: Any, prompt: str, target: str, neurons: NeuronSet, *,
                    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0), k: int = 1,
                    layers: Sequence[int] | None = None, n_controls: int = 5, seed: int = 0) -> SynapseScaling:
    """Scale the last token's attention to its ``k`` most-attended positions ("knowledge synapses") by each
    α in every layer of ``layers`` (default all), and, as control, to ``n_controls`` random draws of ``k``
    other positions (:func:`attended_positions`).

    Returns a :class:`SynapseScaling`; its ``frame`` has one row per (group, draw, α): ``group``
    (``synapse``/``control``), ``draw``, ``alpha``, ``positions``, ``mass`` (the positions' clean attention
    weight from the last token, mean over heads and ``layers``: scaling by α moves about ``|α − 1|·mass`` of
    attention), ``p_target``, ``relative_p`` and the mean (absolute) relative change of the neurons'
    activations at the last token. All rows run as one batch.

    >>> from knlens import load_model, NeuronSet
    >>> r = synapse_scaling(load_model("tiny-gpt2"), "the capital of france is", " paris", NeuronSet([(1, 3)]),
    ...                     alphas=(0.0, 1.0), n_controls=2)
    >>> r.frame.groupby("group").size().to_dict()
    {'control': 4, 'synapse': 2}
    """
    tokens, pos, tgt = _single(model, prompt, target)
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    top, controls = attended_positions(model, prompt, k=k, layers=layer_list, n_controls=n_controls, seed=seed)
    weight = _attention_from(model, tokens, pos, layer_list)
    groups = [("synapse", 0, top)] + [("control", d, c) for d, c in enumerate(controls)]
    alphas = tuple(float(a) for a in alphas)
    configs = [(g, d, a, ps) for g, d, ps in groups for a in alphas]
    n_rows = 1 + len(configs)
    alpha_t = torch.tensor([1.0] + [a for _, _, a, _ in configs])
    km = torch.zeros(n_rows, tokens.shape[1], dtype=torch.bool)
    for r, (_, _, _, ps) in enumerate(configs, start=1):
        km[r, ps] = True
    hooks = [(hook_name(l, "attn.hook_pattern"), scale_attention(alpha_t, km, query=pos)) for l in layer_list]
    p, acts = _read_run(model, tokens.expand(n_rows, -1), pos, tgt, neurons, hooks)
    rows = []
    for r, (group, d, a, ps) in enumerate(configs, start=1):
        rel = ((acts[r] - acts[0]) / acts[0].abs().clamp_min(1e-12)) if acts.numel() else torch.zeros(0)
        rows.append({"group": group, "draw": d, "alpha": a, "positions": ps, "mass": float(weight[ps].sum()),
                     "p_clean": float(p[0]), "p_target": float(p[r]),
                     "relative_p": float((p[r] - p[0]) / p[0]) if float(p[0]) > 0 else float("nan"),
                     "activation_relative": float(rel.mean()) if rel.numel() else float("nan"),
                     "activation_abs_relative": float(rel.abs().mean()) if rel.numel() else float("nan")})
    settings = SynapseSettings(neurons, alphas, k, None if layers is None else tuple(int(l) for l in layers),
                               n_controls, seed)
    return SynapseScaling(prompt, target, pd.DataFrame(rows), settings)
