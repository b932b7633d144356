"""Peak memory of a full-model IG scan against ``batch_size`` (the (layer, step) cells run together).

Run::

    .venv/bin/python benchmarks/memory.py [--threads 2] [--steps 20] [--quick]

Every configuration runs in a fresh Python process, which builds its model, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), runs ``knlens.attribute`` over every layer (engine ``"fast"``, m
steps) on one prompt, and reads the peak resident set (``VmHWM``). Printed per configuration: the peak
while building the model, resident memory with it loaded, the peak during the scan, their difference
(the scan's working memory), the completeness error and the wall time. Models:

* ``smollm2-135m`` — the embedded model (30 layers, d_mlp 1536, vocab 49152);
* ``llama-1b`` — a random model of Llama-3.2-1B's shape (16 layers, d 2048, d_mlp 8192, 32 heads / 8
  key-value heads, vocab 128256, tied embeddings: 1.24 B parameters), float32 weights (4.6 GiB), built
  in memory with the word-level test tokenizer.

The claim checked: memory grows with ``batch_size`` and not with the number of cells, and a 1 B-parameter
model's full scan fits in 8 GiB (weights included). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30
PROMPTS = {"smollm2-135m": ("The capital of France is the city of", " Paris"),
           "llama-1b": ("the official language of the country of france is", " french")}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(name: str):
    import torch
    from transformers import LlamaConfig

    from knlens import load_model, random_model

    if name == "llama-1b":
        return random_model(LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=2, eos_token_id=3, pad_token_id=0), dtype=torch.float32, name="llama-1b-random")
    return load_model(name)


def child(spec: dict) -> dict:
    import torch

    from knlens import attribute

    torch.set_num_threads(spec["threads"])
    model = _build(spec["model"])
    n_params = sum(p.numel() for p in model.parameters())
    prompt, target = PROMPTS[spec["model"]]
    loaded, build_peak = _status("VmRSS"), _status("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    attr = attribute(model, [prompt], target, steps=spec["steps"], batch_size=spec["batch_size"], tolerance=None)[0]
    dt = time.perf_counter() - t
    peak = _status("VmHWM")
    return {**spec, "params": n_params, "cells": len(attr.layers) * (spec["steps"] + 1),
            "loaded": loaded, "build_peak": build_peak,
            "peak": peak, "wall": dt, "completeness": attr.relative_completeness_error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="two batch sizes per model")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    plan = {"smollm2-135m": [1, 16, 64, 256, 1024], "llama-1b": [8, 64, 256, 512]}
    if args.quick:
        plan = {k: [v[0], v[-1]] for k, v in plan.items()}
    rows = []
    for model, sizes in plan.items():
        for bs in sizes:
            spec = {"model": model, "batch_size": bs, "steps": args.steps, "threads": args.threads}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"configuration {spec} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"  {model} batch {bs}: peak {r['peak'] / GiB:.2f} GiB, {r['wall']:.1f} s", flush=True)
    print(f"\nIG full scan (every layer, m = {args.steps} + the α = 0 cell, engine fast), {args.threads} threads, "
          f"one prompt per model")
    print("| model | parameters | cells | batch_size | peak while building GiB | RSS loaded GiB | peak in scan GiB "
          "| scan working set GiB | completeness error | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['cells']} | {r['batch_size']} | "
              f"{r['build_peak'] / GiB:.2f} | {r['loaded'] / GiB:.2f} | {r['peak'] / GiB:.2f} | "
              f"{(r['peak'] - r['loaded']) / GiB:.2f} | {r['completeness']:.3f} | {r['wall']:.1f} |")
    big = [r for r in rows if r["model"] == "llama-1b" and r["batch_size"] <= 256]
    if big:
        fits = max(max(r["peak"], r["build_peak"]) for r in big) / GiB
        print(f"\n1 B-parameter model, batch_size ≤ 256 (the default): the process never exceeded {fits:.2f} GiB, "
              f"building included ({'within' if fits <= 8 else 'ABOVE'} 8 GiB)")


if __name__ == "__main__":
    main()
