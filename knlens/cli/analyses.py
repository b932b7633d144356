"""The ``knlens trace`` and ``knlens consistency`` subcommands (added to the main CLI by :mod:`knlens.cli`).

``knlens trace`` — causal tracing of one prompt (methods.md §9)::

    knlens trace --fact capital-france --kinds mlp attn --samples 3 --out trace-out
    knlens trace --prompt "The Eiffel Tower is located in" --target " Paris" --subject "The Eiffel Tower"

``knlens consistency`` — consistency of knowledge neurons across paraphrases (methods.md §4)::

    knlens consistency --fact capital-france --fact capital-germany --steps 8 --out cons-out
    knlens consistency --relation P36 --max-facts 10 --steps 8 --mapping --out cons-out

Both print readable tables and, with ``--out DIR``, write JSON / CSV / PNG files there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from knlens.cli.main import output_dir
from knlens.core.errors import CommandLineError, OutputError

__all__ = ["add_trace_parser", "add_consistency_parser", "trace_command", "consistency_command"]


def _say(args: argparse.Namespace, *msg: Any) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, file=sys.stderr, flush=True)


def _table(frame: Any, **kw: Any) -> str:
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.max_columns", 30, "display.width", 160):
        return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", **kw)


def _builtin(name: str) -> Any:
    from knlens.data.builtin import UnknownFactError, builtin_facts, get_fact

    names = [f.name for f in builtin_facts()]
    if name not in names:
        raise UnknownFactError(f"unknown fact {name!r}; built-in facts: {', '.join(names)}")
    return get_fact(name)


def _load(args: argparse.Namespace) -> Any:
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    from knlens.core.models import load_model

    _say(args, f"loading model {args.model} ...")
    return load_model(args.model)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model, tiny test model, local folder or hub name (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="write the results (JSON, CSV, PNG) to this folder")
    p.add_argument("--quiet", action="store_true", help="no progress or status messages (tables still print)")


# -------------------------------------------------------------------------------------------- trace

def add_trace_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``trace`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "trace", help="causal tracing: which (layer, token) states of MLP / attention carry a fact",
        description="Corrupt the subject (or relation) tokens' embeddings, restore one clean state per "
                    "(layer, token) and kind, and report the indirect effect P_restored - P_corrupted "
                    "(Meng et al., 2022). Cells run as batch rows; the default fast engine starts each at "
                    "its first restored layer and runs only the tokens from the restored one on.")
    _common(p)
    p.add_argument("--fact", metavar="NAME", help="a built-in fact (its first prompt unless --prompt-index)")
    p.add_argument("--prompt", metavar="P", help="the prompt to trace (with --target and --subject)")
    p.add_argument("--target", metavar="T", help="the target continuation, e.g. ' Paris'")
    p.add_argument("--subject", metavar="S", help="the subject as written in the prompt")
    p.add_argument("--subject-span", metavar=("START", "END"), type=int, nargs=2,
                   help="explicit [START, END) token span of the subject (BOS is token 0)")
    p.add_argument("--prompt-index", type=int, default=0, help="which prompt of --fact (default: %(default)s)")
    p.add_argument("--kinds", nargs="+", default=["resid", "mlp", "attn"], choices=["resid", "mlp", "attn"],
                   help="states to restore (default: all three)")
    p.add_argument("--corrupt", default="subject", choices=["subject", "relation"],
                   help="which tokens are corrupted (default: %(default)s)")
    p.add_argument("--corruption", default="noise", choices=["noise", "replace", "substitute"],
                   help="noise: + nu*N(0,I); replace: mean embedding; substitute: --other's tokens")
    p.add_argument("--other", metavar="S2", help="substitute subject (same number of tokens)")
    p.add_argument("--samples", type=int, default=10,
                   help="noise samples averaged (default: %(default)s, as Meng et al.)")
    p.add_argument("--noise-factor", type=float, default=3.0,
                   help="nu = factor x std of the token embeddings (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--window", type=int, help="layers restored around each cell (default: 1 resid, 10 mlp/attn)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward (default: %(default)s)")
    p.add_argument("--engine", default="fast", choices=["fast", "batched", "reference"],
                   help="fast (default), batched, or reference (one plain forward per cell); an engine that "
                        "disagrees with plain forwards of the model is replaced by the next one, with a warning")
    p.add_argument("--allow-unknown", action="store_true",
                   help="trace even when the model's top prediction is not the target (default: refuse, as "
                        "Meng et al. trace only known facts)")
    p.set_defaults(func=trace_command)
    return p


def trace_command(args: argparse.Namespace) -> int:
    """Run ``knlens trace``: print the trace's summary tables, write trace.{json,safetensors,csv,png}."""
    from knlens.core.errors import TracingSettingError
    from knlens.methods.tracing.corruption import Corruption
    from knlens.methods.tracing.trace import trace

    if args.fact and (args.prompt or args.target):
        raise CommandLineError("give either --fact NAME or --prompt P --target T, not both")
    if args.fact:
        fact = _builtin(args.fact)
        if not 0 <= args.prompt_index < len(fact.prompts):
            raise CommandLineError(f"--prompt-index {args.prompt_index} outside the fact's {len(fact.prompts)} prompts")
        prompt, target, subject = fact.prompts[args.prompt_index], fact.target, args.subject or fact.subject
    else:
        if not args.prompt or args.target is None:
            raise CommandLineError("no prompt given: use --fact NAME or --prompt P --target T --subject S")
        prompt, target, subject = args.prompt, args.target, args.subject
    if subject is None and args.subject_span is None:
        raise CommandLineError("tracing needs the subject: pass --subject S (as written in the prompt) or --subject-span")
    if args.samples < 1:
        raise CommandLineError(f"--samples must be at least 1, got {args.samples}")
    if args.corruption == "substitute" and not args.other:
        raise CommandLineError("--corruption substitute needs --other (another subject with as many tokens)")
    for flag, value in (("--window", args.window), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise TracingSettingError(f"{flag} must be at least 1, got {value}")
    corruption = Corruption(args.corruption, factor=args.noise_factor, seed=args.seed,
                            samples=args.samples if args.corruption == "noise" else 1, other=args.other)
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot write to --out {str(out)!r}: {err.strerror or err}") from err
        if not os.access(out, os.W_OK):
            raise OutputError(f"cannot write to --out {str(out)!r}: permission denied")
    model = _load(args)
    _say(args, f"tracing {prompt!r} -> {target!r} (corrupting the {args.corrupt}, kinds {', '.join(args.kinds)})")
    t = trace(model, prompt, target, kinds=args.kinds, corruption=corruption, corrupt=args.corrupt,
              subject=subject, subject_span=tuple(args.subject_span) if args.subject_span else None,
              window=args.window, batch_size=args.batch_size, engine=args.engine, known_only=not args.allow_unknown)
    print(format_trace(t), flush=True)
    if out is not None:
        t.save(out / "trace")
        t.to_frame().to_csv(out / "trace.csv", index=False)
        fig = t.plot()
        fig.savefig(out / "trace.png", dpi=120)
        print(f"\nwrote {out / 'trace.json'}, {out / 'trace.safetensors'}, {out / 'trace.csv'}, {out / 'trace.png'}")
    return 0


def format_trace(t: Any) -> str:
    """The text the ``trace`` command prints: probabilities, then per kind the best layer of each token."""
    import pandas as pd

    lines = [f"prompt   {t.prompt!r} -> {t.target!r}",
             f"P clean {t.p_clean:.4f}   P corrupted {t.p_corrupted:.4f}   total effect {t.total_effect:+.4f}",
             f"engine {t.settings['engine']}" + (f" ({t.settings['engine_note']})" if t.settings.get("engine_note")
                                                  else "") + f"   noise samples {t.settings['samples']}",
             f"corrupted tokens {[t.tokens[i] for i in t.corrupted]} (positions {list(t.corrupted)})", ""]
    groups = t.groups()
    for kind, eff in t.effects.items():
        rows = []
        for pos, tok in enumerate(t.tokens):
            col = eff[:, pos]
            rows.append({"pos": pos, "token": tok, "group": groups[pos], "best layer": int(col.argmax()),
                         "max effect": float(col.max()), "mean effect": float(col.mean())})
        w = t.settings.get("windows", {}).get(kind, 1)
        lines.append(f"{kind} (window {w}): indirect effect P_restored - P_corrupted")
        lines.append(_table(pd.DataFrame(rows)))
        lines.append("")
    return "\n".join(lines).rstrip()


# ------------------------------------------------------------------------------------- consistency

def add_consistency_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``consistency`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "consistency", help="consistency of knowledge neurons across paraphrases (query localization)",
        description="Per fact: integrated gradients for every paraphrase, the coarse neurons of each, their "
                    "mean pairwise Jaccard and Niu's similarity; the share of inconsistent facts under Otsu's threshold "
                    "and a static one; within- versus between-fact similarity (facts of one relation) and a "
                    "bimodality test of the scores (Chen et al., ICLR 2025).")
    _common(p)
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
    p.set_defaults(func=consistency_command)
    return p


def _read_facts(args: argparse.Namespace) -> list[Any]:
    """The facts named on the command line with two prompts or more, read before the model is loaded (a bad
    name or a missing data folder fails at once)."""
    facts = [_builtin(n) for n in (args.fact or [])]
    if args.prompt:
        if args.target is None:
            raise CommandLineError("--prompt needs --target")
        from knlens.core.facts import Fact

        facts.append(Fact(tuple(args.prompt), args.target, name="prompts"))
    for rel in args.relation or []:
        from knlens.data.pararel import load_pararel

        kw = {"data_dir": args.data_dir} if args.data_dir else {}
        facts += list(load_pararel(rel, max_facts=args.max_facts, **kw))
    if not facts:
        raise CommandLineError("no facts: pass --fact NAME (repeatable) or --relation PID")
    facts = [f for f in facts if len(f.prompts) >= 2]
    if not facts:
        raise CommandLineError("consistency compares a fact's paraphrases: give facts with at least two prompts")
    return facts


def _facts_for(args: argparse.Namespace, model: Any, facts: list[Any]) -> list[Any]:
    """``facts`` the model answers on at least two prompts (all of them with --all-facts)."""
    if not args.all_facts:
        from knlens.methods.known import known_facts

        n = len(facts)
        facts = known_facts(model, facts, keep_prompts="correct", min_prompts=2)
        _say(args, f"{len(facts)} of {n} facts answered correctly on at least two prompts")
    if not facts:
        raise CommandLineError("no fact with at least two (correctly answered) prompts; try --all-facts")
    return facts


def consistency_command(args: argparse.Namespace) -> int:
    """Run ``knlens consistency``: per-fact and summary tables; consistency.json, facts.csv, summary.csv."""
    import pandas as pd

    from knlens.core.errors import InsufficientDataError
    from knlens.studies.consistency import consistency_study
    from knlens.studies.query_localization import mapping_summary, query_kn_mapping

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
    out = output_dir(args.out) if args.out else None
    facts = _read_facts(args)
    model = _load(args)
    facts = _facts_for(args, model, facts)
    _say(args, f"attributing {sum(len(f.prompts) for f in facts)} prompts of {len(facts)} facts (steps {args.steps})")
    study = consistency_study(model, facts, steps=args.steps, threshold=args.threshold, top_k=args.top_k,
                              static_threshold=args.static_threshold, progress=not args.quiet)
    frame, summary = study.to_frame(), study.summary()
    print("per fact (jaccard = mean pairwise Jaccard of the prompts' coarse neurons; niu = Niu similarity)")
    print(_table(frame[["fact", "n_prompts", "mean_neurons", "intersection_neurons", "jaccard", "niu",
                        "consistent_jaccard_otsu", "consistent_jaccard_static"]]))
    print("\nconsistent (score >= threshold) and inconsistent facts")
    print(_table(summary[["score", "threshold", "value", "n_consistent", "n_inconsistent", "share_inconsistent"]]))
    tests = []
    for score in ("jaccard", "niu"):
        for name, test in (("within - between fact", study.within_between_test), ("bimodality", study.bimodality)):
            try:
                tests.append({"test": name, **test(score)})
            except InsufficientDataError as err:
                _say(args, f"no {name} test of {score}: {err}")
    if tests:
        print("\nwithin-fact vs between-fact similarity (paired permutation test); unimodality of the scores")
        print(_table(pd.DataFrame(tests).reindex(columns=["test", "score", "n", "within", "between", "mean",
                                                          "h_crit", "p"])))
    mapping = None
    if args.mapping:
        parts = [query_kn_mapping(model, fact, list(fc.sets)) for fact, fc in zip(facts, study.facts)]
        mapping = pd.concat(parts, ignore_index=True)
        print("\nquery-KN mapping: suppress (x0) neurons on each query; relative change of P(target)")
        print(_table(mapping_summary(mapping)))
    if out is not None:
        study.save(out / "consistency.json")
        frame.to_csv(out / "facts.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        written = ["consistency.json", "facts.csv", "summary.csv"]
        if mapping is not None:
            mapping.to_csv(out / "mapping.csv", index=False)
            written.append("mapping.csv")
        if len(frame) >= 2:
            study.plot().savefig(out / "consistency.png", dpi=120)
            written.append("consistency.png")
        (out / "settings.json").write_text(json.dumps(study.settings, indent=1, default=str))
        print(f"\nwrote {', '.join(str(out / w) for w in written)}")
    return 0
