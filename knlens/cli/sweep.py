"""``knlens sweep``: run a study over a data set into a results store, resumable (README, Sweeps).

    knlens sweep locate --data pararel:P36 --model smollm2-135m --store runs/ --max-facts 20 --known-only
    knlens sweep trace --data builtin:capital --store runs/ --set samples=3 --set 'kinds=["mlp"]'
    knlens sweep locate --data pararel:P36 --store runs/ --retry-failed
    knlens sweep locate --data pararel:P36 --store runs/ --executor ray --ray-address HEAD:6379 --workers 8
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from knlens.cli.common import DEFAULT_MODEL, say
from knlens.core.errors import CommandLineError
from knlens.store.store import Store
from knlens.sweeps.executors import EXECUTORS
from knlens.sweeps.plan import STUDIES, get_study, parse_setting, read_facts
from knlens.sweeps.sweep import sweep

__all__ = ["add_parser", "run", "EXIT_FAILED_TASKS"]

EXIT_FAILED_TASKS = 1
"""The exit status of a sweep that ran to its end with failed tasks (recorded in the store)."""


def run(args: argparse.Namespace) -> int:
    """Run ``knlens sweep``: everything is checked (study, settings, data spec, store) before the model loads;
    prints the summary line; exit 1 when tasks failed (their errors are in the store: ``knlens query``)."""
    if args.max_facts is not None and args.max_facts < 1:
        raise CommandLineError(f"--max-facts must be at least 1, got {args.max_facts}")
    study = get_study(args.study)
    settings = study.check(dict(parse_setting(s) for s in args.set or []))
    facts = read_facts(args.data, max_facts=args.max_facts, data_dir=args.data_dir)
    if not facts:
        raise CommandLineError(f"the data spec {args.data!r} gives no facts")
    store = Store(args.store)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    say(args, f"sweep {study.name}: {len(facts)} facts from {args.data}, model {args.model}, store {store.path}")
    report = sweep(study, facts, args.model, store, settings=settings, known_only=args.known_only,
                   retry_failed=args.retry_failed, progress=not args.quiet, executor=args.executor,
                   ray_address=args.ray_address, workers=args.workers, worker_cpus=args.worker_cpus)
    for problem in store.problems():
        say(args, f"warning: {problem}")
    print(report.summary(), flush=True)
    return EXIT_FAILED_TASKS if report.failed else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sweep`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "sweep", help="run a study over a data set into a results store (resumable)",
        description="One task per (study, fact, model, settings), filed in the store under its content key as "
                    "soon as it ends; tasks already stored are skipped, so a killed sweep resumes where it "
                    "stopped. Failed tasks are recorded with their error; --retry-failed runs them again. "
                    "Exit status 1 when tasks failed. Query the store with 'knlens query'.")
    p.add_argument("study", choices=sorted(STUDIES), help="; ".join(f"{n}: {s.doc}" for n, s in sorted(STUDIES.items())))
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="pararel:P36,P1376 | mpararel:LANG:P36 | builtin | builtin:capital,currency")
    p.add_argument("--store", required=True, metavar="DIR", help="the results store folder (created when new)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="embedded model (smollm2-135m, gemma3-270m), tiny test model, local folder or hub name "
                        "(default: %(default)s)")
    p.add_argument("--max-facts", type=int, metavar="N", help="at most N facts of each relation")
    p.add_argument("--known-only", action="store_true",
                   help="only the facts the model answers on every prompt (knlens.known_facts)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a setting of the study (its keyword argument; VALUE as JSON or text), repeatable: "
                        "--set steps=8 --set n_random=20")
    p.add_argument("--retry-failed", action="store_true", help="run the tasks that failed before again")
    p.add_argument("--data-dir", metavar="DIR", help="where ParaRel / mParaRel are (default: $KNLENS_DATA or "
                                                     "../shared/data)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary still prints)")
    ray = p.add_argument_group("executor", "where the tasks run; this process files every result in --store")
    ray.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: one task after the other in this process (default); ray: on Ray workers, one "
                          "actor per worker holding the model (needs pip install 'knlens[ray]')")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="a running Ray cluster, HOST:PORT of its head node (or ray://HOST:10001); checked before any "
                          "work (default: $RAY_ADDRESS, else Ray starts on this machine)")
    ray.add_argument("--workers", type=int, metavar="N",
                     help="Ray workers, each loading the model once (default: the cluster's CPUs / --worker-cpus)")
    ray.add_argument("--worker-cpus", type=float, default=1, metavar="C",
                     help="CPUs each Ray worker reserves and uses as torch threads (default: %(default)s)")
    p.set_defaults(run=run)
    return p
