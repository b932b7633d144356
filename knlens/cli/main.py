"""The ``knlens`` command line.

    knlens locate --fact capital-france --out knlens-out
    knlens locate --model tiny-llama --prompt "the capital of france is" --target " paris" --steps 4
    knlens locate --list-facts

Bad input (an unknown model or fact, a target outside the vocabulary, an empty prompt, ...) prints one
line ``error: ...`` on stderr and exits with status 2. Progress bars go to stderr, tables to stdout.
Further subcommands (``trace``, ``consistency``) come from :mod:`knlens.cli.analyses` when it is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from knlens.core.errors import CommandLineError, KnlensError, OutputError
from knlens.core.versions import __version__

__all__ = ["main", "build_parser", "format_result", "output_dir"]

EXIT_BAD_INPUT = 2

BadInput = CommandLineError  # a problem with the command line itself


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad choice, a value that is not a number, an unknown option) are one
    ``error: ...`` line like every other misuse, not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def output_dir(path: str) -> Path:
    """The ``--out`` folder, created now (with its parents) and checked to be writable, so that a bad path
    fails before the model is loaded: :class:`~knlens.core.errors.OutputError` otherwise."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {path!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to --out {path!r}: {err.strerror or err}") from err
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return text or type(err).__name__


# ---------------------------------------------------------------- terminal output
def _fmt_frame(frame: Any, **kwargs: Any) -> str:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        return frame.to_string(index=False, float_format=lambda x: f"{x:.4g}", **kwargs)


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _pct(frame: Any, cols: Sequence[str]) -> Any:
    out = frame.copy()
    for col in cols:
        out[col] = out[col].map(lambda x: "" if x != x else f"{100 * x:+.1f}%")
    return out


def _effects_text(effects: Any) -> str:
    eff = effects.assign(control=effects["control"].replace("", "-"))
    return _indent(_fmt_frame(_pct(eff, ["relative", "relative_std", "delta"])))


def _selection_text(result: Any) -> str:
    sel, n = result.selection, len(result.attributions)
    if not sel:
        return ""
    adapted = f" after {sel['rounds']} rounds of adaptation for this fact alone" if sel["rounds"] else ""
    need = (f"coarse in >= {sel['min_prompts']} of {n} prompts" if sel["min_prompts"] <= n else
            f"coarse in {sel['min_prompts']} prompts, more than the fact's {n}: no neuron can be refined")
    return f"Selection: preset {sel['preset']}, p = {sel['p']:.2f}{adapted}; a neuron had to be {need}."


