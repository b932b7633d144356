"""Causal tracing: knlens' engines vs one forward per cell (``knlens.methods.tracing.trace.trace``), same numbers.

Run::

    .venv/bin/python benchmarks/trace_vs_loop.py [--threads 2] [--samples 10] [--fact capital-france]
                                                 [--prompt-index 0] [--model smollm2-135m]

The reference is the per-cell loop of Meng et al. (the ROME code): one forward of the ``samples`` noised
copies of the whole prompt for every (token, layer) cell of every kind. All engines run the same trace
(three kinds: residual, MLP, attention; windows 1/10/10; the same seeded noise):

* ``reference, every cell`` — one plain forward per cell, every token (``engine="reference"``,
  ``skip_prefix=False``);
* ``reference``         — one plain forward per cell, only the tokens from the first corrupted one on (earlier
  cells cannot change anything: causal attention);
* ``batched``           — those cells as batch rows of whole-model forwards;
* ``fast`` (default)    — those cells as rows of a staircase: a cell restoring layers ``[a, b)`` at token
  ``t`` starts at block ``a`` from the corrupted run and runs tokens ``t..`` only, reading the corrupted
  keys/values of earlier tokens.

Before ``fast`` and ``batched`` run their cells they are checked against plain forwards of the model (the
cells restoring nothing and everything must give P_corrupted and P_clean); those checks are part of the
measured times. The script stops if an engine fell back to another one.

The script prints the library versions and the load average, wall times, the speed-ups over the reference
and the largest difference of every engine's effects from the reference's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from knlens import load_model
from knlens.data.builtin import get_fact
from knlens.methods.tracing.trace import trace
from knlens.core.versions import environment

ENGINES = (("reference, every cell", dict(engine="reference", skip_prefix=False)),
           ("reference", dict(engine="reference")),
           ("batched", dict(engine="batched")),
           ("fast", dict(engine="fast")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fact", default="capital-france", help="a built-in fact (knlens.data.get_fact)")
    ap.add_argument("--prompt-index", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="rows (cells × samples) per forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    fact = get_fact(args.fact)
    prompt, target, subject = fact.prompts[args.prompt_index], fact.target, fact.subject
    tiny = args.model.startswith("tiny")  # a random model knows no fact: trace it anyway
    if tiny:
        prompt, target, subject = prompt.lower(), target.lower(), subject.lower()
    print("versions:", "  ".join(f"{k} {v}" for k, v in environment().items()), flush=True)
    out, times = {}, {}
    for name, kw in ENGINES:
        load = os.getloadavg()[0]
        t = time.perf_counter()
        out[name] = trace(model, prompt, target, subject=subject, samples=args.samples, seed=0,
                          batch_size=args.batch_size, known_only=not tiny, **kw)
        times[name] = time.perf_counter() - t
        assert out[name].settings.engine == kw["engine"], f"the engine fell back: {out[name].settings.engine_note}"
        print(f"  {name:21s} {times[name]:7.2f} s   (1-min load average {load:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after)", flush=True)
    ref = out[ENGINES[0][0]]
    n_tok = len(ref.tokens)
    first = min(ref.corrupted)
    n_cells = {name: ref.effects["resid"].shape[0] * (n_tok if not kw.get("skip_prefix", True) else n_tok - first)
               * len(ref.kinds) for name, kw in ENGINES}
    print(f"\n{args.model}, {prompt!r} → {target!r} (subject {subject!r}), {n_tok} tokens, first corrupted "
          f"token {first}; 3 kinds, windows 1/10/10, {args.samples} noise samples, {args.threads} threads; "
          f"P clean {ref.p_clean:.4f}, corrupted {ref.p_corrupted:.4f}")
    print("| engine | cells run | wall s | speed-up vs reference, every cell | vs reference | max abs effect difference |")
    print("|---|---|---|---|---|---|")
    for name, _ in ENGINES:
        diff = max(float((out[name].effects[k] - ref.effects[k]).abs().max()) for k in ref.kinds)
        print(f"| {name} | {n_cells[name]} | {times[name]:.2f} | {times[ENGINES[0][0]] / times[name]:.1f}x | "
              f"{times['reference'] / times[name]:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
