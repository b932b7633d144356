"""Screened integrated gradients: a cheap first pass picks the layers worth integrating exactly, and a
check that does not rely on the screen bounds what the skipped layers could hold (docs/methods.md, screening).

Dai et al.'s selection keeps a prompt's neurons scoring at least ``t`` × its top score over *all* layers,
so a layer may be left out only if none of its neurons can reach that level. The steps, per call of
:func:`~knlens.attribute` (all prompts of a fact share their layers):

1. **screen** every layer (:class:`~knlens.methods.attribution.result.Screen`): ``"gradxact"`` is the
   gradient × (activation − baseline) at the clean point, one backward pass for all layers (integrated
   gradients with one node at α = 1); ``"gaussN"`` is integrated gradients on N Gauss–Legendre nodes;
2. **pick** the layers whose largest screened |score| is at least ``level / safety`` for some prompt, where
   ``level`` = min(``threshold`` × the prompt's top screened score, its ``top_k``-th screened score);
   the skipped layer closest to that cut is **verified**: integrated exactly too;
3. **integrate exactly** the picked and verified layers (same grid, adaptive refinement and engine as an
   unscreened call);
4. **check**, with the exact scores: ``ratio`` = the largest max|exact| / max|screened| over the exactly
   integrated layers (how far the screen underestimates a layer, measured where the truth is known);
   per prompt ``bound`` = ``ratio`` × the largest screened |score| in the skipped layers, ``level`` =
   min(``threshold`` × the top exact score, the ``top_k``-th exact score). ``bound < level`` for every
   prompt: the skipped layers hold no coarse neuron and none of the top ``top_k``, and the result keeps the
   exact layers only (``Attribution.layers``), with a :class:`ScreenCheck` saying what was left out;
5. otherwise every layer is integrated exactly, with a :class:`~knlens.core.errors.ScreenFallbackWarning`
   and ``settings.engine_note`` saying why (``ScreenCheck.fell_back``).

The bound assumes that no skipped layer is underestimated by the screen more than the worst layer
measured; the verified layer (the skipped one nearest the cut) is where that assumption is tested.

>>> from knlens import load_model, attribute
>>> model = load_model("tiny-llama")
>>> attrs = attribute(model, ["the capital of france is"], " paris", steps=8, screen="gradxact")
>>> attrs[0].screen.passed or attrs[0].screen.fell_back
True
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import ScreenFallbackWarning, SettingsError
from knlens.core.tokens import MultiToken, Queries, encode
from knlens.methods.attribution.baselines import Baseline, baseline_values
from knlens.methods.attribution.result import Attribution, Screen, ScreenCheck
from knlens.run.engine import Quantity, read_quantity, target_logits
from knlens.run.hooks import hook_name, position_mask
from knlens.run.placement import precision_and_place, resolve_dtype

__all__ = ["SCREENS", "get_screen", "grad_x_activation", "pick_layers", "check_screen", "screened"]

log = logging.getLogger("knlens.methods.attribution.ig")

SCREENS: tuple[str, ...] = ("gradxact", "gauss2", "gauss3", "gauss4")
Run = Callable[..., list[Attribution]]
"""``run(layers, **overrides)``: :func:`~knlens.attribute` of the call's prompts on ``layers`` (unscreened)."""


def get_screen(screen: Screen | str) -> Screen:
    """A :class:`Screen` from a method name (defaults otherwise), checked.

    >>> get_screen("gradxact").method, get_screen("gauss2").threshold
    ('gradxact', 0.2)
    """
    s = Screen(method=screen) if isinstance(screen, str) else screen
    if not isinstance(s, Screen) or s.method not in SCREENS:
        raise SettingsError(f"unknown screen {screen!r}; use one of {', '.join(map(repr, SCREENS))} or None")
    if not 0 < s.threshold <= 1 or s.top_k < 0 or not s.safety >= 1:
        raise SettingsError(f"a screen needs 0 < threshold <= 1, top_k >= 0 and safety >= 1, got {s}")
    return s


