"""AMIG on the embedded Gemma-3-270M: its fast engine against the reference, and its completeness analogue, on one
mParaRel fact (the part of the multilingual measurements that ``knlens study multilingual`` does not repeat).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/multilingual_gemma.py --relation P36 --subject Q212 --language en

Everything else — facts known per language, LIKN sets, their suppression, MATRICE, degenerate pairs, the
cross-lingual edit matrix — is the study: ``knlens study multilingual --page benchmarks/MULTILINGUAL.md``.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import pandas as pd
import torch

from knlens import load_model
from knlens.data.multilingual import load_multilingual
from knlens.methods.attribution.amig import attribute_amig
from knlens.viz.query_localization_page import markdown_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relation", default="P36")
    ap.add_argument("--subject", default="Q212", help="the subject's Wikidata URI (default: Ukraine)")
    ap.add_argument("--language", default="en")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("gemma3-270m")
    fact = load_multilingual(args.relation, [args.language], subjects=[args.subject])[0][args.language]
    fact = replace(fact, prompts=fact.prompts[:1])
    print(f"## AMIG on {fact.prompts[0]!r} -> {fact.target!r}\n")
    rows = []
    for scaling in ("authors", "textbook"):
        kw = dict(steps=4, grid="gauss-legendre", layers=[0, 8, 17], scaling=scaling)
        t = time.perf_counter()
        fast = attribute_amig(model, fact, engine="fast", **kw)[0]
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        ref = attribute_amig(model, fact, engine="reference", **kw)[0]
        t_ref = time.perf_counter() - t
        err = float((fast.scores - ref.scores).abs().max() / ref.scores.abs().max())
        rows.append({"scaling": scaling, "engine ran": fast.settings.engine, "fast s": t_fast, "reference s": t_ref,
                     "max abs(fast − ref) / max abs(ref)": err,
                     "relative completeness error": fast.relative_completeness_error})
    for m in (args.steps, 4 * args.steps):
        a = attribute_amig(model, fact, steps=m, grid="right", scaling="textbook")[0]
        rows.append({"scaling": f"textbook, all layers, right {m}", "engine ran": a.settings.engine,
                     "relative completeness error": a.relative_completeness_error})
    print(markdown_table(pd.DataFrame(rows), floatfmt="{:.4g}"))


if __name__ == "__main__":
    main()
