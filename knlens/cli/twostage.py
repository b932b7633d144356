"""``knlens twostage``: the two-stage neuron filter of one fact (activation difference under a corrupted subject,
then gradient × activation).

    knlens twostage --fact capital-france --corruption noise --top-k 20 --out ts-out
    knlens twostage --prompt "The Eiffel Tower is located in" --target " Paris" --subject "The Eiffel Tower"
"""

from __future__ import annotations

import argparse
from typing import Any

from knlens.cli.common import (add_common_options, builtin_fact, load_model, output_dir, save_figure, say, table,
                               write_outputs)
from knlens.core.errors import CommandLineError
from knlens.core.facts import Fact
from knlens.methods.structure.two_stage import TwoStageSettings, two_stage

__all__ = ["add_parser", "run"]


def _fact(args: argparse.Namespace) -> Fact:
    if args.fact and (args.prompt or args.target):
        raise CommandLineError("give either --fact NAME or --prompt P --target T --subject S, not both")
    if args.fact:
        fact = builtin_fact(args.fact)
        return Fact(fact.prompts, fact.target, args.subject or fact.subject, fact.relation, fact.name)
    if not args.prompt or args.target is None or not args.subject:
        raise CommandLineError("no fact given: use --fact NAME or --prompt P --target T --subject S")
    return Fact(args.prompt, args.target, subject=args.subject)


def run(args: argparse.Namespace) -> int:
    """Run ``knlens twostage``: the stage-1 neurons with Δ, g and whether stage 2 kept them; with ``--out`` the result,
    twostage.csv and twostage.png."""
    fact = _fact(args)
    settings = TwoStageSettings(corruption=args.corruption, neutral=args.neutral, noise_samples=args.samples,
                                tau_a=args.tau_a, top_k=args.top_k, tau_g=args.tau_g, seed=args.seed)
    out = output_dir(args.out) if args.out else None
    model = load_model(args)
    say(args, f"two-stage filter of {fact.prompts[0]!r} -> {fact.target!r} (subject {fact.subject!r}, "
              f"corruption {args.corruption})")
    r = two_stage(model, fact, settings, image=args.image)
    print(table(r.to_frame().head(args.show)), flush=True)
    print(f"\nstage 1 kept {len(r.stage1)}, stage 2 kept {len(r.neurons)}; P clean {r.p_clean:.4f}; cost "
          f"{int(r.cost['forward'])} forwards + {int(r.cost['backward'])} backward, {r.cost['seconds']:.2f} s", flush=True)
    if out is not None:
        write_outputs(out, r, {"twostage.csv": lambda p: r.to_frame().to_csv(p, index=False),
                               "twostage.png": lambda p: save_figure(r.plot(), p)})
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``twostage`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "twostage", help="two-stage neuron filter: activation difference under a corrupted subject, then grad x act",
        description="Stage 1 keeps the neurons whose activation at the answer position drops most when the subject is "
                    "removed, replaced or noised; stage 2 keeps those with a = activation x d log P / d a above "
                    "--tau-g (text version of Sato and Takagi's multimodal filter).")
    add_common_options(p, out_help="write the result (result.json, tensors.safetensors), twostage.csv and twostage.png")
    p.add_argument("--fact", metavar="NAME", help="a built-in fact (all its prompts)")
    p.add_argument("--prompt", metavar="P", help="a prompt (with --target and --subject)")
    p.add_argument("--target", metavar="T", help="the answer, one token, e.g. ' Paris'")
    p.add_argument("--subject", metavar="S", help="the subject as written in the prompt")
    p.add_argument("--corruption", default="noise", choices=["remove", "replace", "noise"],
                   help="how the subject is corrupted (default: %(default)s)")
    p.add_argument("--neutral", default="something", help="the replacement of --corruption replace (default: %(default)s)")
    p.add_argument("--samples", type=int, default=10, help="noise samples (default: %(default)s)")
    p.add_argument("--tau-a", type=float, default=0.2, help="stage 1: delta > tau_a x max delta (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="stage 1: the k largest deltas instead of --tau-a")
    p.add_argument("--tau-g", type=float, default=0.0, help="stage 2: g > tau_g (default: %(default)s)")
    p.add_argument("--image", metavar="FILE", help="an image (needs a vision-language model; a text model refuses)")
    p.add_argument("--show", type=int, default=20, help="rows printed (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.set_defaults(run=run)
    return p
