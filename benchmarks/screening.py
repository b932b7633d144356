"""Screened integrated gradients against the exact fast engine on the embedded model, fact by fact.

Run (from the repository root)::

    .venv/bin/python benchmarks/screening.py --top-k 20 3 --out screening.jsonl   # resumable: facts in the file are skipped
    .venv/bin/python benchmarks/screening.py --summarize screening.jsonl

Facts: ParaRel P36 and P1376 as the query-localization study reads them (150 random candidates per relation,
seed 0, object-last templates, ≥ 3 paraphrases), kept when SmolLM2-135M answers at least 3 paraphrases; those
prompts (at most 4) are used; the first ``--per-relation`` facts of each relation. ``--cache`` keeps the
filtered facts in a JSON file so that a rerun skips the filter.

Per fact, the Dai pipeline's attribution and selection: :func:`knlens.attribute` with its defaults (fast engine,
right 20, adaptive refinement) then ``refined_neurons(preset="dai")`` and the top 20 by mean score, once
exactly (``screen=None``) and once per screen (``--screens``), each a :class:`Screen` with the guarantee the
locate pipeline asks for under ``dai`` (cut 0.2, a neuron refined only if coarse in ≥ 3 prompts, top 20 by
mean). Timed with ``benchmarks/timing.py``: one untimed warm-up of every side on the first fact, then
``--repeat`` interleaved calls per fact; min and median per side.

Recorded per fact and side: wall times, refined neurons identical to the exact ones, top-20-by-mean overlap,
mean per-prompt top-20 overlap, layers integrated exactly, whether the check fell back, the measured screen
error beta; and, from the exact scores, the layers a perfect screen would have to keep for the same guarantee
and their share of the cells' cost (block matmuls from the layer up plus the unembedding, per cell: an estimate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from knlens import Fact, attribute, known_facts, load_model, load_pararel, refined_neurons
from knlens.core.errors import ScreenFallbackWarning
from knlens.core.versions import environment
from knlens.methods.attribution.result import Screen
from knlens.methods.attribution.screen import needed_layers
from knlens.methods.selection import best_by_mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare  # noqa: E402

RELATIONS = ("P36", "P1376")


def read_facts(model, per_relation: int, cache: Path | None) -> list[Fact]:
    if cache is not None and cache.is_file():
        return [Fact(**d) for d in json.loads(cache.read_text())]
    facts = []
    for rel in RELATIONS:
        read = load_pararel(rel, max_facts=150, min_paraphrases=3)
        known = known_facts(model, read, keep_prompts="correct", min_prompts=3)
        facts += [dataclasses.replace(f, prompts=f.prompts[:4]) for f in known[:per_relation]]
    if cache is not None:
        cache.write_text(json.dumps([{"prompts": list(f.prompts), "target": f.target, "name": f.name,
                                      "relation": f.relation, "subject": f.subject} for f in facts], indent=1))
    return facts


def cell_costs(model) -> list[float]:
    """Per layer, the matmul work of one cell entering there: the blocks from it up plus the unembedding."""
    block = sum(p.numel() for p in model.blocks[0].parameters() if p.ndim == 2)
    unembed = model.cfg.d_vocab * model.cfg.d_model
    L = model.cfg.n_layers
    return [(L - l) * block + unembed for l in range(L)]


def overlap(a, b) -> int:
    return len(set(a) & set(b))


def label(s: Screen) -> str:
    return f"{s.method}/top{s.top_k}"


def run_fact(model, fact: Fact, screens: list[Screen], repeat: int, warmup: bool, costs: list[float]) -> dict:
    def pipeline(screen):
        def go():
            attrs = attribute(model, fact, screen=screen)
            return attrs, refined_neurons(attrs, "dai"), best_by_mean(attrs, 20)
        return go
    sides = {"exact": pipeline(None), **{label(s): pipeline(s) for s in screens}}
    load = os.getloadavg()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScreenFallbackWarning)
        t = compare(sides, repeat=repeat, warmup=warmup)
    exact, refined, top = t["exact"].value
    need = needed_layers(exact, Screen())
    rec = {"fact": fact.name, "relation": fact.relation, "prompts": len(fact.prompts), "target": fact.target,
           "n_layers": model.cfg.n_layers,
           "load_before": load, "load_after": os.getloadavg()[0], "refined": sorted(map(tuple, refined)),
           "exact_times": t["exact"].times, "needed_layers": need,
           "needed_cost_share": sum(costs[l] for l in need) / sum(costs),
           "fallback_warnings": sum(issubclass(w.category, ScreenFallbackWarning) for w in caught), "sides": {}}
    for s in screens:
        attrs, ref, tp = t[label(s)].value
        c = attrs[0].screen
        done = sorted(attrs[0].layers)
        rec["sides"][label(s)] = {
            "times": t[label(s)].times, "refined_identical": set(ref) == set(refined),
            "refined": sorted(map(tuple, ref)), "top20_mean_overlap": overlap(tp, top),
            "top20_prompt_overlap": statistics.mean(overlap(a.top(20), e.top(20)) for a, e in zip(attrs, exact)),
            "layers": done, "fell_back": c.fell_back, "rounds": c.rounds, "why": c.why, "beta": c.beta,
            "skipped_mass": max(a.screen.skipped_mass for a in attrs),
            "bound_over_cut": max((a.screen.bound / (s.threshold * a.screen.top) for a in attrs if a.screen.top > 0),
                                  default=float("nan")),
            "cost_share": sum(costs[l] for l in done) / sum(costs), "screen": dataclasses.asdict(s),
            "needed_cost_share": sum(costs[l] for l in needed_layers(exact, s)) / sum(costs)}
    return rec


def summarize(path: Path) -> None:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    methods = list(recs[0]["sides"])
    n = len(recs)
    print(f"{n} facts, {sum(r['prompts'] for r in recs)} prompts; 1-minute load average during the runs: "
          f"{min(r['load_before'] for r in recs):.1f} to {max(r['load_after'] for r in recs):.1f}\n")
    head = "| fact | prompts | exact s (min / median) | " + " | ".join(
        f"{m}: s (min / median), ratio, layers exact, fell back, refined =, top-20 by mean, per prompt" for m in methods)
    print(head + " | perfect screen: layers (cell share) |")
    print("|---" * (3 + len(methods) + 1) + "|")
    for r in recs:
        et = r["exact_times"]
        cells = []
        for m in methods:
            s = r["sides"][m]
            cells.append(f"{min(s['times']):.1f} / {statistics.median(s['times']):.1f}, "
                         f"{min(et) / min(s['times']):.2f}x, {len(s['layers'])}, {'yes' if s['fell_back'] else 'no'}, "
                         f"{'yes' if s['refined_identical'] else 'NO'}, {s['top20_mean_overlap']}/20, "
                         f"{s['top20_prompt_overlap']:.1f}/20")
        print(f"| {r['fact']} | {r['prompts']} | {min(et):.1f} / {statistics.median(et):.1f} | " + " | ".join(cells)
              + f" | {len(r['needed_layers'])} ({r['needed_cost_share']:.0%}) |")
    ex_min = sum(min(r["exact_times"]) for r in recs)
    ex_med = sum(statistics.median(r["exact_times"]) for r in recs)
    print()
    for m in methods:
        sides = [r["sides"][m] for r in recs]
        mn = sum(min(s["times"]) for s in sides)
        md = sum(statistics.median(s["times"]) for s in sides)
        print(f"{m}: total exact / screened = {ex_min / mn:.2f}x on the minima ({ex_min:.0f} s / {mn:.0f} s), "
              f"{ex_med / md:.2f}x on the medians; refined neurons identical on "
              f"{sum(s['refined_identical'] for s in sides)} of {n} facts; top-20 by mean identical on "
              f"{sum(s['top20_mean_overlap'] == 20 for s in sides)} of {n} (mean overlap "
              f"{statistics.mean(s['top20_mean_overlap'] for s in sides):.1f}/20); fell back on "
              f"{sum(s['fell_back'] for s in sides)}, picked again on {sum(s.get('rounds', 1) > 1 for s in sides)}; "
              f"layers integrated exactly: mean "
              f"{statistics.mean(len(s['layers']) for s in sides):.1f} of {recs[0]['n_layers']}, cell-cost share "
              f"{statistics.mean(s['cost_share'] for s in sides):.0%} (a perfect screen with this guarantee: "
              f"{statistics.mean(s['needed_cost_share'] for s in sides):.0%})")
        kept = [s for s in sides if not s["fell_back"] and "bound_over_cut" in s]
        if kept:
            print(f"  beta (the screen's measured error): median {statistics.median(s['beta'] for s in sides):.3g}, "
                  f"max {max(s['beta'] for s in sides):.3g}; where the check passed, the largest bound of a left-out "
                  f"neuron was {max(s['bound_over_cut'] for s in kept):.2f} of the coarse cut (median "
                  f"{statistics.median(s['bound_over_cut'] for s in kept):.2f}) and the left-out layers carried at "
                  f"most {max(s['skipped_mass'] for s in kept):.1%} of a prompt's sum of |layer effects|")
    print(f"perfect screen for the same guarantee: mean {statistics.mean(len(r['needed_layers']) for r in recs):.1f} "
          f"layers, cell-cost share {statistics.mean(r['needed_cost_share'] for r in recs):.0%} "
          f"(min {min(r['needed_cost_share'] for r in recs):.0%}, max {max(r['needed_cost_share'] for r in recs):.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-relation", type=int, default=14, help="facts per relation (25 in all with the default)")
    ap.add_argument("--screens", nargs="+", default=["gauss2"], help="screen methods to compare with exact")
    ap.add_argument("--top-k", type=int, nargs="+", default=[Screen.top_k],
                    help="top k by mean each screen guarantees (one side per screen and k)")
    ap.add_argument("--safety", type=float, default=Screen.safety)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved timed calls per fact and side")
    ap.add_argument("--cache", type=Path, help="JSON file of the filtered facts (written, then read)")
    ap.add_argument("--out", type=Path, default=Path("screening.jsonl"), help="per-fact records (appended)")
    ap.add_argument("--summarize", type=Path, help="print the tables of a records file and exit")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"{platform.machine()} {os.cpu_count()} CPUs, {args.threads} threads; "
          + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    model = load_model("smollm2-135m")
    t0 = time.perf_counter()
    facts = read_facts(model, args.per_relation, args.cache)
    print(f"{len(facts)} facts ({time.perf_counter() - t0:.0f} s to read and filter)", flush=True)
    screens = [Screen(method=m, safety=args.safety, top_k=k) for m in args.screens for k in args.top_k]
    done = {json.loads(l)["fact"] for l in args.out.read_text().splitlines() if l.strip()} if args.out.is_file() else set()
    costs = cell_costs(model)
    first = True
    for fact in facts:
        if fact.name in done:
            continue
        rec = run_fact(model, fact, screens, args.repeat, warmup=first, costs=costs)
        first = False
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        s = rec["sides"]
        print(f"{fact.name}: exact {min(rec['exact_times']):.1f} s; " + "; ".join(
            f"{m} {min(v['times']):.1f} s ({min(rec['exact_times']) / min(v['times']):.2f}x), layers {len(v['layers'])}, "
            f"fell back {v['fell_back']}, refined identical {v['refined_identical']}, top-20 {v['top20_mean_overlap']}"
            for m, v in s.items()) + f"; perfect screen {len(rec['needed_layers'])} layers", flush=True)
    summarize(args.out)


if __name__ == "__main__":
    main()
