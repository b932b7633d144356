"""``knlens degenerate``: a fact's located neurons clustered by weight topology, and which clusters are
degenerate knowledge neurons (docs/methods.md, degenerate components).

    knlens degenerate --fact capital-france --top 20 --out dkn-out
    knlens degenerate --prompt "The capital of France is" --prompt "France's capital is" --target " Paris" --robustness
    knlens degenerate --fact capital-france --compare     # the baselines' clusters through the same filter
"""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from knlens.cli.common import add_common_options, builtin_fact, load_model, output_dir, save_figure, say, table, write_outputs
from knlens.core.errors import CommandLineError
from knlens.core.facts import Fact
from knlens.methods.attribution import attribute
from knlens.methods.structure.degenerate_components import METHODS, degenerate_components
from knlens.methods.structure.robustness import robustness
from knlens.methods.structure.topology import MODES

__all__ = ["add_parser", "run"]


def _fact(args: argparse.Namespace) -> Fact:
    if args.fact and args.prompt:
        raise CommandLineError("pass --fact NAME or --prompt (with --target), not both")
    if args.fact:
        return builtin_fact(args.fact)
    if not args.prompt:
        raise CommandLineError("no fact: pass --fact NAME or --prompt P (repeatable) with --target T")
    if args.target is None:
        raise CommandLineError("--prompt needs --target")
    return Fact(tuple(args.prompt), args.target, subject=args.subject, name="prompts")


def _check(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise CommandLineError(f"--steps must be at least 1, got {args.steps}")
    if not 0 < args.single_max <= 1 or not 0 < args.removes_min <= 1:
        raise CommandLineError(f"--single-max and --removes-min must be in (0, 1], got {args.single_max}, "
                               f"{args.removes_min}")


def run(args: argparse.Namespace) -> int:
    """Run ``knlens degenerate``: the clusters table (and the baselines' with ``--compare``, the robustness table
    with ``--robustness``); ``--out`` gets the result, components.csv and distances.png."""
    _check(args)
    out = output_dir(args.out) if args.out else None
    fact = _fact(args)
    model = load_model(args)
    say(args, f"attributing {len(fact.prompts)} prompts ({args.steps} Gauss-Legendre nodes)")
    attrs = attribute(model, fact, steps=args.steps, grid="gauss-legendre", tolerance=None)
    kw: dict[str, Any] = {"top": args.top, "mode": args.mode, "single_max": args.single_max,
                          "removes_min": args.removes_min, "steps": args.steps, "attributions": attrs}
    res = degenerate_components(model, fact, method=args.method, **kw)
    print(f"{len(res.located)} located neurons, {len(res.frame)} clusters ({args.method}); P(target) {res.p_clean:.4g}, "
          f"all clusters suppressed: drop {res.drop_all:.1%}; degenerate: {int(res.frame['degenerate'].sum())}")
    print(table(res.frame))
    extra: dict[str, pd.DataFrame] = {}
    if args.compare:
        rows = []
        for method in METHODS:
            r = res if method == args.method else degenerate_components(model, fact, method=method, **kw)
            rows.append({"method": method, "clusters": len(r.frame), "sizes": " ".join(map(str, r.frame["size"])),
                         "drop_all": r.drop_all, "degenerate": int(r.frame["degenerate"].sum())})
        extra["methods.csv"] = pd.DataFrame(rows)
        print("\nclusters of each method through the same functional filter")
        print(table(extra["methods.csv"]))
    if args.robustness:
        extra["robustness.csv"] = robustness(model, fact, res.dkn if len(res.dkn) else res.located)
        print(f"\nrobustness to one-word typos ({'DKN set' if len(res.dkn) else 'no DKN: all located neurons'})")
        print(table(extra["robustness.csv"]) if len(extra["robustness.csv"]) else "no prompt word to perturb")
    if out is not None:
        writers = {"components.csv": lambda p: res.frame.to_csv(p, index=False),
                   "distances.png": lambda p: save_figure(res.plot(), p)}
        writers |= {name: (lambda p, f=frame: f.to_csv(p, index=False)) for name, frame in extra.items()}
        write_outputs(out, res, writers)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``degenerate`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "degenerate", help="degenerate knowledge neurons of a fact by weight topology (Chen et al., 2024)",
        description="The fact's top neurons by integrated gradients, their structural distances (output vector of "
                    "one neuron into the input of a later one), persistence clusters, and the functional filter: a "
                    "cluster is degenerate when suppressing it alone lowers P by less than --single-max while "
                    "suppressing all clusters lowers it by at least --removes-min.")
    add_common_options(p, out_help="write the result (result.json, tensors.safetensors), components.csv, "
                                   "distances.png (methods.csv, robustness.csv) there")
    p.add_argument("--fact", metavar="NAME", help="a built-in fact (knlens locate --list-facts)")
    p.add_argument("--prompt", metavar="P", action="append", help="a prompt of the fact (repeat for paraphrases)")
    p.add_argument("--target", metavar="T", help="the target of --prompt, e.g. ' Paris'")
    p.add_argument("--subject", metavar="S", help="the subject of --prompt (kept out of the typos of --robustness)")
    p.add_argument("--top", type=int, default=20, help="located neurons clustered (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="Gauss-Legendre nodes of integrated gradients (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default="sensitivity",
                   help="structural weight: sensitivity of B's output at the clean point, or weight-only up / gate "
                        "(default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default="persistence", help="clustering (default: %(default)s)")
    p.add_argument("--single-max", type=float, default=0.05,
                   help="degenerate: suppressing the cluster alone lowers P by less than this (default: %(default)s)")
    p.add_argument("--removes-min", type=float, default=0.5,
                   help="...while suppressing all clusters lowers P by at least this (default: %(default)s)")
    p.add_argument("--compare", action="store_true", help="also run the baselines' clusters through the filter")
    p.add_argument("--robustness", action="store_true",
                   help="P on one-word typos of the prompts with the DKNs intact / suppressed / matched random")
    p.set_defaults(run=run)
    return p
