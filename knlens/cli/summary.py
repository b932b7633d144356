"""``knlens summary``: an offline HTML page over a results store (README, Sweeps).

    knlens summary runs/ --out runs-summary.html
"""

from __future__ import annotations

import argparse
from typing import Any

from knlens.cli.common import say
from knlens.store.store import Store
from knlens.viz.store_page import write_store_page

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``knlens summary``: write the store's summary page (:func:`knlens.viz.store_page.render_store`)."""
    store = Store(args.store, create=False)
    say(args, f"summarising {store.path} ...")
    path = write_store_page(store, args.out)
    print(f"wrote {path}", flush=True)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``summary`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "summary", help="an offline HTML summary page of a results store",
        description="Tasks by study and status (failed ones with their error), and per setting group (study, "
                    "model, settings, knlens version; never mixed): for locate, per relation the facts, the "
                    "share with refined neurons, their layers and the interventions against random controls; "
                    "for trace, the mean indirect effect per layer and kind. Self-contained: works offline.")
    p.add_argument("store", metavar="DIR", help="a results store written by 'knlens sweep'")
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML page to write (e.g. summary.html)")
    p.add_argument("--quiet", action="store_true", help="no status messages")
    p.set_defaults(run=run)
    return p
