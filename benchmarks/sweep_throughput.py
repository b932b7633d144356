"""Locate throughput over a ParaRel relation, and what the sweep (store, scheduling) adds to it.

Run::

    .venv/bin/python benchmarks/sweep_throughput.py [--data pararel:P36] [--facts 20] [--threads 2]
                                                    [--keep-prompts correct] [--min-prompts 4]

On the embedded model (SmolLM2-135M): the relation's facts go through the known filter
(:func:`knlens.known_facts`, timed), then the first ``--facts`` known facts are located by
``knlens sweep locate`` (the Dai pipeline with its controls: refinement, suppress/enhance against uniform and
magnitude-matched random sets, held-out prompts, other relations' facts) into a fresh store. One warm-up
locate on a fact outside the measured set runs first, untimed (one-time costs).

Printed: facts per minute of the sweep (wall time of ``sweep``, the model already loaded) and with the known
filter included; the sweep's overhead, ``(wall − Σ task time) / Σ task time``, where a task's time is measured
around the study call inside the sweep, so that the difference is exactly what the store and the scheduling
add; the mean time of each locate stage (the result's ``timings``); the load average before and after, since
the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import knlens
from knlens.core.versions import environment
from knlens.store import Store
from knlens.sweeps import sweep
from knlens.sweeps.plan import read_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="pararel:P36")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-prompts", default="correct", choices=["all", "correct"])
    ap.add_argument("--min-prompts", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("versions:", "  ".join(f"{k} {v}" for k, v in environment().items()))
    print(f"load average before: {os.getloadavg()}  threads {args.threads}")
    model = knlens.load_model(args.model)
    facts = read_facts(args.data)
    clock = time.perf_counter()
    known = knlens.known_facts(model, facts, keep_prompts=args.keep_prompts, min_prompts=args.min_prompts)
    known_s = time.perf_counter() - clock
    print(f"{args.data}: {len(facts)} facts, {len(known)} known (keep_prompts={args.keep_prompts!r}, "
          f"min_prompts={args.min_prompts}) in {known_s:.1f} s ({len(facts) / known_s * 60:.0f} facts/min screened)")
    if len(known) < args.facts + 1:
        raise SystemExit(f"only {len(known)} known facts; ask for at most {len(known) - 1}")
    warm, measured = known[-1], known[:args.facts]
    knlens.locate(model, warm, progress=False)
    with tempfile.TemporaryDirectory() as store:
        clock = time.perf_counter()
        report = sweep("locate", measured, model, store, progress=False)
        wall = time.perf_counter() - clock
        tasks = Store(store).tasks()
        results = [Store(store).load(k) for k in report.keys]
    task_s = float(tasks["seconds"].sum())
    prompts = [len(f.prompts) for f in measured]
    print(f"located {report.done} facts ({report.failed} failed), prompts per fact: mean "
          f"{statistics.mean(prompts):.1f}, min {min(prompts)}, max {max(prompts)}")
    print(f"sweep wall {wall:.1f} s, sum of task times {task_s:.1f} s, mean {task_s / len(measured):.1f} s a fact")
    print(f"throughput: {len(measured) / wall * 60:.2f} facts/min (sweep); "
          f"{len(measured) / (wall + known_s * len(measured) / len(facts)) * 60:.2f} facts/min with the known "
          f"filter's share")
    print(f"sweep overhead: {(wall - task_s) / task_s * 100:.2f} % of the study time ({wall - task_s:.2f} s)")
    stages = {k: statistics.mean(r.timings[k] for r in results) for k in results[0].timings}
    print("mean seconds per locate stage:", "  ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    engines = sorted({r.settings.engine_label for r in results})
    print(f"engines that ran: {engines}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
