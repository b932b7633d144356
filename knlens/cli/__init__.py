"""The ``knlens`` command line: ``knlens locate | trace | consistency | edit | study | sweep | query | summary |
qrnca | twostage``.

    knlens locate --fact capital-france --out knlens-out
    knlens trace --fact capital-france --kinds mlp attn --samples 3
    knlens consistency --fact capital-france --fact capital-germany --steps 8
    knlens edit --fact capital-france --new " Berlin" --editor rank-one --control --out edit-out
    knlens study query-localization --page benchmarks/QUERY_LOCALIZATION.md
    knlens sweep locate --data pararel:P36 --model smollm2-135m --store runs/
    knlens query runs/ "select key, status, error from tasks"
    knlens summary runs/ --out summary.html
    knlens degenerate --fact capital-france --compare

Each subcommand is one module (:mod:`knlens.cli.locate`, :mod:`knlens.cli.trace`,
:mod:`knlens.cli.consistency`, :mod:`knlens.cli.edit`, :mod:`knlens.cli.study`, :mod:`knlens.cli.sweep`, :mod:`knlens.cli.query`,
:mod:`knlens.cli.summary`)
with ``add_parser(subparsers)`` and ``run(args)``; what they share is in
:mod:`knlens.cli.common`. Bad input (an unknown model or fact, a target outside the vocabulary, an empty
prompt, a misused option, ...) prints one line ``error: ...`` on stderr and exits with status 2. Progress
bars and status messages go to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from knlens.cli import consistency, degenerate, edit, locate, qrnca, query, study, summary, sweep, trace, twostage
from knlens.cli.common import Parser, run_cli
from knlens.core.versions import __version__

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``knlens`` parser with every subcommand; the chosen one's ``run`` is ``args.run``."""
    parser = Parser(prog="knlens", description="Find, test and show the knowledge neurons of "
                                               "transformer language models (TransformerLens 4).")
    parser.add_argument("--version", action="version", version=f"knlens {__version__}")
    parser.set_defaults(run=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    locate.add_parser(sub)
    trace.add_parser(sub)
    consistency.add_parser(sub)
    edit.add_parser(sub)
    study.add_parser(sub)
    sweep.add_parser(sub)
    query.add_parser(sub)
    summary.add_parser(sub)
    degenerate.add_parser(sub)
    qrnca.add_parser(sub)
    twostage.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input, 130 interrupted)."""
    return run_cli(build_parser(), argv)
