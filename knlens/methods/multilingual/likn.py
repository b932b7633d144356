"""Language-independent knowledge neurons (LIKN; Chen et al., AAAI 2024).

See docs/methods.md, language-independent neurons.

Per fact and language, the language's neurons are those coarse (score ≥ ``threshold`` × the prompt's top score,
0.3 as in AMIG's and MEMLA's code) in more than ``p`` (0.5) of the language's prompts: with one prompt per
language that is MEMLA's coarse set, with several the majority of them. The fact's LIKN set is the intersection
of its sets over the languages ``across`` (all by default; MEMLA intersects en, zh and fr); each language's
remainder are its language-specific neurons. :func:`likn_effects` suppresses and enhances each fact's LIKN set
in every language's prompts beside matched random sets (:func:`knlens.methods.interventions.measure`), and
:func:`effects_by_language` tests the knowledge set against the random ones per language.

>>> from knlens import load_model, Fact
>>> from knlens.data.multilingual import MultilingualFact
>>> model = load_model("tiny-llama")
>>> m = MultilingualFact("P36", "Q142", "Q90", {"en": Fact(["the capital of france is"], " paris"),
...                                             "xx": Fact(["the capital city of france is"], " paris")})
>>> res = language_neurons(model, [m], steps=4)
>>> res.independent("P36-Q142-Q90") == res.neurons("P36-Q142-Q90", "en") & res.neurons("P36-Q142-Q90", "xx")
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import pandas as pd
from torch import Tensor

from knlens.core.errors import MissingTranslationError, SettingsError
from knlens.core.neurons import NeuronSet
from knlens.data.multilingual import MultilingualFact
from knlens.methods.attribution.amig import attribute_amig_facts
from knlens.methods.attribution.ig import attribute_facts
from knlens.methods.attribution.result import Attribution
from knlens.methods.interventions import InterventionResult, measure
from knlens.methods.multilingual.likn_result import LanguageAttributions, LanguageNeurons, LanguageNeuronSettings
from knlens.methods.selection import coarse, refine

__all__ = ["attribute_languages", "language_set", "language_neurons", "split_languages", "likn_effects", "effects_by_language"]


def language_set(attributions: Sequence[Attribution | Tensor], threshold: float = 0.3, p: float = 0.5) -> NeuronSet:
    """The neurons of one fact in one language: coarse (≥ ``threshold`` × max) in more than ``p`` of its prompts'
    attributions (or ``[layer, neuron]`` score tensors).

    >>> import torch
    >>> sorted(language_set([torch.tensor([[1.0, 0.5, 0.1]]), torch.tensor([[0.2, 1.0, 0.0]])]))  # 1 of 2 each
    [Neuron(layer=0, index=1)]
    >>> sorted(language_set([torch.tensor([[1.0, 0.5, 0.1]])]))                   # one prompt: its coarse set
    [Neuron(layer=0, index=0), Neuron(layer=0, index=1)]
    """
    if not 0.0 < threshold <= 1.0 or not 0.0 <= p < 1.0:
        raise SettingsError(f"threshold must be in (0, 1] and p in [0, 1), got {threshold}, {p}")
    return refine([coarse(a, threshold) for a in attributions], p, min_count=0, strict=True)


def split_languages(sets: dict[str, NeuronSet], across: Sequence[str] | None = None
                    ) -> tuple[NeuronSet, dict[str, NeuronSet]]:
    """The language-independent set (the intersection over ``across``, all languages by default) and each
    language's language-specific remainder.

    >>> independent, specific = split_languages({"en": NeuronSet([(1, 2), (1, 3)]), "fr": NeuronSet([(1, 2)])})
    >>> sorted(independent), sorted(specific["en"]), sorted(specific["fr"])
    ([Neuron(layer=1, index=2)], [Neuron(layer=1, index=3)], [])
    """
    langs = list(sets) if across is None else list(across)
    missing = [l for l in langs if l not in sets]
    if missing or not langs:
        raise MissingTranslationError(f"no neuron set for language(s) {missing or 'any'} to intersect; "
                                      f"have {', '.join(sets)}")
    independent = NeuronSet.intersection(sets[l] for l in langs)
    return independent, {l: s - independent for l, s in sets.items()}


def attribute_languages(model: Any, facts: Sequence[MultilingualFact], *,
                        attribution: Literal["amig", "ig"] = "amig", scaling: str = "authors", steps: int = 20,
                        grid: str = "right", **kwargs: Any) -> LanguageAttributions:
    """The attributions of every prompt of every fact in each of its languages, in one pass of the engines.

    ``attribution="amig"`` (default; ``scaling`` ``"authors"`` or ``"textbook"``) or ``"ig"`` (zero baseline,
    adaptive integration off so that both use the same grid); other keyword arguments go to the attribution
    (``layers``, ``hook_point``, ``engine``, ``batch_size``, ...). All facts must have the same languages.
    """
    if not facts:
        raise SettingsError("at least one fact is needed")
    langs = facts[0].languages
    odd = [m.key for m in facts if m.languages != langs]
    if odd:
        raise MissingTranslationError(f"facts {odd[:3]} are not in the languages {', '.join(langs)} of the first "
                                      f"fact (in that order); restrict them with MultilingualFact.restrict")
    flat = [m[l] for m in facts for l in langs]
    if attribution == "amig":
        attrs = attribute_amig_facts(model, flat, scaling=scaling, steps=steps, grid=grid, **kwargs)
        method = f"amig/{scaling}"
    elif attribution == "ig":
        attrs = attribute_facts(model, flat, steps=steps, grid=grid, tolerance=None, **kwargs)
        method = "integrated_gradients"
    else:
        raise SettingsError(f"unknown attribution {attribution!r}; use 'amig' or 'ig'")
    by_fact = {m.key: {l: attrs[i * len(langs) + k] for k, l in enumerate(langs)} for i, m in enumerate(facts)}
    return LanguageAttributions(tuple(facts), langs, by_fact, method, steps, grid,
                                kwargs.get("hook_point", "hook_post"), str(getattr(model.cfg, "model_name", "?")))


def language_neurons(model: Any, facts: Sequence[MultilingualFact], *, threshold: float = 0.3, p: float = 0.5,
                     across: Sequence[str] | None = None, attributions: LanguageAttributions | None = None,
                     **kwargs: Any) -> LanguageNeurons:
    """Each fact's neurons in each of its languages (:func:`language_set`), and their split into LIKN (the
    intersection over ``across``, all languages by default) and language-specific neurons. The attributions
    are :func:`attribute_languages`' (``kwargs`` go there), or ``attributions`` computed before."""
    attrs = attributions if attributions is not None else attribute_languages(model, facts, **kwargs)
    across_t = tuple(attrs.languages if across is None else across)
    rows, sizes = [], []
    for m in facts:
        sets = {l: language_set(attrs.of(m.key, l), threshold, p) for l in attrs.languages}
        independent, specific = split_languages(sets, across_t)
        for lang, s in sets.items():
            rows += [{"fact": m.key, "language": lang, "layer": n.layer, "neuron": n.index,
                      "independent": n in independent} for n in s]
            sizes.append({"fact": m.key, "language": lang, "n_neurons": len(s), "n_independent": len(independent),
                          "n_specific": len(specific[lang])})
    settings = LanguageNeuronSettings(attribution=attrs.method, steps=attrs.steps, grid=attrs.grid,
                                      threshold=threshold, p=p, across=across_t, hook_point=attrs.hook_point,
                                      model=attrs.model)
    frame = pd.DataFrame(rows, columns=["fact", "language", "layer", "neuron", "independent"])
    return LanguageNeurons(frame.astype({"layer": "int64", "neuron": "int64", "independent": "bool"}),
                           pd.DataFrame(sizes), tuple(attrs.languages), settings)


