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
FLOPs is the speed-up an ideal implementation of each schedule would see.

The same comparison then runs on a random model of Llama-3.1-8B's shape (32 blocks, d 4096, d_mlp 14336,
vocab 128256; bf16 weights built directly on the GPU; IG path points and gradients in float32) when CUDA
is available, with the achieved FLOP/s as a fraction of the GPU's dense bf16 peak. Without CUDA it is
skipped and says so; ``--large-device cpu --large-layers 2`` runs the same code on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import time

import torch

from knlens import attribute, load_model, random_model
from knlens.core.tokens import encode
from knlens.run.precision import LOG_FLOOR, NOISE_FACTOR, self_disagreement

PROMPT = "The capital of France is the city of"
TARGET = " Paris"
LARGE_PROMPT = "the official language of the country of france is"  # the word-level test vocabulary
LARGE_TARGET = " french"


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


def run(model, prompts: list[str], target: str, engine: str, layers: list[int], steps: int, batch_size: int):
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    attr = attribute(model, prompts, target, layers=layers, steps=steps, engine=engine, batch_size=batch_size,
                     tolerance=None)[0]  # a fixed grid: every engine runs the same cells
    sync()
    return time.perf_counter() - t, attr


def variants(prompt: str, n: int) -> list[str]:
    """``n`` prompts of the same words as ``prompt`` (same token count), the last word kept, the others rotated:
    rows of equal length, which the engines run through one staircase."""
    words = prompt.split()
    head, last = words[:-1], words[-1]
    return [" ".join(head[i % len(head):] + head[:i % len(head)] + [last]) for i in range(n)]


def compare(model, name: str, prompt: str, target: str, args, peak: float | None = None) -> None:
    """Reference, batched and fast on a layer subset; batched and fast on every layer; print the table."""
    prompts = variants(prompt, args.prompts)
    n_tok = encode(model, [prompt], target).tokens.shape[1]
    L = model.cfg.n_layers
    subset = sorted({round(i * (L - 1) / max(1, args.layers_ref - 1)) for i in range(args.layers_ref)})
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{name}: {L} layers, d_mlp {model.cfg.d_mlp}, {dtype} weights on {next(model.parameters()).device}; "
          f"{len(prompts)} prompt(s) of {n_tok} tokens; m = {args.steps}; {torch.get_num_threads()} CPU threads; "
          f"reference subset {subset}")
    q = encode(model, [prompt], target)
    noise = self_disagreement(model, q.tokens, int(q.position[0]), int(q.target[0]), args.batch_size)
    print(f"  plain forward alone vs as one of {args.batch_size} rows: {noise.quantity:.3g} nats in P, {noise.logits:.3g} "
          f"in the logits apart (the engine checks' "
          f"half-precision tolerance is {NOISE_FACTOR:g}x this, at least {LOG_FLOOR} nats)")
    run(model, prompts, target, "fast", subset[:1], 2, args.batch_size)  # warm-up (kernels, caches)
    rows = []
    results = {}
    for layers, engines in ((subset, ("reference", "batched", "fast")), (list(range(L)), ("batched", "fast"))):
        for engine in engines:
            dt, attr = run(model, prompts, target, engine, layers, args.steps, args.batch_size)
            results[(engine, len(layers))] = attr
            cells = len(prompts) * len(layers) * (args.steps + 1)
            toks = cells * (n_tok if engine == "reference" else 1)
            fl = len(prompts) * flops(engine, model, layers, args.steps, n_tok)
            rows.append((engine, len(layers), dt, cells / dt, toks / dt, fl / 1e9, fl / dt / 1e9))
            ran = attr.settings.engine + (f" ({attr.settings.engine_note})" if attr.settings.engine_note else "")
            print(f"  {engine:9s} {len(layers):2d} layers: {dt:7.2f} s; engine that ran: {ran}", flush=True)
    ref = results[("reference", len(subset))]
    frac = " | fraction of peak" if peak else ""
    print(f"\n| engine | layers | wall s | cells/s | token positions/s | est. GFLOP | achieved GFLOP/s | speed-up{frac} |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if peak else ""))
    base = {n: next(r[2] for r in rows if r[1] == n and r[0] == ("reference" if n == len(subset) else "batched"))
            for n in {r[1] for r in rows}}
    for engine, n, dt, cps, tps, gfl, gfs in rows:
        vs = "vs reference" if n == len(subset) else "vs batched"
        extra = f" | {gfs * 1e9 / peak:.1%}" if peak else ""
        print(f"| {engine} | {n} | {dt:.2f} | {cps:.1f} | {tps:.1f} | {gfl:.1f} | {gfs:.2f} | "
              f"{base[n] / dt:.2f}x {vs}{extra} |")
    for engine in ("batched", "fast"):
        a = results[(engine, len(subset))]
        err = float((a.scores - ref.scores).abs().max() / ref.scores.abs().max())
        print(f"max |{engine} − reference| / max |reference| = {err:.2e} (computed in {a.settings.dtype})")
    fr = flops("reference", model, subset, args.steps, n_tok) / flops("fast", model, subset, args.steps, n_tok)
    print(f"FLOP ratio reference/fast on the subset: {fr:.1f}x\n")


# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def llama8b(layers: int, device: str):
    """A random model of Llama-3.1-8B's shape (``layers`` of its 32 blocks), bf16 weights on ``device``."""
    from transformers import LlamaConfig

    return random_model(LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        dtype=torch.bfloat16, device=device, name=f"llama-8b-shape-{layers}-layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers-ref", type=int, default=6, help="layers the reference engine runs")
    ap.add_argument("--prompts", type=int, default=1,
                    help="prompts of equal length attributed in one call (they share the engines' batches)")
    ap.add_argument("--batch-size", type=int, default=256, help="cells per chunk (the library default)")
    ap.add_argument("--large-device", help="device of the Llama-8B-shaped run (default: cuda when available)")
    ap.add_argument("--large-layers", type=int, default=32, help="blocks of the Llama-8B-shaped model")
    ap.add_argument("--no-embedded", action="store_true", help="skip the SmolLM2-135M comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_embedded:
        compare(load_model("smollm2-135m"), "smollm2-135m", PROMPT, TARGET, args)
    device = args.large_device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("No CUDA device: the Llama-8B-shaped bf16 run is skipped (pass --large-device cpu "
              "--large-layers 2 for a CPU smoke run of the same code).")
        return
    peak = None
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        print(f"{gpu}: dense bf16 peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    model = llama8b(args.large_layers, device)
    args.layers_ref = min(args.layers_ref, args.large_layers)
    compare(model, f"llama-8b-shaped ({args.large_layers} blocks)", LARGE_PROMPT, LARGE_TARGET, args, peak)


if __name__ == "__main__":
    main()
