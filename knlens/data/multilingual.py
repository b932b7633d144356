"""One Wikidata fact in many languages: mParaRel tuples aligned across languages by subject and object URI.

mParaRel (Fierro and Søgaard, 2022) translates ParaRel's templates and labels into many languages; each
language's tuples carry the Wikidata URIs of subject and object (``sub_uri``, ``obj_uri``), which are the same
fact in every language. :func:`load_multilingual` reads one relation in the languages asked for, turns every
tuple of every language into a :class:`~knlens.core.facts.Fact` (templates filled with that language's subject
label and cut before ``[Y]``, the object label as target: a leading space except in languages written without
spaces), and keeps the facts present in **all** of them. Nothing is dropped silently: the
:attr:`MultilingualFacts.counts` table says, per language, how many tuples and templates there were, how many
templates were left out (object not last, subject after the object, object glued to the word before it) and
how many facts were skipped and why (no label, duplicate URI pair, too few prompts, missing in another
language).

A language with no data raises :class:`~knlens.core.errors.UnknownLanguageError`; a language with no usable
template of the relation, or a subject asked for by URI that a language lacks, raises
:class:`~knlens.core.errors.MissingTranslationError`.

>>> facts = load_multilingual("P36", ["en", "fr"], max_facts=2)          # doctest: +SKIP
>>> facts[0]["fr"].prompts[0], facts[0]["fr"].target                    # doctest: +SKIP
('La capitale de Azerbaïdjan est', ' Bakou')
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from knlens.core.errors import MissingTranslationError, SettingsError, UnknownLanguageError
from knlens.core.facts import Fact
from knlens.data.pararel import (NO_SPACE_LANGUAGES, _check_relation, _prompt_template, data_subdir,
                                 mpararel_languages, read_jsonl)

__all__ = ["MultilingualFact", "MultilingualFacts", "load_multilingual", "COUNT_COLUMNS"]

COUNT_COLUMNS = ("tuples", "templates", "templates_used", "templates_object_not_last", "templates_unusable",
                 "skipped_no_label", "skipped_duplicate", "skipped_too_few_prompts", "facts",
                 "missing_in_other_languages", "aligned", "kept")
"""The columns of :attr:`MultilingualFacts.counts` after ``relation`` and ``language``."""


@dataclass(frozen=True, eq=False)
class MultilingualFact:
    """One fact (``relation``, subject and object Wikidata URIs) with its :class:`Fact` in each language.

    >>> m = MultilingualFact("P36", "Q142", "Q90", {"en": Fact(["The capital of France is"], " Paris"),
    ...                                             "fr": Fact(["La capitale de la France est"], " Paris")})
    >>> m.key, m.languages, m["fr"].target
    ('P36-Q142-Q90', ('en', 'fr'), ' Paris')
    """

    relation: str
    subject_uri: str
    object_uri: str
    facts: dict[str, Fact] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.relation}-{self.subject_uri}-{self.object_uri}"

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.facts)

    def __getitem__(self, language: str) -> Fact:
        if language not in self.facts:
            raise MissingTranslationError(f"fact {self.key} has no {language!r} version; it has "
                                          f"{', '.join(self.facts) or 'none'}")
        return self.facts[language]

    def restrict(self, languages: Sequence[str]) -> MultilingualFact:
        """The same fact in ``languages`` only (each must be present)."""
        return MultilingualFact(self.relation, self.subject_uri, self.object_uri, {l: self[l] for l in languages})


@dataclass(frozen=True, eq=False)
class MultilingualFacts:
    """Facts aligned across ``languages`` and the per-language ``counts`` of what was read, used and skipped
    (columns ``relation, language`` and :data:`COUNT_COLUMNS`; filters such as
    :func:`~knlens.methods.multilingual_known.known_in_all` add their own)."""

    facts: tuple[MultilingualFact, ...]
    languages: tuple[str, ...]
    counts: pd.DataFrame

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[MultilingualFact]:
        return iter(self.facts)

    def __getitem__(self, i: int | slice) -> MultilingualFact | tuple[MultilingualFact, ...]:
        """The ``i``-th fact, or a tuple of them for a slice."""
        return self.facts[i]

    def in_language(self, language: str) -> list[Fact]:
        """Every fact's version in ``language``, in order."""
        if language not in self.languages:
            raise MissingTranslationError(f"these facts are in {', '.join(self.languages)}, not {language!r}")
        return [m[language] for m in self.facts]


def _templates(path: os.PathLike[str] | str, *, object_last: bool, spaced: bool
               ) -> tuple[list[str], dict[str, int]]:
    """The usable templates of a patterns file and the counts of those left out, by reason."""
    used, counts = [], {"templates": 0, "templates_object_not_last": 0, "templates_unusable": 0}
    for _, row in read_jsonl(path):  # type: ignore[arg-type]
        counts["templates"] += 1
        pattern = str(row.get("pattern", ""))
        t = _prompt_template(pattern, object_last=object_last, spaced=spaced, capitalize=True)
        if t is not None:
            used.append(t)
        elif object_last and _prompt_template(pattern, object_last=False, spaced=spaced, capitalize=True):
            counts["templates_object_not_last"] += 1
        else:
            counts["templates_unusable"] += 1
    used = list(dict.fromkeys(used))
    counts["templates_used"] = len(used)
    return used, counts


