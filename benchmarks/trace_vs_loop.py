"""Causal tracing: batched cells vs one forward per cell (``knlens.patching.trace``, both engines).

Run::

    .venv/bin/python benchmarks/trace_vs_loop.py [--threads 2] [--samples 10] [--model smollm2-135m]

Meng et al.'s loop runs one forward per (token, layer, kind) cell (each a batch of ``samples`` noised
copies); knlens' ``engine="batched"`` puts the cells into the batch. Both engines run the same trace
(three kinds: residual, MLP, attention; windows 1/10/10; the same seeded noise) on a built-in fact; the
script prints wall times, the ratio and the largest difference of the effects (they must be identical).
"""

from __future__ import annotations

import argparse
import time

import torch

from knlens import load_model
from knlens.patching import trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    prompt, target, subject = "The capital of France is", " Paris", "France"
    if args.model.startswith("tiny"):
        prompt, target, subject = "the capital of france is", " paris", "france"
    out, times = {}, {}
    for engine in ("batched", "loop"):
        t = time.perf_counter()
        out[engine] = trace(model, prompt, target, subject=subject, samples=args.samples, seed=0,
                            engine=engine, batch_size=args.batch_size)
        times[engine] = time.perf_counter() - t
        print(f"  {engine:8s} {times[engine]:.2f} s", flush=True)
    diff = max(float((out["batched"].effects[k] - out["loop"].effects[k]).abs().max()) for k in out["loop"].kinds)
    n_cells = sum(int(e.numel()) for e in out["loop"].effects.values())
    print(f"\n{args.model}, prompt {len(out['loop'].tokens)} tokens, {n_cells} cells (3 kinds), "
          f"{args.samples} noise samples, {args.threads} threads")
    print("| engine | wall s | speed-up | max |effect difference| |")
    print("|---|---|---|---|")
    print(f"| loop (one forward per cell) | {times['loop']:.2f} | 1.0x | — |")
    print(f"| batched | {times['batched']:.2f} | {times['loop'] / times['batched']:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