def _peaks(scores: Float[Tensor, "layer d"]) -> Float[Tensor, "layer"]:
    return scores.abs().amax(-1)


def _level(scores: Float[Tensor, "layer d"], screen: Screen) -> float:
    """min(threshold × the top score, the top_k-th score): what no left-out neuron may reach."""
    flat = scores.flatten()
    level = screen.threshold * float(flat.max())
    if screen.top_k:
        level = min(level, float(flat.topk(min(screen.top_k, flat.numel())).values[-1]))
    return level


def _row_gradxact(model: Any, row: Queries, names: list[str], baseline: Baseline,
                  quantity: Quantity) -> Float[Tensor, "layer d"]:
    """(a − b) · ∂f/∂a of one query row for every hook point, from one forward and one backward."""
    clean: dict[str, Tensor] = {}
    probes: dict[str, Tensor] = {}

    def probe(name: str) -> Callable[..., Tensor]:
        def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
            at = position_mask(act, row.position)
            clean[name] = act.detach()[at][0].float()
            probes[name] = torch.zeros(act.shape[-1], device=act.device, requires_grad=True)
            return torch.where(at[:, :, None], act + probes[name].to(act.dtype), act)
        return hook

    with torch.enable_grad():
        logits = target_logits(model, row, [(n, probe(n)) for n in names])
        f = read_quantity(logits, row.target, quantity)
        grads = torch.autograd.grad(f.sum(), [probes[n] for n in names])
    acts = torch.stack([clean[n] for n in names])
    return ((acts - baseline_values(baseline, model, row, names, acts)) * torch.stack(grads).float()).cpu()


def grad_x_activation(model: Any, prompts: Sequence[str], target: str, layers: Sequence[int], *,
                      hook_point: str = "hook_post", baseline: Baseline = "zero", quantity: Quantity = "prob",
                      multi_token: MultiToken = "teacher_forcing", token_reduce: str = "mean",
                      device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
                      ) -> list[Float[Tensor, "layer d"]]:
    """Gradient × (activation − baseline) at the clean point, one ``[layer, d]`` per prompt: integrated
    gradients with a single node at α = 1, for all ``layers`` from one backward pass per query row.

    >>> from knlens import load_model
    >>> [s.shape for s in grad_x_activation(load_model("tiny-llama"), ["the capital of france is"], " paris", [0, 1])]
    [torch.Size([2, 48])]
    """
    names = [hook_name(l, hook_point) for l in layers]
    q = encode(model, list(prompts), target, multi_token=multi_token)
    with precision_and_place(model, device, resolve_dtype(dtype)) as where:
        qd = q.to(where)
        base = baseline.to(where) if isinstance(baseline, Tensor) else baseline
        rows = [_row_gradxact(model, qd.row(i), names, base, quantity) for i in range(len(q))]
    out = []
    for p in range(len(prompts)):
        mine = torch.stack([rows[i] for i in (q.prompt_index == p).nonzero()[:, 0].tolist()])
        out.append(mine.mean(0) if token_reduce == "mean" else mine.sum(0))
    return out


def pick_layers(screens: Sequence[Float[Tensor, "layer d"]], layers: Sequence[int], screen: Screen
                ) -> tuple[list[int], list[int]]:
    """The layers to integrate exactly: those whose largest screened |score| reaches ``level / safety`` for
    some prompt (``kept``), and the skipped layer nearest that cut (``verified``, empty when none is skipped).

    >>> s = torch.tensor([[1.0, 0.0], [0.01, 0.0], [0.2, 0.1]])
    >>> pick_layers([s], [0, 1, 2], Screen(top_k=0, safety=4.0))
    ([0, 2], [1])
    """
    reach = torch.zeros(len(layers))
    for s in screens:
        level = _level(s, screen)
        if level <= 0:  # no positive evidence to cut at: every layer stays
            return list(layers), []
        reach = torch.maximum(reach, _peaks(s) / level)
    keep = reach >= 1 / screen.safety
    kept = [l for l, k in zip(layers, keep.tolist()) if k]
    if keep.all():
        return kept, []
    rest = (~keep).nonzero()[:, 0]
    return kept, [layers[int(rest[reach[rest].argmax()])]]


