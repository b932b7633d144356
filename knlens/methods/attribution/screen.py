"""Screened integrated gradients: a cheap first pass picks the layers worth integrating exactly, and a
check against exact numbers bounds what the layers left out could hold (docs/methods.md, screening).

Dai et al.'s selection keeps a prompt's neurons scoring at least ``t`` × its top score over *all* layers,
and refines those coarse in enough prompts, so a layer may be left out only if none of its neurons could
change that. For the prompts of one fact (they share their layers; :func:`~knlens.attribute_facts` screens
each of its facts on its own, in batches):

1. **screen** every layer with a :class:`~knlens.methods.attribution.result.Screen`: ``"gradxact"``
   (integrated gradients on one node at α = 1, i.e. gradient × (activation − baseline) at the clean point)
   or ``"gaussN"`` (N Gauss–Legendre nodes), on the engine asked for, with its α = 0 cell, which gives
   each layer's exact effect Δ = f(a) − f(baseline);
2. **bound** each neuron ``i`` of layer ``l`` by ``B_i = S_i + e · s + |r|``: ``S_i`` its screened score,
   ``s`` the layer's largest |screened score|, ``e`` the screen's error relative to it, and
   ``r = Δ − Σ screened`` the effect the layer's screened scores leave unexplained (a quadrature that misses
   a sharp change along the path leaves it there: SmolLM2's layer 0, whose top neuron outscores every other
   layer, is screened at 3 % of it);
3. **pick** with ``e = safety − 1``: a layer stays when a neuron's bound reaches its prompt's top screened
   score, or ``t`` × that top in ``min_count`` prompts, or the ``top_k``-th mean screened score by its mean;
   the left-out layer nearest that cut is **verified** (integrated exactly as well);
4. **integrate exactly** the picked and verified layers (same grid, adaptive refinement and engine as an
   unscreened call), and **check** with ``e = beta``, the screen's error beyond ``|r|`` measured on every
   exactly integrated layer, against the exact top scores and the exact ``top_k``-th mean. When it holds,
   each prompt's top score is in the exact layers, no left-out neuron is coarse in ``min_count`` prompts or
   in the top ``top_k`` by mean, so the refined neurons (for any ``p`` that demands ``min_count`` prompts or
   more) and that top ``k`` equal those of every layer. When it fails, the layers are **picked again** once
   with ``e = beta`` (keeping those integrated), integrated exactly and checked (``rounds = 2``);
5. if that fails too, every layer is integrated exactly, with a
   :class:`~knlens.core.errors.ScreenFallbackWarning` and ``settings.engine_note`` saying why
   (:attr:`ScreenCheck.fell_back`).

Several facts share their passes as an unscreened call's do (:mod:`.cells`): the screen of every fact is one
call, each exact pass one call per set of picked layers (the facts that picked the same layers together), the
fallback one call for every fact whose checks failed; all of them reuse the screen's clean passes
(:func:`~knlens.methods.attribution.cells.shared_clean_passes`).

The check rests on one assumption, stated here rather than hidden: a left-out layer's error beyond its
unexplained effect is no larger, relative to its screened scores, than the largest measured on the exact
layers; the verified layer, the left-out one nearest the cut, is where it is tested.

>>> from knlens import load_model, attribute
>>> model = load_model("tiny-llama")
>>> attrs = attribute(model, ["the capital of france is"], " paris", steps=8, screen="gauss2")
>>> c = attrs[0].screen
>>> sorted([*c.kept, *c.verified, *c.skipped]), c.passed or c.fell_back
([0, 1], True)
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import ScreenFallbackWarning, SettingsError
from knlens.methods.attribution.result import Attribution, Screen, ScreenCheck

__all__ = ["SCREENS", "get_screen", "first_pass", "pick_layers", "needed_layers", "check_screen", "screened",
           "describe_screen"]

log = logging.getLogger("knlens.methods.attribution.ig")

SCREENS: tuple[str, ...] = ("gradxact", "gauss2", "gauss3", "gauss4")
Run = Callable[..., list[list[Attribution]]]
"""``run(items, layers, **overrides)``: the unscreened attributions of the call's facts ``items`` (their
indices) on ``layers``, one list per fact (:func:`~knlens.attribute_facts` of those facts on those layers)."""


def get_screen(screen: Screen | str) -> Screen:
    """A :class:`Screen` from a method name (defaults otherwise), checked.

    >>> get_screen("gradxact").method, get_screen("gauss2").min_count
    ('gradxact', 3)
    """
    s = Screen(method=screen) if isinstance(screen, str) else screen
    if not isinstance(s, Screen) or s.method not in SCREENS:
        raise SettingsError(f"unknown screen {screen!r}; use one of {', '.join(map(repr, SCREENS))} or None")
    if not 0 < s.threshold <= 1 or s.min_count < 1 or s.top_k < 0 or not s.safety >= 1:
        raise SettingsError(f"a screen needs 0 < threshold <= 1, min_count >= 1, top_k >= 0 and safety >= 1, got {s}")
    return s


def first_pass(screen: Screen, layers: list[int], run: Run, items: list[int]) -> list[list[Attribution]]:
    """The screen's attributions of every layer of facts ``items``: one node at α = 1 (``gradxact``) or N
    Gauss–Legendre nodes."""
    grid, steps = ("right", 1) if screen.method == "gradxact" else ("gauss-legendre", int(screen.method[5:]))
    return run(items, layers, steps=steps, grid=grid, tolerance=None)


def _kth_mean(scores: Sequence[Float[Tensor, "layer d"]], k: int) -> float:
    mean = torch.stack(list(scores)).mean(0).flatten()
    return float(mean.topk(min(k, mean.numel())).values[-1])


def _upper(first: Sequence[Attribution], error: float) -> Float[Tensor, "prompt layer d"]:
    """Upper bounds of every neuron's exact score, per prompt: its screened score + ``error`` × its layer's
    largest |screened score| + |its layer's unexplained effect Δ − Σ screened|."""
    s = torch.stack([a.scores for a in first])
    r = torch.stack([(a.delta - a.scores.sum(-1)).abs() for a in first])
    return s + (error * s.abs().amax(-1) + r)[..., None]


