"""``knlens edit``: rewrite a fact in the weights and judge the edit (docs/methods.md, editing evaluation).

    knlens edit --fact capital-france --new " Berlin" --editor rank-one --control --out edit-out
    knlens edit --prompt "The capital of France is" --prompt "France's capital city is" --target " Paris" \\
        --subject France --new " Berlin" --editor kn-update --editor rank-one
    knlens edit --fact capital-france --new " Rome" --symmetry --relation-question \\
        --editor rank-one --editor rank-one-relation --out edit-out     # criteria; entity vs relation key

Every edit is applied, measured and undone in turn; the model's weights end as they started.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from knlens.cli.common import (add_common_options, builtin_fact, load_model, output_dir, save_figure, say, table,
                               write_outputs)
from knlens.core.errors import CommandLineError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.data.builtin import builtin_facts
from knlens.methods.attribution.ig import attribute
from knlens.data.pararel import reverse_templates
from knlens.data.synonyms import SYNONYM_READINGS
from knlens.methods.editing.criteria import relation_probes, symmetry_probes, synonym_probes
from knlens.methods.editing.editors import (EditRequest, Editor, Probe, kn_erase_editor, kn_update_editor,
                                            memla_editor, random_editor, rank_one_editor)
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.result import EditEvaluation
from knlens.methods.selection import best_by_mean, refined_neurons
from knlens.viz.edit_page import write_edit_html

__all__ = ["add_parser", "run"]

EDITORS = ("rank-one", "rank-one-relation", "kn-update", "kn-erase", "memla")


def _neurons(text: str) -> NeuronSet:
    """``"12:345,13:7"`` as a NeuronSet."""
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise CommandLineError(f"--neurons takes LAYER:INDEX pairs separated by commas, e.g. 12:345,13:7; got {text!r}")
    return NeuronSet(pairs)


def _request(args: argparse.Namespace) -> EditRequest:
    """The fact to edit (a built-in fact or --prompt/--target), the new object, and the neighbours: up to
    --neighbours other built-in facts of the fact's relation, then each --neighbour."""
    if args.fact and (args.prompt or args.target):
        raise CommandLineError("give either --fact NAME or --prompt P --target T, not both")
    if args.fact:
        fact = builtin_fact(args.fact)
        if args.subject:
            fact = Fact(fact.prompts, fact.target, args.subject, fact.relation, fact.name)
        others = [f for f in builtin_facts(fact.relation) if f.name != fact.name] if fact.relation else []
    elif args.prompt and args.target is not None:
        fact, others = Fact(tuple(args.prompt), args.target, args.subject, name="prompts"), []
    else:
        raise CommandLineError("no fact given: use --fact NAME or --prompt P (repeatable) --target T")
    if args.neighbours < 0:
        raise CommandLineError(f"--neighbours must be at least 0, got {args.neighbours}")
    if args.new is None:
        raise CommandLineError("--new T is required: the object to write, e.g. ' Berlin'")
    named = [builtin_fact(n) for n in args.neighbour or []]
    return EditRequest(fact, args.new, tuple(others[:args.neighbours] + named), _probes(args, fact, others))


def _probes(args: argparse.Namespace, fact: Fact, others: list[Fact]) -> list[Probe]:
    """The criteria's prompts asked for: bijective symmetry, synonymous invariance, the relation question."""
    wanted = args.symmetry or args.synonym or args.synonym_template or args.relation_question
    if wanted and not fact.subject:
        raise CommandLineError("the editing criteria need the subject: give --subject S")
    probes: list[Probe] = []
    if args.symmetry:
        new_subject = args.new_subject or next((f.subject for f in others if f.target.strip() == args.new.strip()
                                                and f.subject), None)
        if new_subject is None:
            raise CommandLineError(f"--symmetry needs the subject whose object is {args.new!r} (the reverse prompts' "
                                   f"answer before the edit): give --new-subject S")
        if not fact.relation:
            raise CommandLineError("--symmetry reads the reverse templates of the fact's relation: use --fact NAME")
        probes += symmetry_probes(fact.subject, fact.target, args.new, new_subject, reverse_templates(fact.relation))
    if args.synonym:
        reading = SYNONYM_READINGS.get(fact.relation or "")
        if reading is None:
            raise CommandLineError(f"--synonym: relation {fact.relation!r} has no synonymous reading "
                                   f"({', '.join(SYNONYM_READINGS)}); give --synonym-template T instead")
        probes += synonym_probes(fact.subject, fact.target, args.new, reading.templates, reading.table)
    if args.synonym_template:
        probes += synonym_probes(fact.subject, fact.target, args.new, args.synonym_template)
    if args.relation_question:
        probes += relation_probes(fact, args.new, word=args.relation_word)
    return probes


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--steps", args.steps, 1), ("--ig-steps", args.ig_steps, 1),
                             ("--control-neurons", args.control_neurons, 1), ("--n-text", args.n_text, 0)):
        if value < low:
            raise CommandLineError(f"{flag} must be at least {low}, got {value}")