def likn_effects(model: Any, facts: Sequence[MultilingualFact], neurons: LanguageNeurons, *,
                 which: Literal["independent", "specific"] = "independent", source: str | None = None,
                 **kwargs: Any) -> InterventionResult:
    """Suppress (×0) and enhance (×2) each fact's LIKN set (``which="independent"``), or ``source``'s
    language-specific set (``which="specific"``), on the prompts of **every** language of the fact, beside
    random sets of the same layers (uniform and activation-matched): one
    :func:`~knlens.methods.interventions.measure` over all (fact, language) pairs, ``kwargs`` passed on
    (``n_random``, ``controls``, ``actions``, ``engine``, ...); the frame's ``fact`` is ``"<key>/<language>"``.
    Facts with an empty set are not measured;
    :func:`effects_by_language` counts them."""
    if which == "specific" and source not in neurons.languages:
        raise MissingTranslationError(f"which='specific' needs source= one of {', '.join(neurons.languages)}")
    pairs = []
    for m in facts:
        s = neurons.independent(m.key) if which == "independent" else neurons.specific(m.key, str(source))
        if s:
            pairs += [(replace(m[l], name=f"{m.key}/{l}"), s) for l in neurons.languages]
    if not pairs:
        raise SettingsError(f"no fact has a non-empty {which} neuron set: nothing to suppress or enhance")
    return measure(model, [f for f, _ in pairs], [s for _, s in pairs], **kwargs)


def effects_by_language(result: InterventionResult, neurons: LanguageNeurons) -> pd.DataFrame:
    """Per language and action: the knowledge set's mean relative change of P(target), each control's, and the
    tests of :meth:`~knlens.methods.interventions.InterventionResult.tests` over that language's facts; with
    ``n_facts`` measured and ``facts_without_set`` (facts of ``neurons`` not measured: their set was empty, or
    they were not given to :func:`likn_effects`)."""
    frame = result.frame.assign(language=result.frame["fact"].str.rsplit("/", n=1).str[-1])
    measured = set(frame["fact"].str.rsplit("/", n=1).str[0])
    out = []
    for lang in neurons.languages:
        sub = frame[frame.language == lang].drop(columns="language")
        if sub.empty:
            continue
        tests = InterventionResult(sub, result.settings).tests()
        out.append(tests.assign(language=lang, facts_without_set=len(set(neurons.facts) - measured)))
    table = pd.concat(out, ignore_index=True)
    return table[["language", *[c for c in table.columns if c != "language"]]]
