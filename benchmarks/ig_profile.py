"""Where the time of one IG scan goes on a GPU: torch.profiler over the fast engine on the Llama-8B-shaped model.

Run::

    python benchmarks/ig_profile.py [--layers 32] [--batch-size 1024] [--steps 20]

Prints why the staircase was or was not used (knlens' debug log), then the top operators by GPU time and by
CPU time, and the wall time of the profiled call.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ig_engines import LARGE_PROMPT, LARGE_TARGET, llama8b
from knlens import attribute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25, help="operators shown per table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("knlens").setLevel(logging.DEBUG)
    model = llama8b(args.layers, "cuda")

    def scan():
        a = attribute(model, [LARGE_PROMPT], LARGE_TARGET, steps=args.steps, engine="fast",
                      batch_size=args.batch_size, tolerance=None)[0]
        torch.cuda.synchronize()
        return a

    a = scan()  # warm-up
    print(f"engine that ran: {a.settings.engine} {a.settings.engine_note!r}")
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        scan()
    print(f"profiled scan: {time.perf_counter() - t:.2f} s")
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
