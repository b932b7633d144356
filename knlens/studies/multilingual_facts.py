"""The facts of the multilingual study: mParaRel facts a model knows in every chosen language, counted at each
filter (docs/methods.md, the multilingual study).

Per relation, :func:`select_facts` counts what survives each filter, in this order:

1. **aligned** — facts present in every language (same subject and object URI; object-last templates);
2. **read** — a random subset of ``candidates`` of them (``seed``), each language's prompts cut to its first
   ``max_prompts`` templates (the known filter reads every prompt it keeps, and Gemma is slow on a CPU);
3. **known in <language>**, one language after the other in the order given — answered (greedy; a multi-token
   object teacher-forced, every token the argmax) on at least ``min_prompts`` of those prompts, among the facts
   known in every language before it (a funnel: the filter reads each language only for the facts still in, so
   many candidates cost little when the first language is the best known); the last such row counts the facts
   studied, each language keeping only its answered prompts;
4. **attributed** — the study's own count: facts attributed before its budget ran out.

The facts are interleaved across relations (round robin), so a study cut short still covers every relation.

>>> MultilingualSettings(languages=("en",))
Traceback (most recent call last):
...
knlens.core.errors.SettingsError: the multilingual study needs at least 2 languages (3 to hold one out), got ('en',)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from knlens.core.errors import SettingsError
from knlens.data.multilingual import MultilingualFact, MultilingualFacts, load_multilingual
from knlens.methods.multilingual.known import known_in_all
from knlens.studies.editing_cases import interleave

__all__ = ["MultilingualSettings", "select_facts", "shorten", "FILTER_COLUMNS"]

FILTER_COLUMNS = ("relation", "filter", "facts")


@dataclass(frozen=True)
class MultilingualSettings:
    """The study's data, sizes and time budget (defaults: the run of ``benchmarks/MULTILINGUAL.md``)."""

    model: str = "gemma3-270m"
    relations: tuple[str, ...] = ("P30", "P1376")  # continent, capital of: known in most languages (methods.md)
    languages: tuple[str, ...] = ("en", "fr", "it", "pt", "de")
    candidates: int = 100  # aligned facts read per relation before the known filter
    max_prompts: int = 4  # prompts per language read by the known filter
    attribute_prompts: int = 2  # answered prompts per language attributed (the first ones)
    min_prompts: int = 1  # a fact is known in a language when answered on at least this many of them
    max_facts: int = 8  # facts attributed at most
    budget_minutes: float = 45.0  # stop starting new work when the next piece would overrun this
    locate_share: float = 0.4  # share of the budget left after the filter that attribution may use
    attribution: str = "ig"  # "ig" (zero baseline) or "amig" (the prompt length times slower)
    scaling: str = "authors"  # AMIG's scaling: "authors" (their code) or "textbook"
    steps: int = 8  # integration steps
    grid: str = "gauss-legendre"  # quadrature rule of the integration
    threshold: float = 0.3  # coarse neurons: score >= threshold x the prompt's max (AMIG, MEMLA)
    p: float = 0.5  # a language's neuron: coarse in more than p of its prompts
    n_random: int = 8  # random sets per control
    n_resamples: int = 10  # resamples of the queries for the stability of MATRICE and intersection
    k: float = 1.0  # MATRICE's penalty: mean - k std
    held_out: tuple[str, ...] = ("de",)  # languages held out in turn for MATRICE vs intersection (empty: all)
    degenerate_facts: int = 1  # facts whose degenerate pairs are searched in every language (0: none)
    degenerate_top: int = 20  # pairs are drawn from a language's top neurons by mean attribution
    edit_facts: int = 3  # facts edited in every language for the cross-lingual edit matrix
    edit_languages: tuple[str, ...] = ()  # languages the facts are edited in, in turn (empty: all); judged in all
    n_neighbours: int = 3  # other facts whose prompts test locality in each evaluation language
    memla_steps: int = 60  # MEMLA's most Adam steps
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.languages)) < 2:
            raise SettingsError(f"the multilingual study needs at least 2 languages (3 to hold one out), "
                                f"got {self.languages}")
        for name in ("held_out", "edit_languages"):
            unknown = sorted(set(getattr(self, name)) - set(self.languages))
            if unknown:
                raise SettingsError(f"{name} language(s) {unknown} are not among the languages {self.languages}")
        if min(self.candidates, self.max_prompts, self.attribute_prompts, self.min_prompts, self.max_facts, self.n_random, self.edit_facts,
               self.memla_steps) < 1 or min(self.degenerate_facts, self.n_neighbours) < 0 or self.degenerate_top < 2:
            raise SettingsError("candidates, max_prompts, attribute_prompts, min_prompts, max_facts, n_random, edit_facts and memla_steps "
                                "must be at least 1, degenerate_facts and n_neighbours at least 0, degenerate_top 2")
        if self.n_resamples < 2 or not 0.0 < self.locate_share <= 1.0 or self.budget_minutes <= 0:
            raise SettingsError("n_resamples must be at least 2, locate_share in (0, 1], budget_minutes positive")


