"""``knlens study``: a paper's study on real data, one command, its tables written into a page.

    knlens study query-localization --page benchmarks/QUERY_LOCALIZATION.md --out ql-out
    knlens study editing --page benchmarks/EDITING.md --budget-minutes 30
    knlens study syntax --page benchmarks/SYNTAX.md
    knlens study multilingual --page benchmarks/MULTILINGUAL.md --out ml-out   # Gemma-3-270M by default
    knlens study qrnca --page benchmarks/QRNCA.md --out qrnca-out
    knlens study qrnca-languages --page benchmarks/QRNCA_LANGUAGES.md --out qrnca-lang-out   # Gemma-3-270M
    knlens study twostage --page benchmarks/TWO_STAGE.md
    knlens study query-localization --model tiny-llama --relations P36 --candidates 20   # a quick look
    knlens study degenerate --page benchmarks/DEGENERATE.md --out dkn-out
    knlens study recall --page benchmarks/RECALL.md --budget-minutes 12
    knlens study spelling --page benchmarks/SPELLING.md
    knlens study entity-relation --page benchmarks/ENTITY_RELATION.md

Every study's settings dataclass is its options: each field ``some_name`` is ``--some-name`` with the field's
default (tuples take several values); ``--model`` defaults to the settings' model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knlens.cli.common import add_common_options, load_model, output_dir, save_figure, say, table, write_outputs
from knlens.core.errors import OutputError
from knlens.studies.degenerate_study import DegenerateStudySettings, degenerate_study
from knlens.studies.editing_cases import EditingSettings
from knlens.studies.editing_study import editing_study
from knlens.studies.entity_relation import EntityRelationStudySettings, entity_relation_study
from knlens.studies.multilingual_facts import MultilingualSettings
from knlens.studies.multilingual_study import multilingual_study
from knlens.studies.qrnca_languages import QRNCALanguageSettings, qrnca_language_study
from knlens.studies.qrnca_study import QRNCAStudySettings, qrnca_study
from knlens.studies.query_localization_study import QueryLocalizationSettings, query_localization_study
from knlens.studies.recall_study import RecallSettings, recall_study
from knlens.studies.spelling_study import SpellingSettings, spelling_study
from knlens.studies.syntax_study import SyntaxSettings, syntax_study
from knlens.studies.two_stage_study import TwoStageStudySettings, two_stage_study
from knlens.viz import (degenerate_page, editing_page, entity_relation_page, multilingual_page, qrnca_page,
                        query_localization_page, recall_page, spelling_page, syntax_page, two_stage_page)
from knlens.viz.language_page import write_language_html

__all__ = ["add_parser", "run", "STUDIES", "StudySpec"]


@dataclass(frozen=True)
class StudySpec:
    """A study the command runs: its settings class, ``run(model, settings, data_dir=, say=)``, its page renderer,
    a one-line description, help for the options (field name -> text) and the extra files ``--out`` gets
    (``extras(result)``: file name -> writer)."""

    settings: type
    run: Callable[..., Any]
    render: Callable[[Any], str]
    description: str
    options: dict[str, str]
    extras: Callable[[Any], dict[str, Callable[[Path], object]]] = lambda result: {}


QRNCA_OPTIONS = {
    "n_templates": "multiple-choice templates per query",
    "min_prompts": "a fact is known when answered on at least this many prompts",
    "max_prompts": "cloze prompts attributed for KN", "steps": "integration steps (fixed grid)",
    "grid": "quadrature rule: right (the paper's) or gauss-legendre (needed on Gemma-3)",
    "top_v": "neurons per query and per domain set", "threshold": "cluster: na > threshold x max",
    "common_share": "common: in more than this share of the clusters", "seed": "seed of the facts and shuffles",
    "letters": "the option letters (each a single token of the model, after a space)"}
"""Help of the options both QRNCA studies have."""


def _regions(result: Any) -> dict[str, Callable[[Path], object]]:
    return {"regions.png": lambda p: save_figure(result.plot(), p)}


STUDIES: dict[str, StudySpec] = {
    "query-localization": StudySpec(
        QueryLocalizationSettings, query_localization_study, query_localization_page.render_markdown,
        "Query localization (Chen et al., ICLR 2025) on ParaRel: consistency of knowledge neurons across paraphrases, "
        "query-KN mapping, consistency-aware selection and knowledge synapses.",
        {"relations": "ParaRel relations", "candidates": "facts read per relation before the known filter",
         "facts_per_relation": "known facts studied per relation",
         "min_prompts": "a fact is kept when known on at least this many paraphrases",
         "max_prompts": "answered paraphrases analysed per fact", "steps": "Gauss-Legendre nodes of integrated gradients",
         "threshold": "coarse neurons: score >= threshold x max",
         "generic_share": "generic: in the sets of more than this share of a relation's facts",
         "n_random": "random sets per neuron set in the mapping test",
         "k": "set size of the selection comparison and the synapse test",
         "n_controls": "random control positions per synapse test", "others": "facts of the same relation used for locality",
         "seed": "seed of the fact sample and the random sets"}),
    "editing": StudySpec(
        EditingSettings, editing_study, editing_page.render_markdown,
        "Knowledge editing on ParaRel: KN update, KN erase, consistency-aware KN, rank-one and random-neuron controls "
        "on facts the model knows, judged by reliability, generality, locality (both conventions), perplexity, "
        "Niu et al.'s bijective symmetry and synonymous invariance, and rank-one edits keyed at the subject or the "
        "relation.",
        {"relations": "ParaRel relations", "candidates": "facts read per relation before the filters",
         "synonym_candidates": "facts read for a relation with a synonymous reading (P101)",
         "budget_minutes": "stop starting new facts when the next would overrun this many minutes",
         "max_facts": "edit at most this many facts", "rank_one_layer": "the rank-one edit's layer"}),
    "syntax": StudySpec(
        SyntaxSettings, syntax_study, syntax_page.render_markdown,
        "Syntax through the knowledge-neuron instruments (Niu et al., ICLR 2024) on BLiMP: number neurons of "
        "determiner-noun and subject-verb agreement, their suppression and KN editing, and their localisation beside "
        "ParaRel facts'.",
        {"locate": "prompts per (task, number) whose attributions are pooled",
         "heldout": "new prompts per (task, number) for suppression", "n_random": "random sets per control",
         "pararel_facts": "ParaRel facts localised for the comparison (0: none)"}),
    "multilingual": StudySpec(
        MultilingualSettings, multilingual_study, multilingual_page.render_markdown,
        "One fact in many languages (Chen et al., AAAI 2024; Cao et al., 2024; MEMLA) on mParaRel: facts known in "
        "every language, language-independent neurons (LIKN) and their suppression against random sets, MATRICE "
        "against plain intersection, degenerate pairs, and the cross-lingual edit matrix (KN update vs MEMLA).",
        {"relations": "mParaRel relations", "languages": "languages (mParaRel codes)",
         "candidates": "aligned facts read per relation before the known filter",
         "max_prompts": "prompts per language read by the known filter",
         "attribute_prompts": "answered prompts per language attributed",
         "min_prompts": "a fact is known in a language when answered on at least this many prompts",
         "max_facts": "facts attributed at most",
         "budget_minutes": "stop starting new work when the next piece would overrun this many minutes",
         "locate_share": "share of the budget left after the filter that attribution may use",
         "attribution": "amig or ig", "scaling": "AMIG's scaling: authors or textbook",
         "steps": "integration steps", "grid": "quadrature rule", "threshold": "coarse neurons: score >= threshold x max",
         "p": "a language's neuron: coarse in more than p of its prompts", "n_random": "random sets per control",
         "n_resamples": "query resamples for the stability of MATRICE and intersection",
         "k": "MATRICE's penalty: mean - k std", "held_out": "languages held out in turn (default: all)",
         "degenerate_facts": "facts whose degenerate pairs are searched (0: none)",
         "degenerate_top": "degenerate pairs are drawn from this many top neurons",
         "edit_facts": "facts edited in every language (edit matrix)",
         "edit_languages": "languages the facts are edited in (default: all); each edit is judged in every language",
         "n_neighbours": "other facts testing locality", "memla_steps": "MEMLA's most Adam steps",
         "seed": "seed of the fact sample and the random sets"},
        lambda result: {} if result.neurons is None else {
            "languages.html": lambda p: write_language_html(result.neurons, p, result.tables["likn_effects"],
                                                            title="knlens study multilingual: neurons per language")}),
    "degenerate": StudySpec(
        DegenerateStudySettings, degenerate_study, degenerate_page.render_markdown,
        "Degenerate knowledge neurons by weight topology (Chen et al., 2024) on ParaRel: persistence clusters and "
        "baselines through the functional filter, robustness to one-word typos, fact checking with frequent DKNs.",
        {"relations": "ParaRel relations", "candidates": "facts read per relation before the known filter",
         "min_prompts": "a fact is kept when known on at least this many paraphrases",
         "max_prompts": "answered paraphrases used per fact", "max_facts": "facts studied at most",
         "budget_minutes": "stop starting new work when the budget would be overrun",
         "locate_share": "share of the budget for locating and clustering", "top": "located neurons per fact",
         "steps": "Gauss-Legendre nodes of integrated gradients", "mode": "structural weight: sensitivity, up or gate",
         "single_max": "degenerate: one cluster alone lowers P by less than this",
         "removes_min": "...while all clusters lower it by at least this", "n_random": "matched random sets (robustness)",
         "check_steps": "IG nodes of the fact-checking scores", "seed": "seed of the fact sample and the splits"}),
    "qrnca": StudySpec(
        QRNCAStudySettings, qrnca_study, qrnca_page.render_markdown,
        "Query-relevant neurons by NA-ICA (Chen, Dejl, Toni, 2024) on ParaRel: known facts as 4-option questions, "
        "QRNCA against Dai's KN and random sets by the PCR of boost and suppress, and the localised regions.",
        {**QRNCA_OPTIONS, "relations": "ParaRel relations (the domains)",
         "candidates": "facts read per relation before the known filter",
         "queries": "known facts per relation asked as questions"}, _regions),
    "qrnca-languages": StudySpec(
        QRNCALanguageSettings, qrnca_language_study, qrnca_page.render_markdown,
        "QRNCA with languages as the domains (Chen, Dejl, Toni, 2024) on mParaRel: each language's known facts as "
        "4-option questions in that language, QRNCA against Dai's KN and random sets by the PCR of boost and suppress "
        "across languages, and the language localised regions.",
        {**QRNCA_OPTIONS, "relations": "mParaRel relations", "languages": "the domains (mParaRel codes)",
         "candidates": "aligned facts read per relation before the known filter",
         "queries": "known facts per language and relation asked as questions",
         "filter_prompts": "prompts per language read by the known filter"}, _regions),
    "twostage": StudySpec(
        TwoStageStudySettings, two_stage_study, two_stage_page.render_markdown,
        "The two-stage filter (activation difference under a corrupted subject, then gradient x activation; the text "
        "version of Sato and Takagi's multimodal method) against integrated gradients on known ParaRel facts: overlap "
        "of top-k, effect of suppression per neuron, cost.",
        {"relations": "ParaRel relations", "candidates": "facts read per relation before the known filter",
         "facts": "facts compared", "min_prompts": "a fact is known when answered on at least this many paraphrases",
         "max_prompts": "answered paraphrases used per fact", "corruption": "remove, replace or noise (the subject)",
         "noise_samples": "noise samples averaged", "tau_a": "stage 1: delta > tau_a x max delta",
         "tau_g": "stage 2: gradient x activation > tau_g", "k": "top-k sets compared", "steps": "IG nodes",
         "n_random": "matched random sets per suppression", "seed": "seed of the facts and noise"},
        lambda result: {"suppression.png": lambda p: save_figure(result.plot(), p)}),
    "recall": StudySpec(
        RecallSettings, recall_study, recall_page.render_markdown,
        "Factual recall in two-hop reasoning (Wang et al., EMNLP 2024) on ParaRel chains: recall score of the first "
        "hop's knowledge neurons while the model reads the question and a chain of thought, enhance / suppress "
        "against matched random sets with and without chain of thought, shortcuts, conflicting context.",
        {"relations": "ParaRel relations; every chain of knlens.data.two_hop.CHAINS among them is used",
         "candidates": "questions per chain read before the known filter",
         "max_prompts": "ParaRel prompts per hop", "min_prompts": "a hop is known when answered on this many prompts",
         "attribute_prompts": "answered first-hop prompts attributed", "max_questions": "questions studied at most",
         "steps": "Gauss-Legendre nodes of integrated gradients", "n_random": "matched random sets per question",
         "threshold": "recalled: peak recall score >= threshold",
         "bridge_tokens": "most tokens generated for the bridge in the chain of thought",
         "budget_minutes": "stop starting new questions when the next would overrun this many minutes",
         "seed": "seed of the question sample and the random sets"}),
    "spelling": StudySpec(
        SpellingSettings, spelling_study, spelling_page.render_markdown,
        "Spelling-out (Hiraoka & Inui): per-layer probes of each character of a token (with a control task), the "
        "breakthrough layer, the model's few-shot spelling, attention to the source token and character neurons.",
        {"words": "spellable tokens sampled from the vocabulary", "given": "words to spell instead of a sample",
         "n_chars": "characters probed per word", "min_chars": "a spellable token has at least this many letters",
         "shots": "the few-shot examples", "test_share": "share of the words held out for testing",
         "min_per_class": "a letter needs this many words to be probed", "neuron_words": "words per character "
         "attributed by integrated gradients (0: none)", "steps": "Gauss-Legendre nodes of integrated gradients",
         "top": "a word's top neurons", "budget_minutes": "stop starting new work that would overrun this",
         "seed": "seed of the word sample and the splits"}),
    "entity-relation": StudySpec(
        EntityRelationStudySettings, entity_relation_study, entity_relation_page.render_markdown,
        "Entity versus relation (Wei et al., Meng et al.) on ParaRel: causal tracing with the subject or the relation "
        "tokens corrupted, averaged by token group with intervals, and tracing with the MLP or attention path severed.",
        {"relations": "ParaRel relations", "candidates": "facts read per relation before the known filter",
         "max_facts": "facts traced at most", "samples": "noise samples per trace",
         "sever_at": "tokens where the MLP/attention paths are severed: 'last corrupted', 'last'",
         "budget_minutes": "stop starting new facts when the next would overrun this", "seed": "seed of the fact sample"}),
}


def _write_page(path: str, text: str) -> Path:
    page = Path(path)
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text)
    except OSError as err:
        raise OutputError(f"cannot write --page {path!r}: {err.strerror or err}") from err
    return page


def run(args: argparse.Namespace) -> int:
    """Run ``knlens study NAME``: the study's table on stdout; ``--page`` the Markdown page, ``--out`` the result."""
    spec = STUDIES[args.name]
    fields = {f.name for f in dataclasses.fields(spec.settings)} - {"model"}
    settings = spec.settings(model=args.model, **{k: (tuple(v) if isinstance(v, list) else v)
                                                  for k, v in vars(args).items() if k in fields})
    out = output_dir(args.out) if args.out else None
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    t0 = time.time()
    result = spec.run(model, settings, data_dir=args.data_dir,
                      say=lambda msg: say(args, f"[{time.time() - t0:6.0f}s] {msg}"))
    print(table(result.to_frame()), flush=True)
    if args.page:
        print(f"\nwrote {_write_page(args.page, spec.render(result))}", flush=True)
    if out is not None:
        write_outputs(out, result, {"study.md": lambda p: p.write_text(spec.render(result)), **spec.extras(result)})
    return 0