def _editors(args: argparse.Namespace, model: Any, request: EditRequest, neurons: NeuronSet | None
             ) -> dict[str, Editor]:
    """The chosen editors (KN editors on ``neurons``, or on the fact's refined neurons), then the control."""
    chosen = list(dict.fromkeys(args.editor or ["rank-one"]))
    editors: dict[str, Editor] = {}
    if neurons is None and any(e.startswith("kn-") or e == "memla" for e in chosen):
        say(args, f"locating the fact's neurons (integrated gradients, {args.ig_steps} steps) ...")
        attrs = attribute(model, request.fact, steps=args.ig_steps)
        neurons = refined_neurons(attrs, preset="dai") or best_by_mean(attrs, 3)
        say(args, f"neurons: {', '.join(str(n) for n in neurons)}")
    for name in chosen:
        if name.startswith("rank-one"):
            key_at = "relation" if name == "rank-one-relation" else "subject"
            editors[name] = rank_one_editor(layer=args.layer, steps=args.steps, key_at=key_at)
        elif name == "memla":
            editors[name] = memla_editor(lambda r: neurons)
        elif name == "kn-update":
            editors[name] = kn_update_editor(lambda r: neurons, lambda1=args.lambda1, lambda2=args.lambda2)
        else:
            editors[name] = kn_erase_editor(lambda r: neurons)
    if args.control:
        first = chosen[0]
        say(args, f"control: random neurons moved with the norm of the {first} edit")
        editors["random"] = random_editor(first, n_neurons=args.control_neurons if first.startswith("rank-one")
                                          else None)
    return editors


def run(args: argparse.Namespace) -> int:
    """Run ``knlens edit``: print the editors × metrics table; with ``--out``, save the evaluation, its tables,
    its figure, the before/after page (``report.html``) and each edit (``edits/<editor>/``)."""
    _check(args)
    request = _request(args)
    neurons = _neurons(args.neurons) if args.neurons else None
    out = output_dir(args.out) if args.out else None
    model = load_model(args)
    editors = _editors(args, model, request, neurons)
    say(args, f"editing {request.fact.prompts[0]!r}: {request.fact.target!r} -> {request.new_target!r} with "
              f"{', '.join(editors)}; {len(request.neighbours)} neighbouring facts")
    made: dict[str, Any] = {}

    def keep(name: str, editor: Editor) -> Editor:
        def wrapped(m: Any, r: EditRequest, previous: Any) -> Any:
            made[name] = editor(m, r, previous)
            return made[name]
        return wrapped

    ev = evaluate_edits(model, [request], {n: keep(n, e) for n, e in editors.items()}, n_text=args.n_text,
                        progress=not args.quiet)
    print(_summary(ev), flush=True)
    if out is not None:
        extras = {"metrics.csv": lambda p: ev.metrics().to_csv(p, index=False),
                  "prompts.csv": lambda p: ev.to_frame().to_csv(p, index=False),
                  "evaluation.png": lambda p: save_figure(ev.plot(), p),
                  "report.html": lambda p: write_edit_html(ev, p)}
        write_outputs(out, ev, extras)
        for name, edit in made.items():
            edit.save(Path(out) / "edits" / name)
        print(f"wrote the edits into {Path(out) / 'edits'} (knlens.methods.editing.edit.Edit.load)", flush=True)
    return 0


