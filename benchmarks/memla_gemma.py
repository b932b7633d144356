"""Cross-lingual editing (KN update on LIKN vs MEMLA) and degenerate pairs on the embedded Gemma-3-270M: P36 facts
whose subject is a country, known in every language, one prompt per language (MEMLA's setting).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memla_gemma.py --languages en,fr,es,it --facts 3 --steps 8

Prints Markdown tables. A smoke-sized measurement, not the multilingual study.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from knlens import cross_lingual_edits, degenerate_pairs, load_model
from knlens.data.multilingual import MultilingualFact, load_multilingual
from knlens.methods.multilingual.known import known_in_all
from knlens.methods.multilingual.likn import attribute_languages, language_neurons
from knlens.viz.query_localization_page import markdown_table

# Wikidata URIs of 32 countries: the P36 subjects this script reads (the sample benchmarks/MEMLA.md was measured on)
COUNTRIES = ("Q183 Q35 Q408 Q28 Q159 Q252 Q45 Q17 Q794 Q27 Q212 Q928 Q41 Q55 Q38 Q145 Q16 Q142 Q29 Q884 Q39 Q40 "
             "Q79 Q869 Q20 Q43 Q36 Q148 Q33 Q31 Q34 Q298").split()


def md(frame) -> str:
    return markdown_table(frame, floatfmt="{:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--languages", default="en,fr,es,it")
    ap.add_argument("--facts", type=int, default=3, help="known facts edited (a new object needs two at least)")
    ap.add_argument("--steps", type=int, default=8, help="AMIG steps")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    langs = args.languages.split(",")
    t0 = time.perf_counter()
    model = load_model("gemma3-270m")
    known = known_in_all(model, load_multilingual("P36", langs, subjects=list(COUNTRIES)))
    chosen = [MultilingualFact(m.relation, m.subject_uri, m.object_uri,
                               {l: replace(m[l], prompts=m[l].prompts[:1]) for l in langs})
              for m in known.facts[:args.facts]]
    print(f"{len(known)} facts known in {', '.join(langs)}; {len(chosen)} used "
          f"({time.perf_counter() - t0:.0f} s)\n")
    t = time.perf_counter()
    attrs = attribute_languages(model, chosen, steps=args.steps)
    found = language_neurons(model, chosen, attributions=attrs)
    print(f"## Neurons (AMIG authors, right {args.steps}, coarse >= 0.3 max; {time.perf_counter() - t:.0f} s)\n")
    print(md(found.summary()), "\n")
    t = time.perf_counter()
    mx = cross_lingual_edits(model, chosen, found)
    print(f"## Cross-lingual edit matrix ({time.perf_counter() - t:.0f} s)\n")
    for editor in mx.settings.editors:
        for metric in ("reliability_es", "reliability", "generality_ps", "locality"):
            print(f"{editor}, {metric} (rows: edited in; columns: judged in)\n")
            print(md(mx.table(metric, editor).reset_index()), "\n")
    print("skips\n\n" + md(mx.skip_counts()), "\n")
    print("edits\n\n" + md(mx.edits), "\n")
    t = time.perf_counter()
    pairs = degenerate_pairs(model, chosen, attrs)
    print(f"## Degenerate pairs, top 20, single < 20 %, pair > 25 % ({time.perf_counter() - t:.0f} s)\n")
    print(md(pairs.summary()))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