def _add_settings(p: argparse.ArgumentParser, spec: StudySpec) -> None:
    """One option per settings field (but ``model``), typed by its default."""
    defaults = spec.settings()
    for f in dataclasses.fields(spec.settings):
        if f.name == "model":
            continue
        default, flag = getattr(defaults, f.name), f"--{f.name.replace('_', '-')}"
        text = spec.options.get(f.name, f.name.replace("_", " "))
        if isinstance(default, tuple):
            p.add_argument(flag, nargs="+", default=list(default), help=f"{text} (default: %(default)s)")
        else:
            kind = type(default) if default is not None else (int if "int" in str(f.type) else float)
            p.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``study`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "study", help="run a paper's study on real data (ParaRel, BLiMP) and write its tables",
        description="Run a study on real data and write its tables: " + " ".join(
            f"{name}: {spec.description}" for name, spec in STUDIES.items()))
    studies = p.add_subparsers(dest="name", metavar="STUDY", required=True)
    for name, spec in STUDIES.items():
        s = studies.add_parser(name, help=spec.description, description=spec.description)
        add_common_options(s, out_help="save the study (result.json, tensors.safetensors) and study.md there")
        s.set_defaults(model=spec.settings().model)
        s.add_argument("--page", metavar="FILE.md", help="write the Markdown page there (e.g. benchmarks/"
                                                         f"{name.upper().replace('-', '_')}.md)")
        s.add_argument("--data-dir", metavar="DIR", help="data folder (default: knlens.data's default)")
        s.add_argument("--threads", type=int, default=1,
                       help="torch threads (default: %(default)s; on a shared 2-core machine 2 threads ran 10x slower)")
        _add_settings(s, spec)
    p.set_defaults(run=run)
    return p
