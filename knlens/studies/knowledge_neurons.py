"""Find a fact's knowledge neurons, check them causally, and keep everything needed to show them.

:func:`locate` is the pipeline behind ``knlens locate`` (docs/methods.md, the locate pipeline), one call per step:

1. :func:`knlens.attribute` — integrated gradients of P(target) for every prompt (paraphrase) of the fact,
   with the completeness error Σ IG − (P(a) − P(0)) of each prompt;
2. :func:`knlens.methods.selection.refinement` — coarse neurons per prompt, refined across prompts (preset ``dai``,
   ``eleuther`` or ``niu``; an adaptive preset adapts ``p`` for this fact alone);
3. :func:`knlens.measure` — suppress (×0) and enhance (×2) the neurons at the target position (in-sample:
   on the prompts they were selected on), next to ``n_random`` random sets of each control: ``uniform``
   within the same layers and ``matched`` on activation magnitude (:mod:`knlens.methods.controls`);
4. :func:`knlens.methods.heldout.held_out` — leave one prompt out: neurons refined on the others, measured on it
   (on by default from 4 prompts on);
5. :func:`knlens.methods.specificity.specificity` — the same neurons on the built-in facts of other relations
   (Dai's control);
6. the tested neurons' activations at every token of every prompt (one batched forward, cached by a hook).

If no neuron survives refinement, the result says so (``result.refined_empty``) and steps 3–6 use the
``fallback_k`` neurons with the highest mean score instead, labelled as such everywhere.
:meth:`LocateResult.tests` lists every test with the smallest p-value it can reach.

>>> from knlens import load_model, Fact
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is", "the capital city of france is", "france capital city is"], " paris")
>>> result = locate(model, fact, steps=4, n_random=5, progress=False, specificity=False)
>>> list(result.to_frame().columns)
['layer', 'neuron', 'mean_score', 'n_coarse', 'refined', 'tested', 'mean_activation']
>>> result.effects()["control"].tolist()
['', 'uniform', 'matched', '', 'uniform', 'matched']
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from knlens.core.versions import __version__
from knlens.methods.activations import TokenActivations, token_activations
from knlens.methods.attribution.result import Attribution, Screen
from knlens.methods.attribution.ig import attribute, attribute_facts
from knlens.methods.attribution.adaptive import DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE
from knlens.methods.attribution.screen import get_screen
from knlens.methods.controls import CONTROLS
from knlens.run.engine import target_probs
from knlens.core.errors import ControlError, FactError, SettingsError
from knlens.core.facts import Fact
from knlens.methods.heldout import MIN_PROMPTS_DEFAULT_ON, held_out as run_held_out
from knlens.methods.interventions import measure, per_prompt
from knlens.studies.knowledge_neurons_result import LocateResult, LocateSettings
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode, target_tokens
from knlens.methods.selection import SelectionPreset, best_by_mean, coarse, get_preset, min_prompts, refinement
from knlens.methods.specificity import specificity as run_specificity

__all__ = ["LocateResult", "LocateSettings", "TokenActivations", "locate", "locate_facts", "token_activations"]


def _neuron_table(attrs: Sequence[Attribution], refined: NeuronSet, tested: NeuronSet, cfg: SelectionPreset,
                  top_k: int) -> pd.DataFrame:
    scores = torch.stack([a.scores for a in attrs])  # [prompt, layer, d]
    mean = scores.mean(0)
    acts = torch.stack([a.activations for a in attrs]).mean(0)
    layers = attrs[0].layers
    row_of = {l: i for i, l in enumerate(layers)}
    counts = torch.zeros_like(mean, dtype=torch.long)
    for a in attrs:
        for n in coarse(a, cfg.threshold, strict=cfg.strict_threshold):
            counts[row_of[n.layer], n.index] += 1
    d = mean.shape[1]
    top = mean.flatten().topk(min(top_k, mean.numel())).indices.tolist()
    chosen = NeuronSet([*refined, *tested, *((layers[i // d], i % d) for i in top)])
    frame = pd.DataFrame({
        "layer": [n.layer for n in chosen], "neuron": [n.index for n in chosen],
        "mean_score": [float(mean[row_of[n.layer], n.index]) for n in chosen],
        "n_coarse": [int(counts[row_of[n.layer], n.index]) for n in chosen],
        "refined": [n in refined for n in chosen], "tested": [n in tested for n in chosen],
        "mean_activation": [float(acts[row_of[n.layer], n.index]) for n in chosen]})
    frame = frame.sort_values(["refined", "mean_score"], ascending=[False, False], kind="stable")
    return frame.reset_index(drop=True).astype({"layer": "int64", "neuron": "int64", "n_coarse": "int64"})


def _completeness(model: Any, fact: Fact, attrs: Sequence[Attribution], batch_size: int) -> pd.DataFrame:
    q = encode(model, list(fact.prompts), fact.target)
    p = per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)  # whole target, teacher forced
    return pd.DataFrame({
        "prompt": [a.prompt for a in attrs],
        "p_target": p.double().numpy(),
        "ig_value": [a.clean_value for a in attrs],
        "delta_sum": [float(a.delta.sum()) for a in attrs],
        "ig_sum": [float(a.scores.sum()) for a in attrs],
        "abs_error": [float(a.completeness_error.sum()) for a in attrs],
        "max_layer_error": [float(a.completeness_error.max()) for a in attrs],
        "relative_error": [a.relative_completeness_error for a in attrs],
        "grid": [a.settings.grid for a in attrs], "steps": [a.settings.steps for a in attrs]})  # the pass kept


def locate(model: Any, fact: Fact, *, steps: int = 20, grid: str = "right",
           preset: str | SelectionPreset = "dai", hook_point: str = "hook_post", n_random: int = 50,
           controls: Sequence[str] = CONTROLS, n_bins: int = 10, held_out: bool | None = None,
           specificity: bool | Sequence[Fact] = True, seed: int = 0, engine: str = "fast", progress: bool = True,
           top_k: int = 10, fallback_k: int = 3, attributions: Sequence[Attribution] | None = None,
           batch_size: int = 512, tolerance: float | None = DEFAULT_TOLERANCE,
           max_steps: int = DEFAULT_MAX_STEPS, screen: Screen | str | None = None) -> LocateResult:
    """Knowledge neurons of ``fact`` on ``model``: attribute → refine → suppress/enhance vs random controls →
    held-out prompts → other relations' facts → activations.

    ``steps``/``grid``/``engine``/``hook_point``/``tolerance``/``max_steps`` go to :func:`knlens.attribute`
    (adaptive integration; P(target), zero baseline,
    multi-token targets teacher-forced), and so does ``screen`` (a method name gets the guarantee this
    selection needs: the preset's coarse cut, the fewest prompts a refined neuron is coarse in whatever ``p``
    becomes, on every held-out fold too, and the table's ``top_k``; see
    :mod:`knlens.methods.attribution.screen`); ``preset`` to :func:`knlens.methods.selection.refinement`;
    ``n_random``/``controls``/``n_bins``/``seed`` to :func:`knlens.measure`. ``held_out``: leave-one-prompt-out
    evaluation (``None``: on when the fact has ≥ 4 prompts). ``specificity``: ``True`` tests the neurons on the
    built-in facts of other relations, a list of facts on those, ``False`` skips it. ``top_k`` best neurons
    by mean score join the table; ``fallback_k`` of them are tested when no neuron is refined. ``progress``
    shows tqdm bars (stderr). ``batch_size`` rows run per forward pass.

    ``attributions`` (one per prompt of ``fact``, from :func:`knlens.attribute`) skips step 1; ``steps``,
    ``grid``, ``engine`` and ``hook_point`` are then read from them. ``preset`` may also be a
    :class:`~knlens.methods.selection.SelectionPreset` with thresholds of your own.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-gpt2")
    >>> res = locate(model, Fact(["the capital of france is", "the capital city of france is"], " paris"),
    ...              steps=4, n_random=3, progress=False, specificity=False)
    >>> len(res.completeness), len(res.activations), res.heldout is None
    (2, 2, True)
    """
    if not isinstance(fact, Fact):
        raise TypeError(f"locate takes a knlens.Fact, got {type(fact).__name__}; build one with "
                        f"Fact(prompts=[...], target=' ...')")
    cfg = get_preset(preset)
    preset_name = preset if isinstance(preset, str) else repr(preset)
    n_prompts = len(fact.prompts)
    if held_out is None:
        held_out = n_prompts >= MIN_PROMPTS_DEFAULT_ON
    if held_out and n_prompts < 2:
        raise ControlError(f"held-out evaluation needs at least 2 prompts; the fact has {n_prompts}")
    engine_requested = engine
    if isinstance(screen, str):  # the guarantee this selection needs: its cut, its floor, the table's top
        least = min_prompts(n_prompts - 1 if held_out else n_prompts, 0.0 if cfg.adaptive else cfg.p,
                            min_count=cfg.min_count, strict=cfg.strict_count)
        screen = get_screen(Screen(method=screen, threshold=cfg.threshold, min_count=max(1, least),
                                   top_k=max(Screen.top_k, top_k, fallback_k)))
    if attributions is not None:
        attributions = tuple(attributions)
        if [a.prompt for a in attributions] != list(fact.prompts) or any(a.target != fact.target
                                                                          for a in attributions):
            raise FactError("attributions do not belong to this fact: give one per prompt of fact.prompts, in "
                             "order, with the fact's target")
        a0 = attributions[0].settings
        steps, grid, engine_requested, hook_point = a0.steps, a0.grid, a0.engine, a0.hook_point
        screen = a0.screen
    notes: list[str] = []
    if not held_out:
        notes.append(f"held-out evaluation off ({n_prompts} prompts; on by default from {MIN_PROMPTS_DEFAULT_ON}): "
                     f"every intervention is measured on the prompts the neurons were selected on")
    timings: dict[str, float] = {}
    bar = tqdm(total=6, desc="locate", disable=not progress, leave=False)
    clock = time.perf_counter()

    def done(key: str | None, next_stage: str) -> None:
        """Record the finished stage's time under ``key`` (if any) and move the bar on."""
        nonlocal clock
        if key is not None:
            timings[key] = time.perf_counter() - clock
        clock = time.perf_counter()
        bar.update()
        bar.set_postfix_str(next_stage)

    measure_kw = dict(n_random=n_random, controls=controls, n_bins=n_bins, seed=seed, hook_point=hook_point,
                      batch_size=batch_size, engine=engine)
    try:
        bar.set_postfix_str("integrated gradients")
        if attributions is None:
            attrs = attribute(model, fact, steps=steps, grid=grid, hook_point=hook_point, engine=engine,
                              batch_size=batch_size, progress=progress, tolerance=tolerance, max_steps=max_steps,
                              screen=screen)
        else:
            attrs = list(attributions)
        done(None if attributions is not None else "attribute_s", "refine")
        ref = refinement([attrs], cfg)
        refined = ref.sets[0]
        tested = refined if len(refined) else best_by_mean(attrs, fallback_k)
        table = _neuron_table(attrs, refined, tested, cfg, top_k)
        completeness = _completeness(model, fact, attrs, batch_size)
        done(None, "suppress / enhance vs random controls")
        effects = measure(model, [fact], [tested], **measure_kw)
        if effects.settings.non_monotone_note:
            notes.append(effects.settings.non_monotone_note)
        done("interventions_s", "held-out prompts")
        heldout = run_held_out(model, fact, attrs, preset, full=refined, fallback_k=fallback_k,
                               **measure_kw) if held_out else None
        done("held_out_s" if held_out else None, "other relations' facts")
        spec = None
        if specificity is True:
            try:
                spec = run_specificity(model, fact, tested, hook_point=hook_point, batch_size=batch_size,
                                       engine=engine)
            except ControlError as err:
                notes.append(f"specificity control skipped: {err}")
        elif specificity is not False:
            spec = run_specificity(model, fact, tested, others=list(specificity), hook_point=hook_point,
                                   batch_size=batch_size, engine=engine)
        done("specificity_s" if spec is not None else None, "token activations")
        acts = token_activations(model, fact, tested, hook_point=hook_point, batch_size=batch_size)
        done("activations_s", "done")
    finally:
        bar.close()
    a0 = attrs[0].settings
    settings = LocateSettings(
        model=a0.model, n_layers=int(model.cfg.n_layers), d_mlp=int(model.cfg.d_mlp), dtype=a0.dtype,
        hook_point=hook_point, steps=steps, grid=grid, quantity=a0.quantity, engine=a0.engine,
        multi_token=a0.multi_token, preset=preset_name, n_random=n_random, seed=seed, top_k=top_k,
        fallback_k=fallback_k, knlens_version=__version__, engine_requested=engine_requested,
        engine_note=getattr(a0, "engine_note", ""), controls="+".join(controls), n_bins=n_bins,
        held_out=heldout is not None, specificity=spec is not None, screen=a0.screen)
    selection = {"preset": preset_name, "p": ref.p, "rounds": ref.rounds, "n_prompts": ref.n_prompts[0],
                 "min_prompts": ref.min_prompts[0]}
    return LocateResult(fact=fact, attributions=tuple(attrs), neurons=refined, tested=tested, table=table,
                        completeness=completeness, interventions=effects, activations=tuple(acts),
                        settings=settings, selection=selection, heldout=heldout, specificity=spec,
                        notes=tuple(notes), timings=timings)


