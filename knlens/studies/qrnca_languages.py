"""The QRNCA study with languages as the domains (Chen, Dejl, Toni, 2024: "language neurons"; docs/methods.md, Query-relevant neurons).

Facts of the ``relations`` aligned across ``languages`` in mParaRel (:func:`~knlens.data.multilingual.load_multilingual`,
``candidates`` per relation), each language's version filtered by the model's greedy answer on its first
``filter_prompts`` prompts; per language and relation the first ``queries`` known facts become 4-option questions
in that language (options: the relation's objects in that language; the frame, "Question:", "Answer:", translated by
:data:`~knlens.methods.structure.multiple_choice.TEMPLATES_BY_LANGUAGE`, English where knlens has none). Facts known
in every language come first, so the languages share as many facts as the model allows and a language's set is not
just a set of other facts. Then the domain machinery of :func:`~knlens.studies.qrnca_study.qrnca_domains`: QRNCA, KN
and random sets per language, their PCR on the language's own questions against the other languages', and the
language "localised regions" (layer × neuron-bin counts of each language's QRNCA neurons).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from knlens.core.errors import SettingsError
from knlens.core.facts import Fact
from knlens.data.multilingual import MultilingualFact, load_multilingual
from knlens.methods.known import known_facts
from knlens.methods.structure.multiple_choice import MCQuery, check_letters, multiple_choice, templates_for
from knlens.studies.qrnca_study import QRNCAStudy, QRNCAStudySettings, qrnca_domains

__all__ = ["QRNCALanguageSettings", "qrnca_language_study", "PAPER_LANGUAGES"]

# Llama-2-7B-chat, Chen, Dejl and Toni (2024): PCR of language boost / suppress [paper]
PAPER_LANGUAGES = {"QRNCA": {"boost": 41.2, "suppress": 36.0}, "KN": {"boost": 6.7, "suppress": 1.8},
                   "random": {"boost": 2.0, "suppress": 1.0}}


@dataclass(frozen=True)
class QRNCALanguageSettings(QRNCAStudySettings):
    """The language study's sizes (defaults: the run of ``benchmarks/QRNCA_LANGUAGES.md``); ``queries`` is per
    language and relation, ``filter_prompts`` the prompts per language the known filter reads."""

    model: str = "gemma3-270m"
    relations: tuple[str, ...] = ("P30",)  # continent: known in every language most often (MULTILINGUAL.md)
    languages: tuple[str, ...] = ("en", "fr", "it", "pt", "de")
    candidates: int = 40
    queries: int = 5
    n_templates: int = 3
    steps: int = 32  # Gemma-3's RMSNorm after the MLP puts the whole effect near alpha = 0: Gauss-Legendre 32 nodes
    grid: str = "gauss-legendre"  # leave 3-9 % of it unexplained, right Riemann 160 still 37-60 % (RESULTS.md)
    filter_prompts: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.filter_prompts < 1:
            raise SettingsError("filter_prompts must be at least 1")

    def _check_domains(self) -> None:
        if len(set(self.languages)) < 2:
            raise SettingsError(f"PCR needs unrelated queries: give at least 2 languages, got {list(self.languages)}")
        if not self.relations:
            raise SettingsError("give at least one mParaRel relation")


def _language_queries(model: Any, s: QRNCALanguageSettings, data_dir: str | None,
                      given: Sequence[MultilingualFact] | None, say: Callable[[str], None]
                      ) -> tuple[list[MCQuery], list[Fact], list[str], pd.DataFrame]:
    """Every language's questions, the cloze facts for KN, each question's language, the counts per filter."""
    queries, cloze, domains, counts = [], [], [], []
    for rel in s.relations:
        if given is None:
            read: Sequence[MultilingualFact] = load_multilingual(rel, s.languages, data_dir, max_facts=s.candidates,
                                                                 seed=s.seed)
            aligned = int(read.counts["aligned"].iloc[0])
        else:
            read = [m for m in given if m.relation == rel]
            aligned = len(read)
        known: dict[str, list[Fact]] = {}
        for lang in s.languages:
            facts = [replace(m[lang], prompts=m[lang].prompts[:s.filter_prompts], name=f"{m.key}@{lang}")
                     for m in read]
            known[lang] = facts if given is not None else known_facts(model, facts, keep_prompts="correct",
                                                                       min_prompts=s.min_prompts)
        in_all = set.intersection(*({f.name.split("@")[0] for f in fs} for fs in known.values()))
        for lang in s.languages:
            chosen = sorted(known[lang], key=lambda f: f.name.split("@")[0] not in in_all)[:s.queries]
            templates, written = templates_for(lang)
            options = [replace(m[lang], name=f"{m.key}@{lang}") for m in read]
            names = {f.name for f in chosen}
            mine = [q for q in multiple_choice(options, n_templates=s.n_templates, seed=s.seed, letters=s.letters,
                                               templates=templates) if q.name in names]
            queries += mine
            domains += [lang] * len(mine)
            cloze += [replace(f, prompts=f.prompts[:s.max_prompts]) for f in chosen]
            counts.append({"relation": rel, "language": lang, "aligned": aligned,
                           "read": len(read), "known": len(known[lang]), "known in all languages": len(in_all),
                           "queries": len(mine), "shared with every language": sum(f.name.split("@")[0] in in_all
                                                                                   for f in chosen),
                           "objects (options drawn from)": len({f.target for f in options}),
                           "template language": written})
            say(f"{rel} {lang}: {len(read)} read, {len(known[lang])} known, {len(mine)} queries")
    return queries, cloze, domains, pd.DataFrame(counts)


def qrnca_language_study(model: Any, settings: QRNCALanguageSettings = QRNCALanguageSettings(), *,
                         data_dir: str | None = None, facts: Sequence[MultilingualFact] | None = None,
                         say: Callable[[str], None] = lambda _: None) -> QRNCAStudy:
    """Run the language study on ``model`` (see the module) and return every table (the domains are languages).
    ``facts`` (each in every one of ``settings.languages``) replace the mParaRel facts and their known filter, as in
    :func:`~knlens.studies.qrnca_study.qrnca_study`."""
    t0 = time.time()
    check_letters(model, settings.letters)
    queries, cloze, domains, counts = _language_queries(model, settings, data_dir, facts, say)
    return qrnca_domains(model, settings, queries, cloze, domains, counts, t0=t0, paper=PAPER_LANGUAGES, say=say)
