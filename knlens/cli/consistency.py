"""``knlens consistency``: consistency of knowledge neurons across paraphrases (docs/methods.md, consistency across paraphrases).

    knlens consistency --fact capital-france --fact capital-germany --steps 8 --out cons-out
    knlens consistency --relation P36 --max-facts 10 --steps 8 --mapping --out cons-out
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from knlens.cli.common import (add_common_options, builtin_fact, load_model, output_dir, save_figure, say, table,
                               write_outputs)
from knlens.core.errors import CommandLineError, InsufficientDataError
from knlens.core.facts import Fact
from knlens.data.pararel import load_pararel
from knlens.methods.known import known_facts
from knlens.studies.consistency import ConsistencyStudy, consistency_study
from knlens.studies.query_localization import mapping_summary, query_kn_mapping

__all__ = ["add_parser", "run"]


def _check_numbers(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise CommandLineError(f"--steps must be at least 1, got {args.steps}")
    if not 0 < args.threshold <= 1:
        raise CommandLineError(f"--threshold must be in (0, 1], got {args.threshold}")
    if not 0 <= args.static_threshold <= 1:
        raise CommandLineError(f"--static-threshold must be in [0, 1], got {args.static_threshold}")
    if args.max_facts < 1:
        raise CommandLineError(f"--max-facts must be at least 1, got {args.max_facts}")
    if args.top_k is not None and args.top_k < 1:
        raise CommandLineError(f"--top-k must be at least 1, got {args.top_k}")


def _read_facts(args: argparse.Namespace) -> list[Fact]:
    """The facts named on the command line with two prompts or more, read before the model is loaded (a bad
    name or a missing data folder fails at once)."""
    facts = [builtin_fact(n) for n in (args.fact or [])]
    if args.prompt:
        if args.target is None:
            raise CommandLineError("--prompt needs --target")
        facts.append(Fact(tuple(args.prompt), args.target, name="prompts"))
    for rel in args.relation or []:
        kw = {"data_dir": args.data_dir} if args.data_dir else {}
        facts += list(load_pararel(rel, max_facts=args.max_facts, **kw))
    if not facts:
        raise CommandLineError("no facts: pass --fact NAME (repeatable) or --relation PID")
    facts = [f for f in facts if len(f.prompts) >= 2]
    if not facts:
        raise CommandLineError("consistency compares a fact's paraphrases: give facts with at least two prompts")
    return facts


def _known(args: argparse.Namespace, model: Any, facts: list[Fact]) -> list[Fact]:
    """``facts`` the model answers on at least two prompts (all of them with --all-facts)."""
    if not args.all_facts:
        n = len(facts)
        facts = known_facts(model, facts, keep_prompts="correct", min_prompts=2)
        say(args, f"{len(facts)} of {n} facts answered correctly on at least two prompts")
    if not facts:
        raise CommandLineError("no fact with at least two (correctly answered) prompts; try --all-facts")
    return facts


def _tests(args: argparse.Namespace, study: ConsistencyStudy) -> pd.DataFrame | None:
    """Within- vs between-fact similarity and bimodality of both scores; the tests that cannot run are said."""
    rows = []
    for score in ("jaccard", "niu"):
        for name, test in (("within - between fact", study.within_between_test), ("bimodality", study.bimodality)):
            try:
                rows.append({"test": name, **test(score)})
            except InsufficientDataError as err:
                say(args, f"no {name} test of {score}: {err}")
    if not rows:
        return None
    return pd.DataFrame(rows).reindex(columns=["test", "score", "n", "within", "between", "mean", "h_crit", "p"])


def _mapping(model: Any, facts: Sequence[Fact], study: ConsistencyStudy) -> pd.DataFrame:
    """The query-KN mapping rows of every fact (suppress own / paraphrase / intersection sets on each query).
    The only call of :func:`~knlens.studies.query_localization.query_kn_mapping` in the command line."""
    return pd.concat([query_kn_mapping(model, fact, list(fc.sets)).frame for fact, fc in zip(facts, study.facts)],
                     ignore_index=True)


def run(args: argparse.Namespace) -> int:
    """Run ``knlens consistency``: per-fact and summary tables; with ``--out``, save the study, facts.csv,
    summary.csv (mapping.csv with --mapping, consistency.png from two facts)."""
    _check_numbers(args)
    out = output_dir(args.out) if args.out else None
    facts = _read_facts(args)
    model = load_model(args)
    facts = _known(args, model, facts)
    say(args, f"attributing {sum(len(f.prompts) for f in facts)} prompts of {len(facts)} facts (steps {args.steps})")
    study = consistency_study(model, facts, steps=args.steps, threshold=args.threshold, top_k=args.top_k,
                              static_threshold=args.static_threshold, progress=not args.quiet)
    frame, summary = study.to_frame(), study.summary()
    print("per fact (jaccard = mean pairwise Jaccard of the prompts' coarse neurons; niu = Niu similarity)")
    print(table(frame[["fact", "n_prompts", "mean_neurons", "intersection_neurons", "jaccard", "niu",
                       "consistent_jaccard_otsu", "consistent_jaccard_static"]]))
    print("\nconsistent (score >= threshold) and inconsistent facts")
    print(table(summary[["score", "threshold", "value", "n_consistent", "n_inconsistent", "share_inconsistent"]]))
    tests = _tests(args, study)
    if tests is not None:
        print("\nwithin-fact vs between-fact similarity (paired permutation test); unimodality of the scores")
        print(table(tests))
    mapping = _mapping(model, facts, study) if args.mapping else None
    if mapping is not None:
        print("\nquery-KN mapping: suppress (x0) neurons on each query; relative change of P(target)")
        print(table(mapping_summary(mapping)))
    if out is not None:
        extras: dict[str, Callable[[Path], object]] = {
            "facts.csv": lambda p: frame.to_csv(p, index=False),
            "summary.csv": lambda p: summary.to_csv(p, index=False)}
        if mapping is not None:
            extras["mapping.csv"] = lambda p: mapping.to_csv(p, index=False)
        if len(frame) >= 2:
            extras["consistency.png"] = lambda p: save_figure(study.plot(), p)
        write_outputs(out, study, extras)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``consistency`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "consistency", help="consistency of knowledge neurons across paraphrases (query localization)",
        description="Per fact: integrated gradients for every paraphrase, the coarse neurons of each, their "
                    "mean pairwise Jaccard and Niu's similarity; the share of inconsistent facts under Otsu's "
                    "threshold and a static one; within- versus between-fact similarity (facts of one relation) "
                    "and a bimodality test of the scores (Chen et al., ICLR 2025).")
    add_common_options(p, out_help="write the study (result.json, tensors.safetensors), facts.csv, summary.csv, "
                                   "mapping.csv and consistency.png there")
    p.add_argument("--fact", metavar="NAME", action="append", help="a built-in fact (repeat for several)")
    p.add_argument("--prompt", metavar="P", action="append", help="a prompt of one fact (repeat for paraphrases)")
    p.add_argument("--target", metavar="T", help="the target of the --prompt fact, e.g. ' Paris'")
    p.add_argument("--relation", metavar="PID", action="append",
                   help="a ParaRel relation such as P36 (repeat); reads ../shared/data or --data-dir")
    p.add_argument("--data-dir", metavar="DIR", help="ParaRel data folder (default: knlens.data's default)")
    p.add_argument("--max-facts", type=int, default=10, help="facts per relation (default: %(default)s)")
    p.add_argument("--all-facts", action="store_true",
                   help="keep facts the model gets wrong (default: only facts whose every prompt is answered)")
    p.add_argument("--steps", type=int, default=8, help="integration steps (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="coarse neurons: score >= threshold x max (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="keep at most K coarse neurons per prompt")
    p.add_argument("--static-threshold", type=float, default=0.3,
                   help="static consistency threshold (default: %(default)s)")
    p.add_argument("--mapping", action="store_true",
                   help="also suppress own / paraphrase / intersection neurons on every query (query-KN mapping)")
    p.set_defaults(run=run)
    return p