def _summary(ev: EditEvaluation) -> str:
    """Per editor the edit's size, then the metrics with their value before the edit."""
    m = ev.metrics()[["editor", "metric", "convention", "before", "mean"]].rename(columns={"mean": "after"})
    sizes = ev.edits[["editor", "editor_kind", "n_changed", "delta_norm"]]
    return "\n".join(["edits", table(sizes), "", "metrics (one fact: no interval)", table(m)])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``edit`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "edit", help="rewrite a fact in the weights (rank-one or knowledge-neuron edits) and judge the edit",
        description="Build each edit on the unedited model, apply it, measure reliability (edit prompt), generality "
                    "(the other prompts), locality (neighbouring facts: EasyEdit agreement and gold accuracy) and "
                    "the perplexity change on a text sample, then undo it exactly.")
    add_common_options(p, out_help="write the evaluation (result.json, tensors.safetensors), metrics.csv, "
                                   "prompts.csv, evaluation.png, report.html (before/after probabilities per "
                                   "prompt group, offline) and each edit under edits/ there")
    p.add_argument("--fact", metavar="NAME", help="a built-in fact; its first prompt is the edit prompt")
    p.add_argument("--prompt", metavar="P", action="append", help="a prompt (repeatable; the first is edited)")
    p.add_argument("--target", metavar="T", help="the true object after --prompt, e.g. ' Paris'")
    p.add_argument("--subject", metavar="S", help="the subject as written in the prompts (the rank-one key)")
    p.add_argument("--new", metavar="T", help="the object to write, e.g. ' Berlin'")
    p.add_argument("--editor", action="append", choices=EDITORS,
                   help="rank-one (default; key at the subject's last token), rank-one-relation (key at the "
                        "relation's last token), kn-update, kn-erase or memla (MEMLA's masked update of the "
                        "neurons' value vectors); repeatable")
    p.add_argument("--control", action="store_true",
                   help="add random neurons moved with the first editor's norm (the control to beat)")
    p.add_argument("--control-neurons", type=int, default=10,
                   help="random neurons of the control of a rank-one edit (default: %(default)s)")
    p.add_argument("--neurons", metavar="L:I,...", help="the KN editors' and MEMLA's neurons (default: located by integrated "
                                                        "gradients and Dai's refinement)")
    p.add_argument("--ig-steps", type=int, default=20, help="integration steps when locating (default: %(default)s)")
    p.add_argument("--lambda1", type=float, default=1.0, help="KN update: step away from the old object (default 1)")
    p.add_argument("--lambda2", type=float, default=8.0, help="KN update: step towards the new object (default 8)")
    p.add_argument("--layer", type=int, help="the rank-one edit's layer (default: a quarter of the way up)")
    p.add_argument("--steps", type=int, default=20, help="rank-one optimisation steps (default: %(default)s)")
    p.add_argument("--neighbours", type=int, default=4,
                   help="neighbouring facts of the same relation for locality (default: %(default)s)")
    p.add_argument("--neighbour", metavar="NAME", action="append", help="a built-in fact as a neighbour (repeatable)")
    p.add_argument("--symmetry", action="store_true",
                   help="bijective symmetry: ask the reverse prompts of the new and the old object (ParaRel's "
                        "reverse templates of the fact's relation; P36, P1376, P47, P530, P190)")
    p.add_argument("--new-subject", metavar="S", help="--symmetry: the subject whose object is --new (default: the "
                                                      "built-in fact of the relation with that object)")
    p.add_argument("--synonym", action="store_true",
                   help="synonymous invariance through the relation's synonymous reading (P101: '[X] is a famous' "
                        "and the field -> occupation table)")
    p.add_argument("--synonym-template", metavar="T", action="append",
                   help="a synonymous template with [X] for the subject, same objects (repeatable)")
    p.add_argument("--relation-question", action="store_true",
                   help="ask the relation between the subject and the new (old) object: its word against ' None'")
    p.add_argument("--relation-word", metavar="W", help="the relation's word for --relation-question, e.g. ' capital'")
    p.add_argument("--n-text", type=int, default=100,
                   help="sentences of the perplexity sample (0: none; default: %(default)s)")
    p.set_defaults(run=run)
    return p