def shorten(m: MultilingualFact, n: int) -> MultilingualFact:
    """``m`` with at most ``n`` prompts in each language (the first ones)."""
    return MultilingualFact(m.relation, m.subject_uri, m.object_uri,
                            {l: replace(f, prompts=f.prompts[:n]) for l, f in m.facts.items()})


def _known_in(model: Any, alive: list[MultilingualFact], lang: str, min_prompts: int
              ) -> tuple[list[MultilingualFact], pd.DataFrame]:
    """The facts of ``alive`` the model knows in ``lang`` (that language's answered prompts kept) and the known
    filter's counts for ``lang``."""
    if not alive:
        return [], pd.DataFrame([{"language": lang, "known": 0, "not_known": 0, "multi_token_targets": 0}])
    sub = MultilingualFacts(tuple(m.restrict([lang]) for m in alive), (lang,), pd.DataFrame({"language": [lang]}))
    known = known_in_all(model, sub, min_prompts=min_prompts)
    kept = {m.key: m[lang] for m in known}
    return ([MultilingualFact(m.relation, m.subject_uri, m.object_uri, {**m.facts, lang: kept[m.key]})
             for m in alive if m.key in kept], known.counts.drop(columns="known_in_all"))


def select_facts(model: Any, settings: MultilingualSettings, data_dir: str | None = None,
                 say: Callable[[str], None] = lambda _: None
                 ) -> tuple[list[MultilingualFact], pd.DataFrame, pd.DataFrame]:
    """The facts known in every language (interleaved across relations), the filter counts (one row per relation
    and filter: :data:`FILTER_COLUMNS`) and the per-language counts of the loader and the known filter
    (``tested``: facts known in every language before this one)."""
    s, groups, filters, counts = settings, [], [], []
    for rel in s.relations:
        read = load_multilingual(rel, s.languages, data_dir, max_facts=s.candidates, seed=s.seed)
        alive = [shorten(m, s.max_prompts) for m in read]
        filters += [{"relation": rel, "filter": "aligned in all languages", "facts": int(read.counts["aligned"].iloc[0])},
                    {"relation": rel, "filter": "read", "facts": len(read)}]
        per_lang = []
        for lang in s.languages:
            tested = len(alive)
            alive, c = _known_in(model, alive, lang, s.min_prompts)
            per_lang.append(c.assign(tested=tested))
            filters.append({"relation": rel, "filter": f"known in {lang}", "facts": len(alive)})
        say(f"{rel}: {len(alive)} of {len(read)} facts known in all of {', '.join(s.languages)}")
        groups.append(alive)
        counts.append(read.counts.merge(pd.concat(per_lang, ignore_index=True), on="language"))
    return interleave(groups), pd.DataFrame(filters, columns=list(FILTER_COLUMNS)), pd.concat(counts, ignore_index=True)
