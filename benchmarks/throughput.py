"""Throughput of locate over a ParaRel relation on the embedded model (issue 10): facts per minute before and
after batching, where the time goes, and the overhead of a sweep.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/throughput.py [--relation P36] [--read 60] [--facts 3] [--repeat 2]
        [--threads 2] [--parts filter,locate,sweep]

* ``filter`` — ``load_pararel(relation, max_facts=--read, seed=0)`` and the known filter. A fact is kept when the
  model answers at least 3 of its paraphrases, with those paraphrases (``known_facts(keep_prompts="correct",
  min_prompts=3)``, the query-localization study's rule; on P36 the model answers *every* paraphrase of almost
  no fact). Timed before (one plain forward of every (prompt, target token) row, one fact at a time: the code
  before issue 10) and after (``answers_many``: one row per prompt, many facts per batch).
* ``locate`` — the first ``--facts`` known facts located with :func:`knlens.locate`'s default settings (IG
  m = 20 right Riemann, adaptive up to 128 Gauss–Legendre nodes; dai refinement; 50 uniform + 50 matched random
  controls; leave-one-out held-out prompts; specificity on the 72 built-in facts of other relations), up to three
  sides (``--sides``) interleaved (benchmarks/timing.py: min and median of ``--repeat`` runs, after one small warm-up call
  each): ``before`` — one query row at a time and every suppress / enhance row a plain forward (the code
  before issue 10, by patching this code's row grouping to single rows and its interventions to the
  reference engine); ``after`` — each fact's rows of one length grouped, interventions on the fast engine;
  ``together`` — :func:`knlens.locate_facts` (the facts' rows attributed together). Printed:
  facts per minute, the time per stage (attribution, in-sample interventions, held-out, specificity,
  activations, the rest) and the largest differences between the sides' numbers.
* ``sweep`` — the same facts through ``sweep("locate", ...)`` into a fresh store, against ``locate`` called in
  a loop, interleaved; and, inside each sweep, its wall time minus the study time the store records: the
  overhead of the store and the scheduling, in % of the study time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import torch

import knlens
from knlens.core.errors import CompletenessWarning
from knlens.core.tokens import encode, stack
from knlens.data.pararel import load_pararel
from knlens.methods import interventions, scaling, specificity
from knlens.methods.attribution import cells
from knlens.methods.known import known_facts
from knlens.methods.specificity import other_relation_facts
from knlens.run.engine import target_logits
from knlens.store import Store
from knlens.sweeps import sweep
from timing import Timing, compare

STAGES = ("attribute_s", "interventions_s", "held_out_s", "specificity_s", "activations_s")


@contextlib.contextmanager
def one_prompt_at_a_time() -> Iterator[None]:
    """The code before issue 10's batching: integrated gradients one query row at a time, and every suppress /
    enhance (set, row) pair a plain forward (the interventions' reference engine: the old ``intervene``)."""
    def singles(q: Any, size: int | None = None) -> list[torch.Tensor]:
        return [torch.tensor([i]) for i in range(len(q))]

    def reference(*args: Any, **kwargs: Any) -> Any:
        return scaling.scaled_probs(*args, **{**kwargs, "engine": "reference"})

    with mock.patch.object(cells, "row_groups", singles), \
            mock.patch.object(interventions, "scaled_probs", reference), \
            mock.patch.object(specificity, "scaled_probs", reference):
        yield


@torch.no_grad()
def known_before(model: Any, facts: Sequence[knlens.Fact]) -> list[knlens.Fact]:
    """The known filter before issue 10: per fact, one plain forward of all its teacher-forced rows."""
    kept = []
    for fact in facts:
        q = encode(model, list(fact.prompts), fact.target)
        hit = (target_logits(model, q).argmax(-1) == q.target).cpu()
        ok = [bool(hit[(q.prompt_index == i).cpu()].all()) for i in range(len(fact.prompts))]
        if sum(ok) >= 3:
            kept.append(knlens.Fact([p for p, o in zip(fact.prompts, ok) if o], fact.target, subject=fact.subject,
                                    relation=fact.relation, name=fact.name))
    return kept


def per_min(n: int, t: Timing) -> str:
    return f"{60 * n / t.min:.2f} (median {60 * n / t.median:.2f})"


def stage_table(results: dict[str, list[Any]], wall: dict[str, float]) -> None:
    print("\n| side | " + " | ".join(s.removesuffix("_s") for s in STAGES) + " | rest | total s |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    for side, res in results.items():
        t = {s: sum(r.timings.get(s, 0.0) for r in res) for s in STAGES}
        rest = wall[side] - sum(t.values())
        cells_ = [f"{t[s]:.0f} ({100 * t[s] / wall[side]:.0f} %)" for s in STAGES]
        print(f"| {side} | " + " | ".join(cells_) + f" | {rest:.0f} ({100 * rest / wall[side]:.0f} %) | {wall[side]:.0f} |")


def differences(results: dict[str, list[Any]], base: str) -> None:
    print(f"\nagainst {base!r}: largest |Δ score| / max |score|, |Δ p_after|, refined sets equal")
    for side, res in results.items():
        if side == base:
            continue
        score = max(float((a.scores - b.scores).abs().max() / b.scores.abs().max())
                    for x, y in zip(res, results[base]) for a, b in zip(x.attributions, y.attributions))
        p = max(float((x.interventions.frame.p_after - y.interventions.frame.p_after).abs().max())
                for x, y in zip(res, results[base]))
        same = sum(x.neurons == y.neurons for x, y in zip(res, results[base]))
        print(f"  {side}: {score:.2e}, {p:.2e}, {same}/{len(res)}")


def part_filter(model: Any, args: argparse.Namespace) -> list[knlens.Fact]:
    clock = time.perf_counter()
    facts = load_pararel(args.relation, max_facts=args.read, seed=0)
    read = time.perf_counter() - clock
    t = compare({"before": lambda: known_before(model, facts),
                 "after": lambda: known_facts(model, facts, keep_prompts="correct", min_prompts=3)},
                repeat=args.repeat, warmup=False)
    before, after = t["before"].value, t["after"].value
    print(f"\n## Known filter: {args.relation}, {len(facts)} facts read in {read:.2f} s, "
          f"{sum(len(f.prompts) for f in facts)} prompts")
    for side in t:
        print(f"  {side}: {len(t[side].value)} known, min {t[side].min:.1f} s, median {t[side].median:.1f} s "
              f"({t[side].min / len(facts):.2f} s per fact read)")
    same = [f.prompts for f in before] == [f.prompts for f in after]
    print(f"  same facts and prompts kept: {same}")
    return after


def part_locate(model: Any, facts: list[knlens.Fact], args: argparse.Namespace) -> None:
    n = len(facts)
    print(f"\n## Locate, default settings: {n} facts ({', '.join(f.name or '?' for f in facts)}), prompts "
          f"{[len(f.prompts) for f in facts]}")
    small = dict(steps=2, n_random=2, progress=False, specificity=False, tolerance=None)
    with one_prompt_at_a_time():  # warm-up: one-time costs of both code paths
        knlens.locate(model, facts[0], **small)
    knlens.locate(model, facts[0], **small)

    def before() -> list[Any]:
        with one_prompt_at_a_time():
            return [knlens.locate(model, f, progress=False) for f in facts]

    sides = {"before": before,
             "after": lambda: [knlens.locate(model, f, progress=False) for f in facts],
             "together": lambda: list(knlens.locate_facts(model, facts, progress=False))}
    sides = {k: v for k, v in sides.items() if k in args.sides}
    t = compare(sides, repeat=args.repeat, warmup=False)
    print("\n| side | facts/min, min (median) | s per fact, min | runs, s |")
    print("|---|---|---|---|")
    for side, timing in t.items():
        print(f"| {side} | {per_min(n, timing)} | {timing.min / n:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in timing.times)} |")
    if {"before", "after", "together"} <= set(t):
        print(f"speed-up after / before: {t['before'].min / t['after'].min:.2f}x (median "
              f"{t['before'].median / t['after'].median:.2f}x); facts together / before: "
              f"{t['before'].min / t['together'].min:.2f}x")
    results = {side: timing.value for side, timing in t.items()}
    stage_table(results, {side: timing.times[-1] for side, timing in t.items()})
    clock = time.perf_counter()
    for f in facts:  # what locate tokenizes: the fact, and the other relations' facts for specificity
        encode(model, list(f.prompts), f.target)
        others, _ = other_relation_facts(model, f)
        stack([encode(model, list(o.prompts), o.target) for o in [f, *others]])
    print(f"tokenization (the fact, and the {len(others)} other facts of specificity, twice): "
          f"{(time.perf_counter() - clock) / n:.2f} s per fact")
    differences(results, next(iter(results)))
    engines = {(r.settings.engine, r.interventions.settings.engine, r.specificity.settings.engine)
               for r in results[list(results)[-1]]}
    print(f"engines that ran (IG, interventions, specificity), {list(results)[-1]!r}: {sorted(engines)}")


def part_sweep(model: Any, facts: list[knlens.Fact], args: argparse.Namespace) -> None:
    n = len(facts)
    overhead: list[float] = []

    def run_sweep() -> Any:
        with tempfile.TemporaryDirectory() as d:
            report = sweep("locate", facts, model, d, progress=False)
            study = float(Store(d).sql("select sum(seconds) s from tasks where status = 'done'").s[0])
            overhead.append((report.seconds - study) / study)
            return report

    t = compare({"loop": lambda: [knlens.locate(model, f, progress=False) for f in facts], "sweep": run_sweep},
                repeat=args.repeat, warmup=False)
    print(f"\n## Sweep overhead: {n} facts, locate with default settings")
    for side, timing in t.items():
        print(f"  {side}: min {timing.min:.1f} s, median {timing.median:.1f} s ({', '.join(f'{x:.0f}' for x in timing.times)})")
    print(f"  sweep / loop − 1: {100 * (t['sweep'].min / t['loop'].min - 1):+.1f} % (medians "
          f"{100 * (t['sweep'].median / t['loop'].median - 1):+.1f} %): the two sides' noise, not only the overhead")
    print(f"  inside each sweep, (wall − study time recorded in the store) / study time: "
          f"{', '.join(f'{100 * o:.2f} %' for o in overhead)} (median {100 * statistics.median(overhead):.2f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relation", default="P36")
    ap.add_argument("--read", type=int, default=60, help="ParaRel facts read (a random subset, seed 0)")
    ap.add_argument("--facts", type=int, default=3, help="known facts located")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="filter,locate,sweep")
    ap.add_argument("--sides", default="before,after,together", type=lambda v: v.split(","),
                    help="locate sides to time, comma-separated: before, after, together")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", CompletenessWarning)
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {args.threads} threads, knlens {knlens.__version__}")
    model = knlens.load_model("smollm2-135m")
    if "filter" in parts:
        facts = part_filter(model, args)
    else:
        facts = known_facts(model, load_pararel(args.relation, max_facts=args.read, seed=0),
                            keep_prompts="correct", min_prompts=3)
    facts = facts[:args.facts]
    if "locate" in parts:
        part_locate(model, facts, args)
    if "sweep" in parts:
        part_sweep(model, facts, args)


if __name__ == "__main__":
    main()
