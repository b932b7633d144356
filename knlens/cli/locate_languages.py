"""``knlens locate --languages``: one mParaRel fact located in several languages — each language's neurons, the
language-independent set (LIKN) and its suppress / enhance effect per language, and the HTML language × layer
view.

    knlens locate --model gemma3-270m --languages en,fr,it --fact P1376:Q1489 --steps 6 --out fr-capital

``--fact RELATION:SUBJECT`` names the fact by its mParaRel relation and its subject's Wikidata URI. A language
mParaRel lacks raises :class:`~knlens.core.errors.UnknownLanguageError`, a fact missing in a language
:class:`~knlens.core.errors.MissingTranslationError`; a language where the model does not answer the fact is
skipped and said so (the output counts it), and fewer than two known languages raise
:class:`~knlens.core.errors.NotKnownError`.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import pandas as pd

from knlens.cli.common import load_model, output_dir, say, table, write_outputs
from knlens.core.errors import CommandLineError, NotKnownError
from knlens.data.multilingual import MultilingualFact, MultilingualFacts, load_multilingual
from knlens.methods.multilingual.known import known_in_all
from knlens.methods.multilingual.likn import effects_by_language, language_neurons, likn_effects
from knlens.methods.multilingual.likn_result import LanguageNeurons
from knlens.studies.multilingual_facts import shorten
from knlens.viz.language_page import write_language_html

__all__ = ["run_languages", "parse_languages", "parse_fact_spec", "known_languages"]


def parse_languages(text: str) -> list[str]:
    """``"en,fr, de"`` -> ``["en", "fr", "de"]``; at least two distinct languages.

    >>> parse_languages("en,fr, de")
    ['en', 'fr', 'de']
    """
    langs = list(dict.fromkeys(l.strip() for l in text.split(",") if l.strip()))
    if len(langs) < 2:
        raise CommandLineError(f"--languages needs at least two comma-separated languages, got {text!r}")
    return langs


def parse_fact_spec(text: str | None) -> tuple[str, str]:
    """``"P36:Q142"`` -> ``("P36", "Q142")``: an mParaRel relation and a subject's Wikidata URI.

    >>> parse_fact_spec("P36:Q142")
    ('P36', 'Q142')
    """
    m = re.fullmatch(r"\s*(P\d+)\s*:\s*(Q\d+)\s*", text or "")
    if not m:
        raise CommandLineError(f"with --languages, --fact is RELATION:SUBJECT (an mParaRel relation and the subject's "
                               f"Wikidata URI, e.g. P36:Q142), got {text!r}")
    return m.group(1), m.group(2)


def known_languages(model: Any, fact: MultilingualFact) -> tuple[MultilingualFact, dict[str, str]]:
    """``fact`` restricted to the languages where the model answers it (each keeping its answered prompts), and
    the skipped languages with the reason; fewer than two known languages raise :class:`NotKnownError`."""
    langs = fact.languages
    counts = pd.DataFrame({"language": list(langs)})
    first = known_in_all(model, MultilingualFacts((fact,), langs, counts))
    known = first.counts.set_index("language")["known"]
    skipped = {l: f"not known (the greedy answer to none of its {len(fact[l].prompts)} prompt(s) is "
                  f"{fact[l].target!r})" for l in langs if not known[l]}
    kept = [l for l in langs if known[l]]
    if len(kept) < 2:
        raise NotKnownError(f"the model knows fact {fact.key} in fewer than two of {', '.join(langs)} (known: "
                            f"{', '.join(kept) or 'none'}); nothing to intersect — try other languages")
    if skipped:
        first = known_in_all(model, MultilingualFacts((fact.restrict(kept),), tuple(kept), pd.DataFrame({"language": kept})))
    return first.facts[0], skipped


def _neuron_table(neurons: LanguageNeurons, fact: MultilingualFact) -> pd.DataFrame:
    rows = [{"language": l, "prompts": len(fact[l].prompts), "target": fact[l].target,
             "n_neurons": len(neurons.neurons(fact.key, l)), "n_specific": len(neurons.specific(fact.key, l)),
             "neurons": " ".join(map(str, neurons.neurons(fact.key, l)))} for l in neurons.languages]
    return pd.DataFrame(rows)


def run_languages(args: argparse.Namespace) -> int:
    """Run ``knlens locate --languages``: print each language's neurons, the LIKN set and its effects; with
    ``--out``, save the neurons and write ``languages.html``."""
    if args.prompt or args.target is not None:
        raise CommandLineError("--languages reads the fact from mParaRel: give --fact RELATION:SUBJECT, not --prompt")
    langs = parse_languages(args.languages)
    relation, subject = parse_fact_spec(args.fact)
    if args.max_prompts < 1 or args.steps < 1 or args.n_random < 1:
        raise CommandLineError("--max-prompts, --steps and --n-random must be at least 1")
    facts = load_multilingual(relation, langs, args.data_dir, subjects=[subject])
    if not len(facts):
        raise CommandLineError(f"subject {subject} of {relation} has no object shared by all of {', '.join(langs)}")
    out = output_dir(args.out) if args.out else None
    model = load_model(args)
    fact, skipped = known_languages(model, shorten(facts[0], args.max_prompts))
    say(args, f"locating {fact.key} in {', '.join(fact.languages)} ({args.attribution}, {args.steps} steps)")
    neurons = language_neurons(model, [fact], attribution=args.attribution, steps=args.steps, grid=args.grid,
                               hook_point=args.hook_point)
    likn = neurons.independent(fact.key)
    effects = None
    if likn:
        effects = effects_by_language(likn_effects(model, [fact], neurons, n_random=args.n_random, seed=args.seed),
                                      neurons)
    notes = [f"skipped {l}: {why}" for l, why in skipped.items()]
    if len(facts) > 1:
        notes.append(f"{subject} has {len(facts)} objects in {relation}; located the first, {fact[fact.languages[0]].target!r}")
    lines = [f"knlens locate --languages: {fact.key} ({relation}, subject {subject}); model {neurons.settings.model}; "
             f"{neurons.settings.attribution}, {args.steps} {args.grid} steps; languages {', '.join(fact.languages)}"
             f" ({len(skipped)} skipped)",
             *[f"  {n}" for n in notes], "",
             "Neurons per language (coarse >= 0.3 x max in more than half of the language's answered prompts):",
             table(_neuron_table(neurons, fact)), "",
             f"Language-independent neurons (LIKN, in every language's set): {len(likn)}  "
             + (" ".join(map(str, likn)) or "none"), ""]
    if effects is not None:
        lines += [f"LIKN suppressed (x0) / enhanced (x2) on each language's prompts, vs {args.n_random} random sets "
                  "(in-sample):", table(effects)]
    print("\n".join(lines), flush=True)
    if out is not None:
        write_outputs(out, neurons, {"languages.html": lambda p: write_language_html(
            neurons, p, effects, title=f"knlens locate --languages: {fact.key}", notes=tuple(notes))})
    return 0
