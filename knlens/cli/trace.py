"""``knlens trace``: causal tracing of one prompt (docs/methods.md, causal tracing).

    knlens trace --fact capital-france --kinds mlp attn --samples 3 --out trace-out
    knlens trace --prompt "The Eiffel Tower is located in" --target " Paris" --subject "The Eiffel Tower"
"""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from knlens.cli.common import (add_common_options, builtin_fact, load_model, output_dir, save_figure, say, table,
                               write_outputs)
from knlens.core.errors import CommandLineError, TracingSettingError
from knlens.methods.tracing.corruption import Corruption
from knlens.methods.tracing.result import Trace
from knlens.methods.tracing.trace import trace

__all__ = ["add_parser", "run", "format_trace"]


def format_trace(t: Trace) -> str:
    """The text ``knlens trace`` prints: probabilities, then per kind the best layer of each token."""
    s = t.settings
    lines = [f"prompt   {t.prompt!r} -> {t.target!r}",
             f"P clean {t.p_clean:.4f}   P corrupted {t.p_corrupted:.4f}   total effect {t.total_effect:+.4f}",
             f"engine {s.engine}" + (f" ({s.engine_note})" if s.engine_note else "") + f"   noise samples {s.samples}",
             f"corrupted tokens {[t.tokens[i] for i in t.corrupted]} (positions {list(t.corrupted)})", ""]
    groups = t.groups()
    for kind, eff in t.effects.items():
        rows = [{"pos": pos, "token": tok, "group": groups[pos], "best layer": int(eff[:, pos].argmax()),
                 "max effect": float(eff[:, pos].max()), "mean effect": float(eff[:, pos].mean())}
                for pos, tok in enumerate(t.tokens)]
        lines += [f"{kind} (window {s.windows.get(kind, 1)}): indirect effect P_restored - P_corrupted",
                  table(pd.DataFrame(rows)), ""]
    return "\n".join(lines).rstrip()


def _prompt_from_args(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """The prompt, target and subject named on the command line (a built-in fact or --prompt/--target)."""
    if args.fact and (args.prompt or args.target):
        raise CommandLineError("give either --fact NAME or --prompt P --target T, not both")
    if args.fact:
        fact = builtin_fact(args.fact)
        if not 0 <= args.prompt_index < len(fact.prompts):
            raise CommandLineError(f"--prompt-index {args.prompt_index} outside the fact's {len(fact.prompts)} prompts")
        return fact.prompts[args.prompt_index], fact.target, args.subject or fact.subject
    if not args.prompt or args.target is None:
        raise CommandLineError("no prompt given: use --fact NAME or --prompt P --target T --subject S")
    return args.prompt, args.target, args.subject


def _corruption(args: argparse.Namespace) -> Corruption:
    """The ``--corruption`` with its settings, checked."""
    if args.samples < 1:
        raise CommandLineError(f"--samples must be at least 1, got {args.samples}")
    if args.corruption == "substitute" and not args.other:
        raise CommandLineError("--corruption substitute needs --other (another subject with as many tokens)")
    for flag, value in (("--window", args.window), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise TracingSettingError(f"{flag} must be at least 1, got {value}")
    return Corruption(args.corruption, factor=args.noise_factor, seed=args.seed,
                      samples=args.samples if args.corruption == "noise" else 1, other=args.other)


def run(args: argparse.Namespace) -> int:
    """Run ``knlens trace``: print the trace's summary tables; with ``--out``, save the trace, trace.csv and
    trace.png."""
    prompt, target, subject = _prompt_from_args(args)
    if subject is None and args.subject_span is None:
        raise CommandLineError("tracing needs the subject: pass --subject S (as written in the prompt) or "
                               "--subject-span")
    corruption = _corruption(args)
    out = output_dir(args.out) if args.out else None
    model = load_model(args)
    say(args, f"tracing {prompt!r} -> {target!r} (corrupting the {args.corrupt}, kinds {', '.join(args.kinds)})")
    t = trace(model, prompt, target, kinds=args.kinds, corruption=corruption, corrupt=args.corrupt,
              subject=subject, subject_span=tuple(args.subject_span) if args.subject_span else None,
              window=args.window, batch_size=args.batch_size, engine=args.engine, known_only=not args.allow_unknown)
    print(format_trace(t), flush=True)
    if out is not None:
        write_outputs(out, t, {"trace.csv": lambda p: t.to_frame().to_csv(p, index=False),
                               "trace.png": lambda p: save_figure(t.plot(), p)})
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``trace`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "trace", help="causal tracing: which (layer, token) states of MLP / attention carry a fact",
        description="Corrupt the subject (or relation) tokens' embeddings, restore one clean state per "
                    "(layer, token) and kind, and report the indirect effect P_restored - P_corrupted "
                    "(Meng et al., 2022). Cells run as batch rows; the default fast engine starts each at "
                    "its first restored layer and runs only the tokens from the restored one on.")
    add_common_options(p, out_help="write the trace (result.json, tensors.safetensors), trace.csv and trace.png "
                                   "there")
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
    p.set_defaults(run=run)
    return p
