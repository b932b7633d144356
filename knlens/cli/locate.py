"""``knlens locate``: a fact's knowledge neurons, their causal checks, and an offline HTML report.

    knlens locate --fact capital-france --out knlens-out
    knlens locate --model tiny-llama --prompt "the capital of france is" --target " paris" --steps 4
    knlens locate --list-facts
    knlens locate --model gemma3-270m --languages en,fr,it --fact P1376:Q1489 --steps 6 --out fr-capital
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from knlens.cli.common import add_common_options, builtin_fact, load_model, output_dir, say, table, write_outputs
from knlens.cli.locate_languages import run_languages
from knlens.core.errors import CommandLineError
from knlens.core.facts import Fact
from knlens.data.builtin import builtin_facts
from knlens.methods.attribution.adaptive import DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE, describe
from knlens.methods.attribution.grids import GRIDS
from knlens.methods.attribution.ig import ENGINES
from knlens.methods.attribution.screen import SCREENS, describe_screen
from knlens.methods.selection import PRESETS
from knlens.studies.knowledge_neurons import locate
from knlens.viz.report import write_html

__all__ = ["add_parser", "run", "format_result"]


# ------------------------------------------------------------------------------------ text
def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _pct(frame: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    out = frame.copy()
    for col in cols:
        out[col] = out[col].map(lambda x: "" if x != x else f"{100 * x:+.1f}%")
    return out


def _effects_text(effects: pd.DataFrame) -> str:
    eff = effects.assign(control=effects["control"].replace("", "-"))
    return _indent(table(_pct(eff, ["relative", "relative_std", "delta"])))


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
        *([f"screen: {describe_screen(result.attributions)}"] if s.screen is not None else []),
        *([f"engine note: {s.engine_note}"] if s.engine_note else []),
        "",
        "Prompts, P(target) and integrated-gradients completeness error (sum over layers of |sum IG - delta|):",
        _indent(table(result.completeness[comp_cols])),
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
        _indent(table(result.table)),
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
                  _indent(table(ho.folds[["fold", "held_out", "n_neurons", "neurons", "p", "min_prompts",
                                          "fallback", "jaccard_all"]])),
                  _effects_text(ho.effects())]
    if result.specificity is not None:
        sp = result.specificity
        summary = sp.summary().drop(columns=["p_specific", "p_specific_floor"])
        by_relation = sp.by_relation()
        lines += ["", f"Specificity (Dai et al.): the tested neurons on {sp.basis}; Dai's delta per action:",
                  _indent(table(_pct(summary, ["own_delta", "others_delta", "others_mean_delta",
                                               "others_max_abs_delta"]))),
                  "  by relation (delta):",
                  _indent(table(_pct(by_relation, [c for c in by_relation.columns if c != "relation"])))]
    lines += ["", "Tests (p_empirical: share of random draws at least as extreme, one-sided in the expected "
                  "direction, (1+k)/(1+N); p_wilcoxon: two-sided, paired; p_specific: share of other facts moved at "
                  "least as much; p_floor: the smallest p the test can give):",
              _indent(table(result.tests()))]
    if result.notes:
        lines += ["", "Notes:", *(f"  - {n}" for n in result.notes)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the command
def _list_facts() -> int:
    rows = [{"name": f.name, "relation": f.relation, "prompts": len(f.prompts), "first prompt": f.prompts[0],
             "target": repr(f.target)} for f in builtin_facts()]
    print(table(pd.DataFrame(rows)))
    return 0


def _fact_from_args(args: argparse.Namespace) -> Fact:
    if args.fact and (args.prompt or args.target is not None):
        raise CommandLineError("give either --fact NAME or --prompt ... --target ..., not both")
    if args.fact:
        return builtin_fact(args.fact)
    if not args.prompt:
        raise CommandLineError("no fact given: use --fact NAME (see --list-facts) or --prompt P [--prompt P2 ...] "
                               "--target T")
    if args.target is None:
        raise CommandLineError("--prompt needs --target (the expected continuation, usually with its leading "
                               "space, e.g. --target ' Paris')")
    return Fact(prompts=tuple(args.prompt), target=args.target)


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (("--steps", args.steps, 1), ("--max-steps", args.max_steps, 1),
                               ("--n-random", args.n_random, 0), ("--n-bins", args.n_bins, 1)):
        if value < least:
            need = "at least 1" if least == 1 else "0 or more"
            raise CommandLineError(f"{flag} must be {need}, got {value}")


def _extras(result: Any) -> dict[str, Callable[[Path], object]]:
    """What ``--out`` holds besides the saved result and its CSV tables: the offline HTML report."""
    return {"report.html": lambda p: write_html(result, p)}


def run(args: argparse.Namespace) -> int:
    """Run ``knlens locate``: print the summary; with ``--out``, save the result, CSV tables and report.html."""
    if args.list_facts:
        return _list_facts()
    if args.languages:
        return run_languages(args)
    fact = _fact_from_args(args)
    _check_numbers(args)
    out = output_dir(args.out) if args.out else None
    model = load_model(args)
    say(args, f"locating the knowledge neurons of {fact.prompts[0]!r} -> {fact.target!r} "
              f"({len(fact.prompts)} prompts)")
    result = locate(model, fact, steps=args.steps, grid=args.grid, preset=args.preset, hook_point=args.hook_point,
                    n_random=args.n_random, n_bins=args.n_bins, held_out=args.held_out,
                    specificity=args.specificity, seed=args.seed, engine=args.engine, progress=not args.quiet,
                    tolerance=args.tolerance, max_steps=args.max_steps,
                    screen=None if args.screen == "off" else args.screen)
    print(format_result(result), flush=True)
    if out is not None:
        write_outputs(out, result, _extras(result))
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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``locate`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "locate", help="find a fact's knowledge neurons, check them causally, write a report",
        description="Integrated gradients over MLP neurons for every prompt of a fact, refined neurons, "
                    "suppress (x0) / enhance (x2) against layer-matched and magnitude-matched random controls, "
                    "on held-out prompts and on other relations' facts, and an offline HTML report.")
    add_common_options(p, out_help="write the result (result.json, tensors.safetensors, neurons.csv, "
                                   "interventions.csv, completeness.csv) and report.html there")
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
    p.add_argument("--screen", default="off", choices=["off", *SCREENS],
                   help="integrate exactly only the layers a cheap first pass picks, checked against the exact "
                        "scores, falling back to every layer when the check fails (default: %(default)s)")
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
    m = p.add_argument_group("many languages (mParaRel)", "with --languages, --fact is RELATION:SUBJECT (e.g. P36:Q142)")
    m.add_argument("--languages", metavar="L1,L2,...",
                   help="locate the fact in each language (mParaRel codes), print each language's neurons and the "
                        "language-independent set; --out also writes languages.html")
    m.add_argument("--max-prompts", type=int, default=3,
                   help="prompts per language (the first templates; default: %(default)s)")
    m.add_argument("--attribution", default="amig", choices=["amig", "ig"],
                   help="AMIG (authors' scaling) or IG from the zero baseline (default: %(default)s)")
    m.add_argument("--data-dir", metavar="DIR", help="data folder (default: knlens.data's default)")
    p.set_defaults(run=run)
    return p
