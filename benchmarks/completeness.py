"""Completeness error against grid and step count on the embedded models: the data behind the defaults of
adaptive integration (``attribute(..., tolerance=, max_steps=)``).

Run::

    .venv/bin/python benchmarks/completeness.py --model gemma3-270m --out gemma.jsonl
    .venv/bin/python benchmarks/completeness.py --model smollm2-135m --out smollm2.jsonl
    .venv/bin/python benchmarks/completeness.py --summarize gemma.jsonl smollm2.jsonl

For each model and the first prompt of each fact, integrated gradients (fast engine, P(target), zero
baseline, fixed grid: ``tolerance=None``) runs at doubling step counts for each rule; then the default call
(right, 20 steps) with adaptive integration at each ``--tolerances`` value. Every run is one JSON line:
relative completeness error Σ_l |Σ_i IG − Δ_l| / Σ_l |Δ_l|, the worst layer and its share of the error, the
grid and steps kept, the passes, and the wall time. ``--survey N`` runs only the default call, on every
prompt of the first N built-in facts. ``--summarize`` prints the Markdown tables of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

FACTS = ("capital-france", "language-france", "founder-steve-jobs", "country-tokyo")
SCHEDULES = {"right": (20, 40, 80, 160), "gauss-legendre": (8, 16, 32, 64, 128)}


def _row(model_name: str, name: str, a, wall: float, grid: str, steps: int, tolerance: float | None) -> dict:
    from knlens.core.versions import environment

    err = a.completeness_error
    return {"model": model_name, "fact": name, "prompt": a.prompt, "p_target": a.clean_value, "grid": grid,
            "steps": steps, "tolerance": tolerance, "kept": f"{a.settings.grid} {a.settings.steps}",
            "passes": a.settings.refinement, "relative_error": a.relative_completeness_error,
            "worst_layer": a.layers[int(err.argmax())], "worst_share": float(err.max() / err.sum().clamp_min(1e-30)),
            "delta_sum": float(a.delta.abs().sum()), "wall_s": wall, "engine": a.settings.engine,
            "versions": environment()}


def measure(model_name: str, facts: list[str], grids: list[str], tolerances: list[float], out: Path,
            batch_size: int) -> None:
    from knlens import attribute, get_fact, load_model

    model = load_model(model_name)
    with out.open("a") as fh:
        for name in facts:
            fact = get_fact(name)
            prompt = fact.prompts[0]
            for grid in grids:
                for steps in SCHEDULES[grid]:
                    t0 = time.perf_counter()
                    a = attribute(model, [prompt], fact.target, steps=steps, grid=grid, batch_size=batch_size,
                                  tolerance=None)[0]
                    row = _row(model_name, name, a, time.perf_counter() - t0, grid, steps, None)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(f"{model_name} {name} {grid} {steps}: relative error {row['relative_error']:.3g} "
                          f"(worst layer {row['worst_layer']}, {row['worst_share']:.0%}), {row['wall_s']:.1f} s",
                          flush=True)
            for tol in tolerances:
                t0 = time.perf_counter()
                a = attribute(model, [prompt], fact.target, batch_size=batch_size, tolerance=tol)[0]
                row = _row(model_name, name, a, time.perf_counter() - t0, "adaptive", 20, tol)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"{model_name} {name} adaptive tolerance {tol}: {row['passes']} ({row['wall_s']:.1f} s)",
                      flush=True)


def survey(model_name: str, n_facts: int, out: Path, batch_size: int) -> None:
    """The default call (right 20, tolerance 0.05) on every prompt of the first ``n_facts`` built-in facts."""
    from knlens import attribute, builtin_facts, load_model

    model = load_model(model_name)
    with out.open("a") as fh:
        for fact in builtin_facts()[:n_facts]:
            t0 = time.perf_counter()
            attrs = attribute(model, fact, batch_size=batch_size)
            wall = (time.perf_counter() - t0) / len(attrs)
            for a in attrs:
                row = {**_row(model_name, fact.name, a, wall, "survey", 20, a.settings.tolerance), "prompt": a.prompt}
                fh.write(json.dumps(row) + "\n")
                print(f"{model_name} {fact.name} {a.prompt!r}: {row['passes']}", flush=True)
            fh.flush()


EXTRA_CELLS = {"right": 1, "left": 1, "linspace": 0, "trapezoid": 0, "midpoint": 2, "gauss-legendre": 2}


def _nodes(passes: str) -> int:
    """Cells per layer of all passes ("right 20: 0.05 -> gauss-legendre 20: 0.01"): each pass also runs
    α = 0 and α = 1 where its grid lacks them (the completeness and self checks)."""
    return sum(int(steps) + EXTRA_CELLS[grid] for grid, steps in
               (p.split(":")[0].rsplit(" ", 1) for p in passes.split(" -> ")))


def summarize(paths: list[Path]) -> None:
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    fixed: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("tolerance") is None:
            fixed[(r["model"], r["fact"], r["grid"])][r["steps"]] = r
    print("Fixed grids: relative completeness error at each step count\n")
    print("| model | fact | P(target) | rule | steps: error |\n|---|---|---|---|---|")
    for (model, fact, grid), by_steps in sorted(fixed.items()):
        p = next(iter(by_steps.values()))["p_target"]
        cells = ", ".join(f"{m}: {r['relative_error']:.2g}" for m, r in sorted(by_steps.items()))
        print(f"| {model} | {fact} | {p:.3f} | {grid} | {cells} |")
    print("\nAdaptive (the default call: right 20, then Gauss-Legendre from 20 nodes, doubling, up to 128)\n")
    print("| model | fact | tolerance | passes (grid steps: error) | kept | cells per layer | wall s |\n"
          "|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["grid"] == "adaptive"),
                    key=lambda r: (r["model"], r["fact"], -r["tolerance"])):
        print(f"| {r['model']} | {r['fact']} | {r['tolerance']:g} | {r['passes']} | {r['kept']} | "
              f"{_nodes(r['passes'])} | {r['wall_s']:.0f} |")
    surveyed = defaultdict(list)
    for r in rows:
        if r["grid"] == "survey":
            surveyed[r["model"]].append(r)
    if surveyed:
        print("\nSurvey: the default call on every prompt of the first built-in facts\n")
        print("| model | prompts | right 20 error: median (max) | refined | kept | final error: median (max) | "
              "cells per layer: mean (max) |\n|---|---|---|---|---|---|---|")
    for model, rs in sorted(surveyed.items()):
        first = sorted(float(r["passes"].split(" -> ")[0].split(": ")[1]) for r in rs)
        final = sorted(r["relative_error"] for r in rs)
        kept = defaultdict(int)
        for r in rs:
            kept[r["kept"]] += 1
        cells = [_nodes(r["passes"]) for r in rs]
        n = len(rs)
        print(f"| {model} | {n} | {first[n // 2]:.3g} ({first[-1]:.3g}) | {sum('->' in r['passes'] for r in rs)} | "
              + ", ".join(f"{k}: {v}" for k, v in sorted(kept.items())) + f" | {final[n // 2]:.3g} ({final[-1]:.3g}) | "
              f"{sum(cells) / n:.0f} ({max(cells)}) |")
    versions = {json.dumps(r["versions"], sort_keys=True) for r in rows}
    print("\nversions: " + "; ".join(" ".join(f"{k} {v}" for k, v in json.loads(v).items()) for v in versions))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--facts", nargs="+", default=list(FACTS))
    ap.add_argument("--grids", nargs="*", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--tolerances", nargs="*", type=float, default=[0.05, 0.02])
    ap.add_argument("--out", type=Path, default=Path("completeness.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--survey", type=int, metavar="N",
                    help="only the default call on every prompt of the first N built-in facts")
    ap.add_argument("--summarize", nargs="+", type=Path, metavar="JSONL")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    torch.set_num_threads(args.threads)
    if args.survey:
        survey(args.model, args.survey, args.out, args.batch_size)
        return
    measure(args.model, args.facts, args.grids, args.tolerances, args.out, args.batch_size)


if __name__ == "__main__":
    main()
