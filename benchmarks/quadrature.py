"""How many integration steps each quadrature rule needs, against a high-step reference (SmolLM2-135M).

Run::

    .venv/bin/python benchmarks/quadrature.py [--facts 2] [--ref-steps 256] [--threads 2]

For each built-in fact (its first prompt) the reference is Gauss–Legendre at ``--ref-steps`` nodes. For
each rule (right, left, linspace, midpoint, trapezoid, gauss-legendre) the script tries increasing step
counts and reports the smallest that reaches (a) the reference's top-20 neurons exactly and (b) a relative
completeness error below 1 % (Σ_l |Σ_i IG − Δ_l| / Σ_l |Δ_l|). Note that ``linspace`` (EleutherAI's grid:
m points including both ends, each weighted 1/m) is biased and does not converge to the integral's exact
value as fast as the others. The last column is the cost relative to the rule's step count at the
pinned default m = 20.
"""

from __future__ import annotations

import argparse
import time

import torch

from knlens import attribute, load_model
from knlens.methods.attribution.grids import GRIDS

CANDIDATES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128)


def facts(n: int):
    try:
        from knlens.data.builtin import builtin_facts
        return [(f.name, f.prompts[0], f.target) for f in builtin_facts()[:n]]
    except ImportError:  # the data module is optional here
        plain = [("capital-france", "The capital of France is", " Paris"),
                 ("capital-germany", "The capital of Germany is", " Berlin")]
        return plain[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--facts", type=int, default=2)
    ap.add_argument("--ref-steps", type=int, default=256)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    table = []
    t0 = time.perf_counter()
    for name, prompt, target in facts(args.facts):
        ref = attribute(model, [prompt], target, steps=args.ref_steps, grid="gauss-legendre", tolerance=None,
                        batch_size=args.batch_size)[0]
        ref_top = set(ref.top(args.top))
        print(f"{name}: reference gauss-legendre {args.ref_steps}: completeness error "
              f"{ref.relative_completeness_error:.2e}, P = {ref.clean_value:.4f}", flush=True)
        for grid in GRIDS:
            found_top = found_comp = None
            for m in CANDIDATES:
                if grid == "trapezoid" and m < 2:
                    continue
                a = attribute(model, [prompt], target, steps=m, grid=grid, batch_size=args.batch_size,
                              tolerance=None)[0]
                same_top = set(a.top(args.top)) == ref_top
                comp = a.relative_completeness_error
                if same_top and found_top is None:
                    found_top = m
                if comp < 0.01 and found_comp is None:
                    found_comp = m
                if found_top is not None and found_comp is not None:
                    break
            table.append((name, grid, found_top, found_comp))
            print(f"  {grid:15s} top-{args.top} = reference at m = {found_top}; completeness < 1 % at m = "
                  f"{found_comp}", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)\n")
    print(f"| fact | rule | steps for reference top-{args.top} | steps for completeness < 1 % | "
          "steps for both | cost vs m = 20 |")
    print("|---|---|---|---|---|---|")
    for name, grid, mt, mc in table:
        both = None if mt is None or mc is None else max(mt, mc)
        fmt = lambda v: f"> {CANDIDATES[-1]}" if v is None else str(v)  # noqa: E731
        cost = "—" if both is None else f"{(both + 1) / 21:.2f}"
        print(f"| {name} | {grid} | {fmt(mt)} | {fmt(mc)} | {fmt(both)} | {cost} |")


if __name__ == "__main__":
    main()