def locate_facts(model: Any, facts: Sequence[Fact], **kwargs: Any) -> Iterator[LocateResult]:
    """:func:`locate` of each of ``facts`` (the same keyword arguments but ``attributions``), with the integrated
    gradients of all of them computed first, together (:func:`~knlens.methods.attribution.ig.attribute_facts`: rows
    of different facts with one length share their passes). Yields one result per fact, in order, equal to
    ``locate(model, fact, **kwargs)`` up to float rounding; its ``timings["attribute_s"]`` is the fact's share of
    the joint attribution (by query rows).

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-llama")
    >>> facts = [Fact(["the capital of france is", "the capital city of france is"], " paris", name="fr"),
    ...          Fact(["the capital of spain is", "the capital city of spain is"], " madrid", name="es")]
    >>> [r.fact.name for r in locate_facts(model, facts, steps=4, n_random=3, progress=False, specificity=False)]
    ['fr', 'es']
    """
    if "attributions" in kwargs:
        raise FactError("locate_facts computes the attributions itself; pass them to locate, one fact at a time")
    if kwargs.get("screen") is not None:
        raise SettingsError("locate_facts does not screen; call locate(model, fact, screen=...) per fact")
    bad = [type(f).__name__ for f in facts if not isinstance(f, Fact)]
    if bad:
        raise FactError(f"locate_facts takes knlens.Fact values, got {', '.join(dict.fromkeys(bad))}")
    names = ("steps", "grid", "hook_point", "engine", "batch_size", "progress", "tolerance", "max_steps")
    defaults = {k: v.default for k, v in inspect.signature(locate).parameters.items() if k in names}
    ig = {**defaults, **{k: kwargs[k] for k in names if k in kwargs}}
    clock = time.perf_counter()
    attributions = attribute_facts(model, list(facts), **ig)
    seconds = time.perf_counter() - clock
    rows = [len(f.prompts) * len(target_tokens(model, f.target)) for f in facts]
    for fact, attrs, n in zip(facts, attributions, rows):
        result = locate(model, fact, **kwargs, attributions=attrs)
        settings = dataclasses.replace(result.settings, steps=ig["steps"], grid=ig["grid"],
                                       engine_requested=ig["engine"])
        yield dataclasses.replace(result, settings=settings,
                                  timings={"attribute_s": seconds * n / sum(rows), **result.timings})