def _language_facts(relation: str, language: str, folder: os.PathLike[str] | str, *, object_last: bool,
                    min_paraphrases: int) -> tuple[dict[tuple[str, str], Fact], dict[str, int]]:
    """One relation's facts in one language, keyed by (subject URI, object URI), and its counts."""
    lang_dir = Path(folder) / language
    rel = _check_relation(relation, lang_dir, f"mParaRel ({language})")
    spaced = language.lower() not in NO_SPACE_LANGUAGES
    templates, counts = _templates(lang_dir / "patterns" / f"{rel}.jsonl", object_last=object_last, spaced=spaced)
    if not templates:
        raise MissingTranslationError(
            f"mParaRel ({language}) has no usable template of {rel} ({counts['templates']} templates, "
            f"{counts['templates_object_not_last']} with the object not last"
            + ("; pass object_last=False to cut them before the object" if object_last else "") + ")")
    counts |= {"tuples": 0, "skipped_no_label": 0, "skipped_duplicate": 0, "skipped_too_few_prompts": 0}
    facts: dict[tuple[str, str], Fact] = {}
    for _, row in read_jsonl(lang_dir / "tuples" / f"{rel}.jsonl"):
        counts["tuples"] += 1
        key = (str(row.get("sub_uri", "")), str(row.get("obj_uri", "")))
        subject, obj = str(row.get("sub_label", "")).strip(), str(row.get("obj_label", "")).strip()
        if not subject or not obj or not all(key):
            counts["skipped_no_label"] += 1
        elif key in facts:
            counts["skipped_duplicate"] += 1
        else:
            prompts = list(dict.fromkeys(t.replace("[X]", subject) for t in templates))
            if len(prompts) < min_paraphrases:
                counts["skipped_too_few_prompts"] += 1
                continue
            facts[key] = Fact(prompts, (" " + obj) if spaced else obj, subject=subject, relation=rel,
                              name=f"{rel}-{key[0]}-{key[1]}/{language}")
    counts["facts"] = len(facts)
    return facts, counts


def load_multilingual(relation: str, languages: Sequence[str], data_dir: str | os.PathLike[str] | None = None, *,
                      object_last: bool = True, min_paraphrases: int = 1, subjects: Sequence[str] | None = None,
                      max_facts: int | None = None, seed: int = 0) -> MultilingualFacts:
    """The facts of mParaRel's ``relation`` present in every one of ``languages``, aligned by subject and
    object URI, in the order of the first language's file.

    ``object_last`` (default) keeps only templates whose object ends them (the prompt is the whole
    sentence); ``False`` also keeps templates with text after the object, cut before it (the counts say how
    many there are either way). A fact needs ``min_paraphrases`` distinct prompts in each language.
    ``subjects`` (Wikidata URIs such as ``"Q142"``) keeps the facts of those subjects and raises
    :class:`~knlens.core.errors.MissingTranslationError` when one is missing in a language; ``max_facts``
    keeps a random subset (fixed by ``seed``) of the aligned facts, in order.
    """
    langs = list(dict.fromkeys(languages))
    if not langs:
        raise SettingsError("load_multilingual needs at least one language")
    if min_paraphrases < 1 or (max_facts is not None and max_facts < 0):
        raise SettingsError(f"min_paraphrases must be >= 1 and max_facts >= 0 or None, got {min_paraphrases}, "
                            f"{max_facts}")
    have = mpararel_languages(data_dir)
    unknown = [l for l in langs if l not in have]
    if unknown:
        raise UnknownLanguageError(f"mParaRel has no data for language(s) {', '.join(map(repr, unknown))}; "
                                   f"it has {', '.join(have)}")
    folder = data_subdir(data_dir, "mpararel", "*/patterns")
    per_lang, counts = {}, {}
    for lang in langs:
        per_lang[lang], counts[lang] = _language_facts(relation, lang, folder, object_last=object_last,
                                                       min_paraphrases=min_paraphrases)
    rel = _check_relation(relation, folder / langs[0], f"mParaRel ({langs[0]})")
    aligned = [k for k in per_lang[langs[0]] if all(k in per_lang[l] for l in langs[1:])]
    shared = aligned
    if subjects is not None:
        _check_subjects(rel, subjects, per_lang)
        wanted = set(subjects)
        shared = [k for k in shared if k[0] in wanted]
    if max_facts is not None and max_facts < len(shared):
        keep = sorted(random.Random(seed).sample(range(len(shared)), max_facts))
        shared = [shared[i] for i in keep]
    rows = [{"relation": rel, "language": l, **counts[l], "aligned": len(aligned), "kept": len(shared),
             "missing_in_other_languages": counts[l]["facts"] - len(aligned)} for l in langs]
    facts = tuple(MultilingualFact(rel, s, o, {l: per_lang[l][(s, o)] for l in langs}) for s, o in shared)
    return MultilingualFacts(facts, tuple(langs), pd.DataFrame(rows, columns=["relation", "language", *COUNT_COLUMNS]))


def _check_subjects(relation: str, subjects: Sequence[str], per_lang: dict[str, dict[tuple[str, str], Fact]]) -> None:
    for subject in subjects:
        lacking = [l for l, facts in per_lang.items() if not any(k[0] == subject for k in facts)]
        if lacking:
            raise MissingTranslationError(f"subject {subject} of {relation} has no usable fact in "
                                          f"{', '.join(lacking)} (no tuple, or no label there)")