def check_screen(screens: Sequence[Float[Tensor, "layer d"]], exact: Sequence[Attribution], layers: Sequence[int],
                 kept: Sequence[int], verified: Sequence[int], screen: Screen) -> list[ScreenCheck]:
    """The guarantee of a screened integration checked against the exact scores (see the module docstring):
    one :class:`ScreenCheck` per prompt, ``passed`` when its bound is below its level."""
    row = {l: i for i, l in enumerate(layers)}
    done = list(exact[0].layers)
    skipped = tuple(l for l in layers if l not in set(done))
    ratio = 0.0
    for s, a in zip(screens, exact):
        e_peak, s_peak = _peaks(a.scores), _peaks(s[[row[l] for l in done]])
        r = torch.where(e_peak > 0, e_peak / s_peak, torch.zeros_like(e_peak))  # e > 0 = s: inf, the screen saw nothing
        ratio = max(ratio, float(r.max()))
    out = []
    for s, a in zip(screens, exact):
        sigma = float(_peaks(s[[row[l] for l in skipped]]).max()) if skipped else 0.0
        bound = ratio * sigma if sigma > 0 else 0.0
        level = _level(a.scores, screen)
        passed = not skipped or (float(a.scores.max()) > 0 and bound < level)
        out.append(ScreenCheck(method=screen.method, kept=tuple(kept), verified=tuple(verified), skipped=skipped,
                               ratio=ratio, bound=bound, level=level, passed=passed, fell_back=False))
    return out


def _first_pass(model: Any, prompts: Sequence[str], target: str, screen: Screen, layers: list[int], run: Run,
                **kw: Any) -> list[Float[Tensor, "layer d"]]:
    if screen.method == "gradxact":
        return grad_x_activation(model, prompts, target, layers, **kw)
    nodes = int(screen.method.removeprefix("gauss"))
    return [a.scores for a in run(layers, steps=nodes, grid="gauss-legendre", tolerance=None)]


def screened(model: Any, prompts: Sequence[str], target: str, screen: Screen, layers: list[int], run: Run,
             **kw: Any) -> list[Attribution]:
    """Attributions of ``prompts`` by screened integration (steps 1–5 of the module docstring); ``run`` is the
    unscreened :func:`~knlens.attribute` of the call, ``kw`` the keywords of :func:`grad_x_activation`."""
    screens = _first_pass(model, prompts, target, screen, layers, run, **kw)
    kept, verified = pick_layers(screens, layers, screen)
    exact = run(sorted([*kept, *verified]))
    checks = check_screen(screens, exact, layers, kept, verified, screen)
    failed = [(p, c) for p, c in zip(prompts, checks) if not c.passed]
    note = ""
    if failed:
        p, c = failed[0]
        note = (f"screen {screen.method} -> all layers: on {len(failed)} of {len(prompts)} prompts the skipped "
                f"layers {list(c.skipped)} may reach the level (e.g. {p!r}: bound {c.bound:.3g} = measured ratio "
                f"{c.ratio:.3g} x screened {c.bound / c.ratio if c.ratio else 0:.3g}, level {c.level:.3g})")
        warnings.warn(f"integrated gradients: {note}", ScreenFallbackWarning, stacklevel=4)
        log.warning("%s", note)
        exact = run(layers)
        checks = [dataclasses.replace(c, fell_back=True) for c in checks]
    out = []
    for a, c in zip(exact, checks):
        joined = "; ".join(x for x in (a.settings.engine_note, note) if x)
        out.append(dataclasses.replace(a, screen=c, settings=dataclasses.replace(a.settings, screen=screen,
                                                                                engine_note=joined)))
    return out
