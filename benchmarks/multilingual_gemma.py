"""A small multilingual run on the embedded Gemma-3-270M: mParaRel facts known in every language (counts per
language), AMIG's fast engine against its reference and its completeness analogue, and the language-independent
neurons (LIKN) of a few facts with their suppress / enhance effect per language against random sets.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/multilingual_gemma.py --relation P36 \
        --languages en,fr,es,it,pt,de --subjects countries --facts 2 --steps 8 --n-random 10

``--subjects countries`` keeps the 32 P36 facts whose subject is a country (their URIs are below); a random
sample of mParaRel's P36 (``--subjects all --max-facts 40``) is mostly capitals of small regions that the
270M model knows in no language but English.

Prints Markdown tables. Not the multilingual study: a smoke-sized measurement of its parts.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import pandas as pd
import torch

from knlens import load_model
from knlens.data.multilingual import MultilingualFact, load_multilingual
from knlens.methods.attribution.amig import attribute_amig
from knlens.methods.multilingual.known import known_in_all
from knlens.methods.multilingual.likn import effects_by_language, language_neurons, likn_effects
from knlens.viz.query_localization_page import markdown_table


COUNTRIES = ("Q183 Q35 Q408 Q28 Q159 Q252 Q45 Q17 Q794 Q27 Q212 Q928 Q41 Q55 Q38 Q145 Q16 Q142 Q29 Q884 Q39 Q40 "
             "Q79 Q869 Q20 Q43 Q36 Q148 Q33 Q31 Q34 Q298").split()


def md(frame) -> str:
    return markdown_table(frame, floatfmt="{:.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relation", default="P36")
    ap.add_argument("--languages", default="en,fr,es,it,pt,de")
    ap.add_argument("--subjects", default="countries", help="'countries' (P36), 'all', or comma-separated URIs")
    ap.add_argument("--max-facts", type=int, default=None, help="facts read before the known filter (random)")
    ap.add_argument("--facts", type=int, default=2, help="known facts whose LIKN sets are found")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    langs = args.languages.split(",")
    t0 = time.perf_counter()
    model = load_model("gemma3-270m")
    print(f"Gemma-3-270M loaded in {time.perf_counter() - t0:.0f} s; threads {args.threads}\n")

    subjects = (None if args.subjects == "all" else list(COUNTRIES) if args.subjects == "countries"
                else args.subjects.split(","))
    facts = load_multilingual(args.relation, langs, subjects=subjects, max_facts=args.max_facts)
    t = time.perf_counter()
    known = known_in_all(model, facts)
    print(f"## Facts of {args.relation} known in every language ({time.perf_counter() - t:.0f} s)\n")
    cols = ["language", "tuples", "templates_used", "templates_object_not_last", "aligned", "kept", "known",
            "not_known", "multi_token_targets", "known_in_all"]
    print(md(known.counts[cols]), "\n")
    if len(known) == 0:
        print("no fact is known in every language: nothing more to measure")
        return
    # one prompt per language (the first one the model answers): MEMLA's setting
    chosen = [MultilingualFact(m.relation, m.subject_uri, m.object_uri,
                               {l: replace(m[l], prompts=m[l].prompts[:1]) for l in langs})
              for m in known.facts[:args.facts]]

    first = chosen[0][langs[0]]
    print(f"## AMIG on {first.prompts[0]!r} -> {first.target!r}\n")
    rows = []
    for scaling in ("authors", "textbook"):
        kw = dict(steps=4, grid="gauss-legendre", layers=[0, 8, 17], scaling=scaling)
        t = time.perf_counter()
        fast = attribute_amig(model, first, engine="fast", **kw)[0]
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        ref = attribute_amig(model, first, engine="reference", **kw)[0]
        t_ref = time.perf_counter() - t
        err = float((fast.scores - ref.scores).abs().max() / ref.scores.abs().max())
        rows.append({"scaling": scaling, "engine ran": fast.settings.engine, "fast s": t_fast, "reference s": t_ref,
                     "max abs(fast − ref) / max abs(ref)": err,
                     "relative completeness error": fast.relative_completeness_error})
    for m in (args.steps, 4 * args.steps):
        a = attribute_amig(model, first, steps=m, grid="right", scaling="textbook")[0]
        rows.append({"scaling": f"textbook, all layers, right {m}", "engine ran": a.settings.engine,
                     "relative completeness error": a.relative_completeness_error})
    print(md(pd.DataFrame(rows)), "\n")

    t = time.perf_counter()
    found = language_neurons(model, chosen, steps=args.steps)
    print(f"## LIKN of {len(chosen)} facts, AMIG (authors), right {args.steps}, coarse >= 0.3 max "
          f"({time.perf_counter() - t:.0f} s)\n")
    print(md(found.summary()), "\n")
    print(md(found.overlap()), "\n")
    stats = found.layer_stats()
    print(md(stats[["layer", "independent", *[f"{l}_neurons" for l in langs]]]), "\n")
    if not any(len(found.independent(m.key)) for m in chosen):
        print("no fact has a language-independent neuron: no effect to measure")
        return
    t = time.perf_counter()
    res = likn_effects(model, chosen, found, n_random=args.n_random)
    table = effects_by_language(res, found)
    print(f"## Suppress / enhance the LIKN set, per language ({time.perf_counter() - t:.0f} s)\n")
    keep = ["language", "action", "knowledge_relative", "random_relative", "matched_relative", "p_empirical",
            "p_empirical_matched", "n_facts", "facts_without_set", "p_empirical_floor"]
    print(md(table[keep]))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
