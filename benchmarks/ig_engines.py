"""knlens IG engines side by side on the embedded model (SmolLM2-135M): reference vs batched vs fast.

Run::

    .venv/bin/python benchmarks/ig_engines.py [--threads 2] [--layers-ref 6] [--steps 20]

* ``reference`` — per-layer loop, full sequence per (layer, step) cell (the published codes' schedule);
* ``batched``   — all cells as batch rows, prefix key/value cache, one token per row through all blocks;
* ``fast``      — as batched, and rows patched at layer l start at block l (staircase), shared prefix.

The reference engine is slow, so it runs on ``--layers-ref`` evenly spaced layers; batched and fast run
on the same subset and on the full 30-layer scan. Printed per run: wall time, (layer, step) cells per
second, token positions run per second, the estimated FLOPs each engine executes (2·MACs of the block
and unembedding matmuls, forward plus input-gradient backward) and the achieved FLOP/s. The ratio of
FLOPs is the speed-up an ideal implementation of each schedule would see. The Llama-8B-shaped GPU run
needs CUDA; it is skipped (and says so) without one.
"""

from __future__ import annotations

import argparse
import time

import torch

from knlens import attribute, load_model
from knlens.prompts import encode

PROMPT = "The capital of France is the city of"
TARGET = " Paris"


def macs(model) -> tuple[int, int]:
    """Multiply-accumulates per token of one block's matmuls, and of the unembedding."""
    block = sum(p.numel() for p in model.blocks[0].parameters() if p.ndim == 2)
    return block, model.cfg.d_vocab * model.cfg.d_model


def flops(engine: str, model, layers: list[int], steps: int, n_tok: int) -> float:
    """Estimated FLOPs an engine executes for one prompt (attention score terms ignored: short prompts)."""
    block, unembed = macs(model)
    L = model.cfg.n_layers
    cells = steps + 1  # the α = 0 cell of the completeness check
    total = 0.0
    for l in layers:
        above = L - l
        if engine == "fast":
            fwd, bwd = above * block + unembed, above * block + unembed
        elif engine == "batched":
            fwd, bwd = L * block + unembed, above * block + unembed
        else:  # reference: the whole sequence, logits at every position
            fwd, bwd = n_tok * (L * block + unembed), n_tok * (above * block + unembed)
        total += cells * 2 * (fwd + bwd)
    return total


def run(model, engine: str, layers: list[int], steps: int, batch_size: int):
    t = time.perf_counter()
    attr = attribute(model, [PROMPT], TARGET, layers=layers, steps=steps, engine=engine, batch_size=batch_size)[0]
    return time.perf_counter() - t, attr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers-ref", type=int, default=6, help="layers the reference engine runs")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    n_tok = encode(model, [PROMPT], TARGET).tokens.shape[1]
    L = model.cfg.n_layers
    subset = sorted({round(i * (L - 1) / max(1, args.layers_ref - 1)) for i in range(args.layers_ref)})
    print(f"smollm2-135m: {L} layers, d_mlp {model.cfg.d_mlp}; prompt {n_tok} tokens; m = {args.steps}; "
          f"{args.threads} threads; reference subset {subset}")
    rows = []
    results = {}
    for layers, engines in ((subset, ("reference", "batched", "fast")), (list(range(L)), ("batched", "fast"))):
        for engine in engines:
            dt, attr = run(model, engine, layers, args.steps, args.batch_size)
            results[(engine, len(layers))] = attr
            cells = len(layers) * (args.steps + 1)
            toks = cells * (n_tok if engine == "reference" else 1)
            fl = flops(engine, model, layers, args.steps, n_tok)
            rows.append((engine, len(layers), dt, cells / dt, toks / dt, fl / 1e9, fl / dt / 1e9))
            print(f"  {engine:9s} {len(layers):2d} layers: {dt:7.2f} s", flush=True)
    ref = results[("reference", len(subset))]
    print("\n| engine | layers | wall s | cells/s | token positions/s | est. GFLOP | achieved GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    base = {n: next(r[2] for r in rows if r[1] == n and r[0] == ("reference" if n == len(subset) else "batched"))
            for n in {r[1] for r in rows}}
    for engine, n, dt, cps, tps, gfl, gfs in rows:
        vs = "vs reference" if n == len(subset) else "vs batched"
        print(f"| {engine} | {n} | {dt:.2f} | {cps:.1f} | {tps:.1f} | {gfl:.1f} | {gfs:.2f} | "
              f"{base[n] / dt:.2f}x {vs} |")
    for engine in ("batched", "fast"):
        a = results[(engine, len(subset))]
        err = float((a.scores - ref.scores).abs().max() / ref.scores.abs().max())
        print(f"max |{engine} − reference| / max |reference| = {err:.2e}")
    fr = flops("reference", model, subset, args.steps, n_tok) / flops("fast", model, subset, args.steps, n_tok)
    print(f"FLOP ratio reference/fast on the subset: {fr:.1f}x")
    if torch.cuda.is_available():
        print("CUDA found: the Llama-8B-shaped GPU run is not implemented in this script yet.")
    else:
        print("No CUDA device: the Llama-8B-shaped GPU run is skipped.")


if __name__ == "__main__":
    main()