def format_result(result: Any) -> str:
    """The plain-text summary ``knlens locate`` prints: prompts, neurons, completeness, interventions, held-out
    prompts, specificity, and every test with the smallest p-value it can reach."""
    from knlens.methods.attribution.adaptive import describe

    s, fact = result.settings, result.fact
    multi = s.multi_token != "single"
    comp_cols = ["prompt", "p_target", *(["ig_value"] if multi else []), "delta_sum", "ig_sum", "abs_error",
                 "relative_error", "grid", "steps"]
    lines = [
        f"knlens locate: {fact.prompts[0]!r} -> {fact.target!r}"
        + (f"  [{fact.name}]" if getattr(fact, "name", None) else ""),
        f"model {s.model} ({s.n_layers} layers x {s.d_mlp} neurons, {s.dtype}); hook blocks.L.mlp.{s.hook_point}; "
        f"IG engine {s.engine_label}; preset {s.preset}",
        f"integration: {describe(result.attributions)}",
        *([f"engine note: {s.engine_note}"] if s.engine_note else []),
        "",
        "Prompts, P(target) and integrated-gradients completeness error (sum over layers of |sum IG - delta|):",
        _indent(_fmt_frame(result.completeness[comp_cols])),
        *(["  (p_target: P of the whole target, the product of its teacher-forced per-token probabilities; "
           "ig_value: the mean per-token probability that IG integrates)"] if multi else []),
        "",
    ]
    if result.refined_empty:
        lines.append(f"No refined knowledge neuron (preset {s.preset}): no neuron is coarse in enough prompts. "
                     f"Top neurons by mean score below; the {len(result.tested)} best are tested.")
    else:
        lines.append(f"Knowledge neurons (refined): {len(result.neurons)}  "
                     + " ".join(str(n) for n in result.neurons))
    lines += [
        _selection_text(result),
        f"Neurons (mean IG over {len(result.attributions)} prompts; n_coarse = prompts where coarse):",
        _indent(_fmt_frame(result.table)),
        "",
        f"Interventions at the target position, in-sample (selected and measured on the same "
        f"{len(result.attributions)} prompts): {result.tested_label}, vs {s.n_random} random sets of each control "
        f"({s.controls}; uniform: any neurons of the same layers; matched: same layers and same {s.n_bins}-quantile "
        f"bin of |activation| at the target):",
        _effects_text(result.effects()),
        "  (suppress: a -> b, enhance: a -> b + 2(a - b), b = 0: the neuron's write into the residual stream "
        "removed / doubled; relative: mean of (P_after - P_before) / P_before; delta: mean change / mean P_before)",
    ]
    if result.heldout is not None:
        ho = result.heldout
        lines += ["", f"Held-out paraphrases: {ho.note}",
                  _indent(_fmt_frame(ho.folds[["fold", "held_out", "n_neurons", "neurons", "p", "min_prompts",
                                               "fallback", "jaccard_all"]])),
                  _effects_text(ho.effects())]
    if result.specificity is not None:
        sp = result.specificity
        summary = sp.summary().drop(columns=["p_specific", "p_specific_floor"])
        lines += ["", f"Specificity (Dai et al.): the tested neurons on {sp.basis}; Dai's delta per action:",
                  _indent(_fmt_frame(_pct(summary, ["own_delta", "others_delta", "others_mean_delta",
                                                    "others_max_abs_delta"]))),
                  "  by relation (delta):",
                  _indent(_fmt_frame(_pct(sp.by_relation(), [c for c in sp.by_relation().columns
                                                             if c != "relation"])))]
    lines += ["", "Tests (p_empirical: share of random draws at least as extreme, one-sided in the expected "
                  "direction, (1+k)/(1+N); p_wilcoxon: two-sided, paired; p_specific: share of other facts moved at "
                  "least as much; p_floor: the smallest p the test can give):",
              _indent(_fmt_frame(result.tests()))]
    if result.notes:
        lines += ["", "Notes:", *(f"  - {n}" for n in result.notes)]
    return "\n".join(lines)


# ---------------------------------------------------------------- locate
def _list_facts() -> int:
    from knlens.data.builtin import builtin_facts

    import pandas as pd

    rows = [{"name": f.name, "relation": f.relation, "prompts": len(f.prompts), "first prompt": f.prompts[0],
             "target": repr(f.target)} for f in builtin_facts()]
    print(_fmt_frame(pd.DataFrame(rows)))
    return 0


