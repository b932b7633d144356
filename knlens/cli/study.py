"""``knlens study``: a paper's study on real data, one command, its tables written into a page.

    knlens study query-localization --page benchmarks/QUERY_LOCALIZATION.md --out ql-out
    knlens study query-localization --model tiny-llama --relations P36 --candidates 20   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from knlens.cli.common import add_common_options, load_model, output_dir, say, table, write_outputs
from knlens.core.errors import OutputError
from knlens.studies.query_localization_study import QueryLocalizationSettings, query_localization_study
from knlens.viz.query_localization_page import render_markdown

__all__ = ["add_parser", "run", "STUDIES"]

STUDIES = ("query-localization",)
_DEFAULTS = QueryLocalizationSettings()


def _write_page(path: str, text: str) -> Path:
    page = Path(path)
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text)
    except OSError as err:
        raise OutputError(f"cannot write --page {path!r}: {err.strerror or err}") from err
    return page


def run(args: argparse.Namespace) -> int:
    """Run ``knlens study``: the study's tests on stdout; ``--page`` the Markdown page, ``--out`` the result."""
    fields = {f.name for f in dataclasses.fields(QueryLocalizationSettings)} - {"model"}
    settings = QueryLocalizationSettings(model=args.model, **{k: (tuple(v) if isinstance(v, list) else v)
                                                              for k, v in vars(args).items() if k in fields})
    out = output_dir(args.out) if args.out else None
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    t0 = time.time()
    result = query_localization_study(model, settings, data_dir=args.data_dir,
                                      say=lambda msg: say(args, f"[{time.time() - t0:6.0f}s] {msg}"))
    print(table(result.to_frame()), flush=True)
    if args.page:
        print(f"\nwrote {_write_page(args.page, render_markdown(result))}", flush=True)
    if out is not None:
        write_outputs(out, result, {"study.md": lambda p: p.write_text(render_markdown(result))})
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``study`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "study", help="run a paper's study on real data (ParaRel) and write its tables",
        description="Query localization (Chen et al., ICLR 2025) on ParaRel: consistency of knowledge neurons "
                    "across paraphrases, query-KN mapping, consistency-aware selection and knowledge synapses, "
                    "with the number of facts kept by each filter, the versions used and the limitations.")
    p.add_argument("name", choices=STUDIES, help="the study")
    add_common_options(p, out_help="save the study (result.json, tensors.safetensors) and study.md there")
    p.add_argument("--page", metavar="FILE.md", help="write the Markdown page there (e.g. benchmarks/QUERY_LOCALIZATION.md)")
    p.add_argument("--data-dir", metavar="DIR", help="ParaRel data folder (default: knlens.data's default)")
    p.add_argument("--relations", nargs="+", default=list(_DEFAULTS.relations), help="ParaRel relations (default: %(default)s)")
    for name, help_text in (("candidates", "facts read per relation before the known filter"),
                            ("facts-per-relation", "known facts studied per relation"),
                            ("min-prompts", "a fact is kept when known on at least this many paraphrases"),
                            ("max-prompts", "answered paraphrases analysed per fact"),
                            ("steps", "Gauss-Legendre nodes of integrated gradients"),
                            ("n-random", "random sets per neuron set in the mapping test"),
                            ("k", "set size of the selection comparison and the synapse test"),
                            ("n-controls", "random control positions per synapse test"),
                            ("others", "facts of the same relation used for locality"),
                            ("seed", "seed of the fact sample and the random sets")):
        p.add_argument(f"--{name}", type=int, default=getattr(_DEFAULTS, name.replace("-", "_")),
                       help=f"{help_text} (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=_DEFAULTS.threshold,
                   help="coarse neurons: score >= threshold x max (default: %(default)s)")
    p.add_argument("--generic-share", type=float, default=_DEFAULTS.generic_share,
                   help="generic: in the sets of more than this share of a relation's facts (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; on a shared 2-core machine 2 threads ran 10x slower)")
    p.set_defaults(run=run)
    return p
