"""What every ``knlens`` subcommand shares: the common options, one fact lookup, one model loader, one
table formatter, status messages, the ``--out`` folder and its files, and the one error handler.

Every subcommand module (:mod:`knlens.cli.locate`, :mod:`knlens.cli.trace`, :mod:`knlens.cli.consistency`)
imports from here; this module imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from knlens.core import models
from knlens.core.errors import CommandLineError, KnlensError, OutputError
from knlens.core.facts import Fact
from knlens.data.builtin import get_fact
from knlens.results.contract import RESULT_JSON, RESULT_TENSORS

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "Parser", "add_common_options", "builtin_fact",
           "load_model", "one_line", "output_dir", "run_cli", "save_figure", "say", "table", "write_outputs"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEFAULT_MODEL = "smollm2-135m"
LIST_FACTS = "knlens locate --list-facts"


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad choice, a value that is not a number, an unknown option) are a
    :class:`~knlens.core.errors.CommandLineError`, reported as one ``error: ...`` line like every other
    misuse, not a usage block. Subparsers are of this class too (argparse copies the parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def add_common_options(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """Add ``--model``, ``--out DIR`` (``out_help`` says what is written there) and ``--quiet``."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="embedded model (smollm2-135m, gemma3-270m), tiny test model (tiny-llama, tiny-gpt2, "
                             "tiny-bert), local folder or hub name (default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", help=out_help)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or status messages (tables still print)")


# ------------------------------------------------------------------------------------ errors

def one_line(err: BaseException) -> str:
    """``err``'s message on one line (a ``KeyError``'s quotes dropped; the class name when it is empty)."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return text or type(err).__name__


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand (its parser's ``run`` default); the exit status.

    The one error handler of the command line: a misuse of argparse or any
    :class:`~knlens.core.errors.KnlensError` prints exactly one line ``error: ...`` on stderr and gives 2,
    never a traceback; no subcommand prints the help on stderr and gives 2; Ctrl-C gives 130.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parser.parse_args(argv)
        if args.run is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        return int(args.run(args) or 0)
    except KnlensError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------------------ facts, model

def builtin_fact(name: str) -> Fact:
    """The built-in fact ``name`` (:func:`knlens.data.builtin.get_fact`), its error pointing at ``--list-facts``."""
    return get_fact(name, listing=f"{LIST_FACTS} lists them")


def say(args: argparse.Namespace, *msg: Any) -> None:
    """A status message on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(*msg, file=sys.stderr, flush=True)


def load_model(args: argparse.Namespace) -> Any:
    """The ``--model`` (:func:`knlens.core.models.load_model`); ``--quiet`` also silences its progress bars."""
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"
    say(args, f"loading model {args.model} ...")
    return models.load_model(args.model)


# ------------------------------------------------------------------------------------ output

def table(frame: pd.DataFrame, **kwargs: Any) -> str:
    """``frame`` as the plain-text table the commands print: no index, floats to 4 significant digits."""
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        return frame.to_string(index=False, float_format=lambda x: f"{x:.4g}", **kwargs)


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


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _stamps(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def write_outputs(out: Path, result: Any, extras: Mapping[str, Callable[[Path], object]]) -> list[Path]:
    """Save ``result`` into ``out`` with its own ``save(dir)`` (``result.json`` + ``tensors.safetensors``, and
    whatever else that result writes), then each human-readable extra (``name`` -> a writer given
    ``out / name``); print ``wrote ...`` with every file written and return them. A failing write is an
    :class:`~knlens.core.errors.OutputError`."""
    before = _stamps(out)
    try:
        result.save(out)
        for name, write in extras.items():
            write(out / name)
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write the results to --out {str(out)!r}: {err.strerror or err}") from err
    written = sorted((p for p, stamp in _stamps(out).items() if before.get(p) != stamp),
                     key=lambda p: (p.name not in (RESULT_JSON, RESULT_TENSORS), p.name))
    print(f"\nwrote {', '.join(str(p) for p in written)}", flush=True)
    return written