def _fact_from_args(args: argparse.Namespace) -> Any:
    from knlens.core.facts import Fact

    if args.fact and (args.prompt or args.target is not None):
        raise BadInput("give either --fact NAME or --prompt ... --target ..., not both")
    if args.fact:
        from knlens.data.builtin import builtin_facts, get_fact

        names = [f.name for f in builtin_facts()]
        if args.fact not in names:
            import difflib

            close = difflib.get_close_matches(args.fact, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise BadInput(f"unknown fact {args.fact!r}; {hint}`knlens locate --list-facts` lists the {len(names)} "
                           f"built-in facts (or pass --prompt ... --target ...)")
        return get_fact(args.fact)
    if not args.prompt:
        raise BadInput("no fact given: use --fact NAME (see --list-facts) or --prompt P [--prompt P2 ...] "
                       "--target T")
    if args.target is None:
        raise BadInput("--prompt needs --target (the expected continuation, usually with its leading space, "
                       "e.g. --target ' Paris')")
    return Fact(prompts=tuple(args.prompt), target=args.target)


def _cmd_locate(args: argparse.Namespace) -> int:
    if args.list_facts:
        return _list_facts()
    fact = _fact_from_args(args)
    if args.steps < 1:
        raise BadInput(f"--steps must be at least 1, got {args.steps}")
    if args.max_steps < 1:
        raise BadInput(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.n_random < 0:
        raise BadInput(f"--n-random must be 0 or more, got {args.n_random}")
    if args.n_bins < 1:
        raise BadInput(f"--n-bins must be 1 or more, got {args.n_bins}")
    out = output_dir(args.out) if args.out else None
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # also silences the model loader's bars
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    from knlens.studies.knowledge_neurons import locate
    from knlens.core.models import load_model

    say(f"loading model {args.model} ...")
    model = load_model(args.model)
    say(f"locating the knowledge neurons of {fact.prompts[0]!r} -> {fact.target!r} ({len(fact.prompts)} prompts)")
    result = locate(model, fact, steps=args.steps, grid=args.grid, preset=args.preset, hook_point=args.hook_point,
                    n_random=args.n_random, n_bins=args.n_bins, held_out=args.held_out,
                    specificity=args.specificity, seed=args.seed, engine=args.engine, progress=not args.quiet,
                    tolerance=args.tolerance, max_steps=args.max_steps)
    print(format_result(result), flush=True)
    if out is not None:
        from knlens.viz.report import write_html

        try:
            paths = result.save(out)
            page = write_html(result, out / "report.html")
        except OSError as err:
            raise OutputError(f"cannot write the results to --out {args.out!r}: {err.strerror or err}") from err
        print(f"\nwrote {', '.join(str(p) for p in [*paths.values(), page])}")
    return 0


def _tolerance(text: str) -> float | None:
    """``--tolerance``: a positive number, or ``off`` (a fixed grid)."""
    if text.lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'off', got {text!r}")
    return value


def _add_locate_parser(sub: Any) -> None:
    from knlens.methods.attribution.grids import GRIDS
    from knlens.methods.attribution.adaptive import DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE
    from knlens.methods.attribution.ig import ENGINES
    from knlens.methods.selection import PRESETS

    p = sub.add_parser(
        "locate", help="find a fact's knowledge neurons, check them causally, write a report",
        description="Integrated gradients over MLP neurons for every prompt of a fact, refined neurons, "
                    "suppress (x0) / enhance (x2) against layer-matched and magnitude-matched random controls, "
                    "on held-out prompts and on other relations' facts, and an offline HTML report.")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model (smollm2-135m, gemma3-270m), tiny test model (tiny-llama, tiny-gpt2, "
                        "tiny-bert), local folder or hub name (default: %(default)s)")
    p.add_argument("--fact", metavar="NAME", help="a built-in fact (see --list-facts)")
    p.add_argument("--list-facts", action="store_true", help="print the built-in facts and exit")
    p.add_argument("--prompt", metavar="P", action="append", help="a prompt (repeat for paraphrases)")
    p.add_argument("--target", metavar="T", help="the target continuation, e.g. ' Paris' (with --prompt)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: %(default)s)")
    p.add_argument("--grid", default="right", choices=sorted(GRIDS), help="quadrature rule (default: %(default)s)")
    p.add_argument("--tolerance", type=_tolerance, default=DEFAULT_TOLERANCE, metavar="T",
                   help="relative completeness error above which a prompt is integrated again on more "
                        "Gauss-Legendre nodes; 'off' keeps --grid/--steps (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help="most Gauss-Legendre nodes of that refinement (default: %(default)s)")
    p.add_argument("--preset", default="dai", choices=sorted(PRESETS),
                   help="neuron selection thresholds (default: %(default)s)")
    p.add_argument("--hook-point", default="hook_post", choices=["hook_post", "hook_pre", "hook_pre_linear"],
                   help="what a neuron is: blocks.L.mlp.<hook point> (default: %(default)s)")
    p.add_argument("--engine", default="fast", choices=list(ENGINES),
                   help="integrated-gradients engine (default: %(default)s)")
    p.add_argument("--n-random", type=int, default=50, help="random control sets (default: %(default)s)")
    p.add_argument("--n-bins", type=int, default=10,
                   help="quantile bins of |activation| for the magnitude-matched random control (default: %(default)s)")
    p.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=None,
                   help="leave-one-prompt-out evaluation: neurons refined on the other prompts, measured on the "
                        "held-out one (default: on from 4 prompts)")
    p.add_argument("--specificity", action=argparse.BooleanOptionalAction, default=True,
                   help="Dai's specificity control: the neurons on the built-in facts of other relations "
                        "(default: on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control (default: %(default)s)")
    p.add_argument("--out", metavar="DIR",
                   help="write result.json, neurons.csv, interventions.csv, completeness.csv, "
                        "attributions.safetensors and report.html there")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status messages (tables still print)")
    p.set_defaults(func=_cmd_locate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="knlens", description="Find, test and show the knowledge neurons of "
                                     "transformer language models (TransformerLens 4).")
    parser.add_argument("--version", action="version", version=f"knlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_locate_parser(sub)
    from knlens.cli.analyses import add_consistency_parser, add_trace_parser

    add_trace_parser(sub)
    add_consistency_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CommandLineError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(func(args) or 0)
    except KnlensError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
