"""``knlens qrnca``: query-relevant neurons by NA-ICA / QRNCA of ParaRel facts asked as multiple-choice questions.

    knlens qrnca --relations P36 P30 --queries 3 --templates 3 --steps 8 --out qrnca-out
"""

from __future__ import annotations

import argparse
from typing import Any

from knlens.cli.common import add_common_options, load_model, output_dir, save_figure, say, table, write_outputs
from knlens.core.errors import CommandLineError
from knlens.data.pararel import load_pararel
from knlens.methods.attribution.ig import attribute_facts
from knlens.methods.known import known_facts
from knlens.methods.structure.multiple_choice import check_letters, multiple_choice
from knlens.methods.structure.qrnca import QRNCASettings, query_relevant_neurons

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``knlens qrnca``: the query-relevant neurons per query on stdout; with ``--out`` the result and the
    localised-regions plot."""
    if min(args.queries, args.templates, args.steps, args.top_v) < 1:
        raise CommandLineError("--queries, --templates, --steps and --top-v must be at least 1")
    out = output_dir(args.out) if args.out else None
    model = load_model(args)
    check_letters(model, tuple(args.letters))
    queries = []
    for rel in args.relations:
        read = load_pararel(rel, data_dir=args.data_dir, max_facts=args.candidates, seed=args.seed)
        keep = read if args.all_facts else known_facts(model, read, keep_prompts="correct")
        names = {f.name for f in keep[:args.queries]}
        mine = [q for q in multiple_choice(read, n_templates=args.templates, seed=args.seed,
                                           letters=tuple(args.letters)) if q.name in names]
        say(args, f"{rel}: {len(read)} facts read, {len(keep)} kept, {len(mine)} asked")
        queries += mine
    if not queries:
        raise CommandLineError("no query left: the model knows none of the facts read (pass --all-facts or more "
                               "--candidates)")
    attrs = attribute_facts(model, [f for q in queries for f in q.facts()], steps=args.steps, tolerance=None)
    per_query = [[a for x in attrs[i * args.templates:(i + 1) * args.templates] for a in x] for i in range(len(queries))]
    res = query_relevant_neurons(per_query, [q.name for q in queries],
                                 QRNCASettings(threshold=args.threshold, top_v=args.top_v, common_share=args.common_share))
    print(table(res.to_frame().groupby("query").head(args.show)), flush=True)
    print(f"\ncommon neurons removed (in > {args.common_share:.0%} of {len(queries)} clusters): "
          f"{' '.join(map(str, res.common)) or 'none'}", flush=True)
    if out is not None:
        write_outputs(out, res, {"qrnca.csv": lambda p: res.to_frame().to_csv(p, index=False),
                                 "regions.png": lambda p: save_figure(res.plot(), p)})
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``qrnca`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "qrnca", help="query-relevant neurons (NA-ICA / QRNCA) of ParaRel facts asked as 4-option questions",
        description="Ask known ParaRel facts as multiple-choice prompts (options: objects of the same relation, "
                    "shuffled per template), attribute the answer letter by integrated gradients, and rank neurons by "
                    "na x ica with common neurons removed (Chen, Dejl, Toni, 2024).")
    add_common_options(p, out_help="write the result (result.json, tensors.safetensors), qrnca.csv and regions.png")
    p.add_argument("--relations", nargs="+", default=["P36", "P30"], help="ParaRel relations (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=30, help="facts read per relation (default: %(default)s)")
    p.add_argument("--queries", type=int, default=3, help="queries per relation (default: %(default)s)")
    p.add_argument("--all-facts", action="store_true", help="do not keep only the facts the model knows")
    p.add_argument("--templates", type=int, default=3, help="multiple-choice templates per query (default: %(default)s)")
    p.add_argument("--letters", nargs=4, default=["A", "B", "C", "D"], help="option letters (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="integration steps (default: %(default)s, the paper's m)")
    p.add_argument("--top-v", type=int, default=20, help="neurons per query (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.2, help="cluster: na > threshold x max (default: %(default)s)")
    p.add_argument("--common-share", type=float, default=0.3,
                   help="common neurons: in more than this share of clusters (default: %(default)s)")
    p.add_argument("--show", type=int, default=5, help="neurons printed per query (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the facts and shuffles (default: %(default)s)")
    p.add_argument("--data-dir", metavar="DIR", help="data folder (default: knlens.data's default)")
    p.set_defaults(run=run)
    return p
