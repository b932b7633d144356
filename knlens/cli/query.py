"""``knlens query``: SQL over a results store, in place (DuckDB; README, Sweeps).

    knlens query runs/ "select study, status, count(*) n from tasks group by all"
    knlens query runs/ "select fact, layer, neuron, mean_score from locate_rows where refined" --csv out.csv
"""

from __future__ import annotations

import argparse
from typing import Any

from knlens.cli.common import table
from knlens.core.errors import OutputError
from knlens.store.store import Store

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``knlens query``: print the query's rows as a table (or write them as CSV with ``--csv``)."""
    frame = Store(args.store, create=False).sql(args.sql)
    if args.csv:
        try:
            frame.to_csv(args.csv, index=False)
        except OSError as err:
            raise OutputError(f"cannot write --csv {args.csv!r}: {err.strerror or err}") from err
        print(f"wrote {len(frame)} rows to {args.csv}", flush=True)
    else:
        print(table(frame) if len(frame) else f"(no rows; columns: {', '.join(map(str, frame.columns))})", flush=True)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``query`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "query", help="SQL (DuckDB) over a results store",
        description="Views: tasks (one row per task key: its stored result, or its latest failure with the "
                    "error), attempts (every attempt), <study>_rows (the tables of a study's stored results, "
                    "with their key: locate_rows, trace_rows).")
    p.add_argument("store", metavar="DIR", help="a results store written by 'knlens sweep'")
    p.add_argument("sql", metavar="SQL", help='e.g. "select key, status, error from tasks"')
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV instead of printing them")
    p.set_defaults(run=run)
    return p
