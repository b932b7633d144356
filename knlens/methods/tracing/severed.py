"""Causal tracing with a path severed (Meng et al., 2022; docs/methods.md, severed paths): restore one clean
residual state ``(layer l, token t)`` in the corrupted run while the MLP (or the attention) outputs at token ``t`` in
the layers above ``l`` stay frozen at their values in the corrupted run. What the restored state still does then
goes around the severed path; the drop against the unsevered effect is what goes through it.

:func:`severed_restore` is the general instrument: any set of clean residual states restored and any set of MLP /
attention outputs frozen (from the corrupted run, per noise sample). :func:`severed_trace` runs every layer at one
token for the three graphs (``"none"``, ``"mlp"``, ``"attn"`` severed) as rows of batched forwards, and checks
two rows against plain forwards first (restoring nothing must give P_corrupted, restoring the last layer's
residual at the read-out position P_clean); when they disagree every row is rerun as one plain forward, with a
warning. The batched rows unembed the read-out position only (the forward stops at the final norm): the logits of
every position would cost more than the blocks.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> s = severed_trace(model, "the capital of france is", " paris", subject="france", samples=2, known_only=False)
>>> s.effects["mlp"].shape, s.token, s.settings["engine"]
(torch.Size([2]), 4, 'batched')
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from knlens.core.errors import EngineFallbackWarning, TracingSettingError
from knlens.methods.tracing.corruption import EMBED_HOOK, Corruption, corruption_hook
from knlens.methods.tracing.setup import (KIND_POINTS, TraceSetup, as_corruption, clean_cache, prepare,
                                          require_known, resolve_prompt, restore_hooks, run_rows)
from knlens.run.engine import Quantity, chunks, forward, forward_until, read_quantity
from knlens.run.hooks import Hook, capture, hook_name
from knlens.run.staircase import FINAL_NORM_IN, disagreement, model_tail

__all__ = ["SEVERS", "Severed", "severed_restore", "severed_trace"]

SEVERS: tuple[str, ...] = ("none", "mlp", "attn")


@torch.no_grad()
def _corrupted_states(model: Any, setup: TraceSetup, kinds: Sequence[str]) -> dict[str, Tensor]:
    """``[sample, layer, pos, d]`` per kind: the outputs of the corrupted run, one per noise sample."""
    k = setup.corruption.samples
    store: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    hooks = [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values, setup.positions, torch.arange(k)))]
    hooks += [(hook_name(l, KIND_POINTS[kind]), capture(store[kind])) for kind in kinds
              for l in range(model.cfg.n_layers)]
    forward(model, setup.tokens.expand(k, -1), hooks)
    return {kind: torch.stack(v, 1) for kind, v in store.items()}


def _freeze(values: Float[Tensor, "sample pos d"], mask: Bool[Tensor, "rows pos"], sample: Tensor):
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        src = values.to(act.device, act.dtype)[sample.to(act.device)]
        return torch.where(mask.to(act.device)[:, :, None], src, act)
    return hook


def _read_logits(model: Any, tokens: Tensor, hooks: list[Hook], position: int, tail: bool) -> Tensor:
    """Logits at ``position``: with ``tail``, the final norm and unembedding of that position only (a
    forward stops at the final norm's input), else a plain whole-prompt forward's."""
    final = model_tail(model) if tail else None
    if final is None:
        return forward(model, tokens, hooks)[:, position]
    return final(forward_until(model, tokens, FINAL_NORM_IN, hooks)[:, position, None])[:, 0]


def _rows(model: Any, setup: TraceSetup, restored: Bool[Tensor, "rows layer pos"],
          frozen: Mapping[str, Bool[Tensor, "rows layer pos"]], clean: Mapping[str, Tensor],
          corrupted: Mapping[str, Tensor], quantity: Quantity, batch_size: int, tail: bool = True
          ) -> Float[Tensor, "rows"]:
    """P of each row (its restored residual states and frozen outputs), averaged over the noise samples;
    ``tail`` unembeds the read-out position only (checked by :func:`severed_trace`)."""
    k, n_layers = setup.corruption.samples, model.cfg.n_layers
    out = []
    for s in chunks(restored.shape[0], max(1, batch_size // k)):
        rows = restored[s].shape[0]
        sample = torch.arange(k).repeat(rows)
        hooks: list[Hook] = [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values, setup.positions, sample))]
        hooks += restore_hooks(clean, {"resid": restored[s].repeat_interleave(k, 0)}, n_layers)
        for kind, m in frozen.items():
            rep = m[s].repeat_interleave(k, 0)
            hooks += [(hook_name(l, KIND_POINTS[kind]), _freeze(corrupted[kind][:, l], rep[:, l], sample))
                      for l in range(n_layers) if bool(rep[:, l].any())]
        logits = _read_logits(model, setup.tokens.expand(rows * k, -1), hooks, setup.position, tail)
        p = read_quantity(logits, torch.full((rows * k,), setup.target, device=logits.device), quantity).cpu()
        out.append(p.view(rows, k).mean(1))
    return torch.cat(out)


@torch.no_grad()
def severed_restore(model: Any, fact_or_prompt: Any, target: str | None = None, *,
                    restored: Bool[Tensor, "layer pos"] | None = None,
                    frozen: Mapping[str, Bool[Tensor, "layer pos"]] | None = None,
                    corruption: str | Corruption = "noise", corrupt: str | Sequence[int] = "subject",
                    subject: str | None = None, quantity: Quantity = "prob") -> float:
    """P(target) of the corrupted run with the clean residual states ``restored`` (``[layer, pos]``) copied back
    and the outputs ``frozen[kind]`` (``"mlp"``/``"attn"``, ``[layer, pos]``) held at the corrupted run's values.

    >>> from knlens import load_model
    >>> import torch
    >>> model = load_model("tiny-llama")
    >>> everything = {k: torch.ones(2, 6, dtype=torch.bool) for k in ("mlp", "attn")}
    >>> at_subject = torch.zeros(2, 6, dtype=torch.bool); at_subject[0, 4] = True
    >>> p = severed_restore(model, "the capital of france is", " paris", subject="france", restored=at_subject,
    ...                     frozen=everything)
    >>> abs(p - severed_restore(model, "the capital of france is", " paris", subject="france")) < 1e-6
    True
    """
    prompt, target, subject = resolve_prompt(fact_or_prompt, target, subject, 0)
    setup = prepare(model, prompt, target, as_corruption(corruption), corrupt, subject, None)
    shape = (model.cfg.n_layers, setup.tokens.shape[1])
    restored = torch.zeros(shape, dtype=torch.bool) if restored is None else restored.bool()
    frozen = dict(frozen or {})
    for name, m in {"restored": restored, **frozen}.items():
        if name not in ("restored", "mlp", "attn"):
            raise TracingSettingError(f"only 'mlp' and 'attn' outputs can be frozen, got {name!r}")
        if tuple(m.shape) != shape:
            raise TracingSettingError(f"{name} has shape {tuple(m.shape)}, expected {list(shape)}")
    clean = clean_cache(model, setup, ["resid"])[1]
    corrupted = _corrupted_states(model, setup, list(frozen))
    return float(_rows(model, setup, restored[None], {k: m.bool()[None] for k, m in frozen.items()}, clean,
                       corrupted, quantity, 1, tail=False)[0])


@dataclass(frozen=True, eq=False)
class Severed:
    """Indirect effects (P_restored − P_corrupted) of restoring the residual at ``token`` in each layer, per graph:
    ``effects["none"]`` the plain trace, ``effects["mlp"]`` / ``effects["attn"]`` with that path severed."""

    prompt: str
    target: str
    token: int
    effects: dict[str, Float[Tensor, "layer"]]
    p_clean: float
    p_corrupted: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (sever, layer): ``effect``."""
        return pd.DataFrame([{"sever": s, "layer": l, "effect": float(e)} for s, eff in self.effects.items()
                             for l, e in enumerate(eff)])


@torch.no_grad()
def severed_trace(model: Any, fact_or_prompt: Any, target: str | None = None, *, token: int | None = None,
                  severs: Sequence[str] = SEVERS, corruption: str | Corruption = "noise",
                  corrupt: str | Sequence[int] = "subject", subject: str | None = None, samples: int | None = None,
                  seed: int | None = None, quantity: Quantity = "prob", batch_size: int = 64,
                  known_only: bool = True) -> Severed:
    """The residual state at ``token`` (default: the last corrupted token) restored in each layer ``l``, with the
    MLP or attention outputs at ``token`` in layers ``l+1..`` frozen at the corrupted run (see the module)."""
    prompt, target, subject = resolve_prompt(fact_or_prompt, target, subject, 0)
    bad = [s for s in severs if s not in SEVERS]
    if bad or not severs:
        raise TracingSettingError(f"unknown sever(s) {bad or list(severs)}; use some of {SEVERS}")
    corruption = as_corruption(corruption)
    overrides = {k: v for k, v in {"samples": samples, "seed": seed}.items() if v is not None}
    if overrides:
        corruption = replace(corruption, **overrides)
    setup = prepare(model, prompt, target, corruption, corrupt, subject, None)
    n_layers, n_pos = model.cfg.n_layers, setup.tokens.shape[1]
    t = max(setup.positions) if token is None else int(token) % n_pos
    clean_logits, clean = clean_cache(model, setup, ["resid"])
    if known_only:
        require_known(model, setup, prompt, clean_logits)
    p_clean = float(read_quantity(clean_logits[None], torch.tensor([setup.target]), quantity)[0])
    kinds = [s for s in severs if s != "none"]
    corrupted = _corrupted_states(model, setup, kinds)
    cells = [(s, l) for s in severs for l in range(n_layers)]
    restored = torch.zeros(len(cells) + 2, n_layers, n_pos, dtype=torch.bool)
    frozen = {kind: torch.zeros_like(restored) for kind in kinds}
    for r, (s, l) in enumerate(cells):
        restored[r, l, t] = True
        if s != "none":
            frozen[s][r, l + 1:, t] = True
    restored[-1, -1, setup.position] = True  # check rows: [-2] nothing restored, [-1] the final residual
    p_corr = float(run_rows(model, setup, {}, clean, quantity)[0])  # the plain corrupted run
    p = _rows(model, setup, restored, frozen, clean, corrupted, quantity, batch_size)
    engine, note = "batched", ""
    why = disagreement(p[-2:], torch.tensor([p_corr, p_clean]), "P_corrupted and P_clean as batch rows")
    if why:
        engine, note = "reference", f"batched -> reference: {why}"
        warnings.warn(f"severed tracing: batched rows disagree with plain forwards ({why}); running one forward per "
                      f"row instead", EngineFallbackWarning, stacklevel=2)
        p = _rows(model, setup, restored, frozen, clean, corrupted, quantity, 1, tail=False)
    effects = {s: torch.tensor([float(p[r]) - p_corr for r, (s2, _) in enumerate(cells) if s2 == s]) for s in severs}
    settings = {"model": getattr(model.cfg, "model_name", "?"), "corrupt": corrupt if isinstance(corrupt, str)
                else "positions", "corruption": corruption.describe(model), "token": t, "quantity": quantity,
                "engine": engine, "engine_note": note, "frozen": "outputs at the restored token in the layers above",
                "samples": corruption.samples}
    return Severed(prompt, target, t, effects, p_clean, p_corr, settings)