def _closeness(upper: Float[Tensor, "prompt layer d"], top: Float[Tensor, "prompt"], kth_mean: float,
               screen: Screen) -> Float[Tensor, "layer"]:
    """How near each layer comes to holding a neuron that matters (≥ 1: it may), from its neurons' bounds:
    over a prompt's top score, over the coarse level in the neuron's ``min_count``-th prompt, or their mean
    over the ``top_k``-th mean."""
    near = (upper.amax(-1) / top[:, None]).amax(0)
    if screen.min_count <= upper.shape[0]:
        coarse = (upper / (screen.threshold * top[:, None, None])).sort(0, descending=True).values
        near = torch.maximum(near, coarse[screen.min_count - 1].amax(-1))
    if screen.top_k:
        mean = upper.mean(0).amax(-1)
        near = torch.maximum(near, mean / kth_mean if kth_mean > 0 else torch.full_like(near, torch.inf))
    return near


def pick_layers(first: Sequence[Attribution], layers: Sequence[int], screen: Screen, error: float | None = None,
                keep: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """The layers to integrate exactly: ``keep`` and those whose neurons' screened bounds (``error`` the
    screen's error: ``safety`` − 1 unless given) may matter (``kept``), and the left-out layer nearest that
    cut (``verified``; empty when none is left out)."""
    top = torch.tensor([float(a.scores.max()) for a in first])
    if bool((top <= 0).any()):  # no positive evidence to cut at: every layer stays
        return list(layers), []
    near = _closeness(_upper(first, screen.safety - 1 if error is None else error), top,
                      _kth_mean([a.scores for a in first], screen.top_k) if screen.top_k else 0.0, screen)
    chosen = (near >= 1) | torch.tensor([l in keep for l in layers])
    kept = [l for l, k in zip(layers, chosen.tolist()) if k]
    if chosen.all():
        return kept, []
    rest = (~chosen).nonzero()[:, 0]
    return kept, [layers[int(rest[near[rest].argmax()])]]


def needed_layers(exact: Sequence[Attribution], screen: Screen) -> list[int]:
    """The layers a perfect screen would keep for ``screen``'s guarantee: those where, by the exact scores of
    every layer, a neuron holds a prompt's top score, is coarse in ``min_count`` prompts or is in the top
    ``top_k`` by mean (``exact[0].layers`` numbers them).

    >>> from knlens import attribute, load_model
    >>> attrs = attribute(load_model("tiny-llama"), ["the capital of france is"], " paris", steps=8)
    >>> needed_layers(attrs, Screen(top_k=0)) == [int(attrs[0].scores.max(-1).values.argmax())]
    True
    """
    scores = torch.stack([a.scores for a in exact])
    near = _closeness(scores, scores.amax((1, 2)), _kth_mean(list(scores), screen.top_k) if screen.top_k else 0.0,
                      screen)
    return [l for l, n in zip(exact[0].layers, (near >= 1).tolist()) if n]


def _beta(first: Sequence[Attribution], exact: Sequence[Attribution], rows: list[int]) -> float:
    """The screen's largest error beyond its unexplained effect, relative to its largest |score|, over the
    exactly integrated layers (``rows`` of the screen) and every prompt."""
    beta = 0.0
    for f, e in zip(first, exact):
        s = f.scores[rows]
        err = ((e.scores - s).abs().amax(-1) - (f.delta[rows] - s.sum(-1)).abs()).clamp_min(0)
        peak = s.abs().amax(-1)
        rel = torch.where(err > 0, err / peak, torch.zeros_like(err))  # err > 0 = peak: inf
        beta = max(beta, float(rel.max()))
    return beta


def check_screen(first: Sequence[Attribution], exact: Sequence[Attribution], layers: Sequence[int],
                 kept: Sequence[int], verified: Sequence[int], screen: Screen, rounds: int = 1) -> list[ScreenCheck]:
    """The guarantee of a screened integration checked against the exact scores (steps 2 and 4 of the module
    docstring) for one fact: one :class:`ScreenCheck` per prompt; ``passed`` is the same for all (the check is
    the fact's)."""
    done = set(exact[0].layers)
    skipped = [l for l in layers if l not in done]
    beta = _beta(first, exact, [layers.index(l) for l in exact[0].layers])
    top = torch.tensor([float(a.scores.max()) for a in exact])
    cols = [layers.index(l) for l in skipped]
    upper = _upper(first, beta)[:, cols]
    bound = upper.amax(-1) if skipped else torch.zeros(len(exact), 0)  # [prompt, left-out layer]
    why = ""
    if skipped and bool((top <= 0).any()):
        why = "a prompt has no positive exact score, so a left-out layer may hold its top"
    elif skipped:
        kth = _kth_mean([a.scores for a in exact], screen.top_k) if screen.top_k else 0.0
        near = _closeness(upper, top, kth, screen)
        if bool((near >= 1).any()):
            worst = int(near.argmax())
            why = (f"layer {skipped[worst]} may hold a neuron that matters (bound {float(bound[:, worst].max()):.3g} "
                   f"with beta {beta:.3g}: {float(near[worst]):.3g} of the nearest level)")
    mass = torch.stack([a.delta.abs() for a in first])
    out = []
    for p, a in enumerate(exact):
        level = screen.threshold * float(top[p])
        out.append(ScreenCheck(
            method=screen.method, kept=tuple(kept), verified=tuple(verified), skipped=tuple(skipped), beta=beta,
            bound=float(bound[p].max()) if skipped else 0.0, top=float(top[p]),
            coarse_layers=tuple(l for l, b in zip(skipped, bound[p].tolist()) if b >= level),
            skipped_mass=float(mass[p, cols].sum() / mass[p].sum().clamp_min(1e-30)), passed=not why,
            fell_back=False, why=why, rounds=rounds))
    return out


def _by_layers(run: Run, subsets: dict[int, list[int]]) -> dict[int, list[Attribution]]:
    """``run`` of the facts ``subsets`` names, each on its layers: the facts with the same layers in one call."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, subset in subsets.items():
        groups.setdefault(tuple(subset), []).append(i)
    out: dict[int, list[Attribution]] = {}
    for subset, idx in groups.items():
        out.update(zip(idx, run(idx, list(subset))))
    return out


def _exact_pass(run: Run, first: list[list[Attribution]], picks: dict[int, tuple[list[int], list[int]]],
                layers: list[int], screen: Screen, rounds: int) -> dict[int, tuple[list[Attribution], list[ScreenCheck]]]:
    """The facts ``picks`` names integrated exactly on their picked and verified layers, and checked."""
    exact = _by_layers(run, {i: sorted([*k, *v]) if v else list(layers) for i, (k, v) in picks.items()})
    return {i: (exact[i], check_screen(first[i], exact[i], layers, *picks[i], screen, rounds)) for i in picks}


def screened(n_facts: int, screen: Screen, layers: list[int], run: Run) -> list[list[Attribution]]:
    """Attributions of ``n_facts`` facts by screened integration (steps 1–5 of the module docstring), one list
    per fact; ``run`` is the unscreened call on any of the facts and any subset of ``layers``."""
    facts = list(range(n_facts))
    first = first_pass(screen, layers, run, facts)
    done = _exact_pass(run, first, {i: pick_layers(first[i], layers, screen) for i in facts}, layers, screen, 1)
    again = {i: pick_layers(first[i], layers, screen, error=c[0].beta, keep=e[0].layers)
             for i, (e, c) in done.items() if not c[0].passed and all(x.top > 0 for x in c)}
    done.update(_exact_pass(run, first, {i: p for i, p in again.items() if p[1]}, layers, screen, 2))
    failed = [i for i in facts if not done[i][1][0].passed]
    notes = {i: f"screen {screen.method} -> all layers: {done[i][1][0].why}" for i in failed}
    if failed:
        which = "" if n_facts == 1 else f"{len(failed)} of {n_facts} facts; "
        text = "; ".join(f"{notes[i]}" + ("" if n_facts == 1 else f" (fact {i})") for i in failed)
        warnings.warn(f"integrated gradients: {which}{text}", ScreenFallbackWarning, stacklevel=5)
        log.warning("%s%s", which, text)
        done.update({i: (e, [dataclasses.replace(c, fell_back=True) for c in done[i][1]])
                     for i, e in zip(failed, run(failed, list(layers)))})
    return [[dataclasses.replace(a, screen=c, settings=dataclasses.replace(
        a.settings, screen=screen, engine_note="; ".join(x for x in (a.settings.engine_note, notes.get(i, "")) if x)))
        for a, c in zip(*done[i])] for i in facts]


def _span(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``'0-2, 5'``."""
    parts: list[list[int]] = []
    for l in layers:
        if parts and l == parts[-1][-1] + 1:
            parts[-1].append(l)
        else:
            parts.append([l])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts) or "none"


def describe_screen(attributions: Sequence[Attribution]) -> str:
    """One line on what a screened fact (its attributions) left out and how it was checked.

    >>> from knlens import attribute, load_model
    >>> attrs = attribute(load_model("tiny-llama"), ["the capital of france is"], " paris", steps=2, screen="gauss2")
    >>> print(describe_screen(attrs))
    gauss2: integrated exactly layers 0-1 (picked 0-1, verified none), left out none ...
    """
    c = attributions[0].screen
    if c is None:
        return "none: every layer integrated exactly"
    mass = max(a.screen.skipped_mass for a in attributions)
    text = (f"{c.method}: integrated exactly layers {_span(sorted([*c.kept, *c.verified]))} (picked {_span(c.kept)}, "
            f"verified {_span(c.verified)}), left out {_span(c.skipped)} (at most {mass:.1%} of a prompt's layer "
            f"effects); measured screen error beta {c.beta:.3g}")
    if c.rounds > 1 and not c.fell_back:
        text += "; picked again with the measured error after a first check failed"
    if c.fell_back:
        text += f"; the check failed ({c.why}): every layer integrated exactly"
    return text
