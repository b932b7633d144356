"""A sample of plain English sentences built from the data folder: BLiMP's grammatical sentences and ParaRel
facts written out as sentences. It stands in for running text where a method needs some (the key statistics
of a rank-one edit, the perplexity of an edited model).

Sentences are split into ``parts`` disjoint parts by a stable hash of their text, so two uses (e.g. statistics
and evaluation) can take different sentences; within a part, ``n`` sentences are drawn with ``seed``.

>>> sample = text_sample(5, part=0)                     # doctest: +SKIP
>>> len(sample), set(sample) & set(text_sample(5, part=1))   # doctest: +SKIP
(5, set())
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from functools import lru_cache

from knlens.core.errors import SettingsError
from knlens.data.blimp import blimp_phenomena, load_blimp
from knlens.data.pararel import load_pararel, pararel_relations

__all__ = ["text_sample", "TEXT_SOURCES"]

TEXT_SOURCES = ("blimp", "pararel")


@lru_cache(maxsize=4)
def _sentences(data_dir: str | None, sources: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    if "blimp" in sources:
        out += [p.sentence_good for ph in blimp_phenomena(data_dir) for p in load_blimp(ph, data_dir)]
    if "pararel" in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # relations with too few templates: skipped, as they should be
            for rel in pararel_relations(data_dir):
                facts = load_pararel(rel, data_dir, min_paraphrases=1)
                out += [f"{f.prompts[i % len(f.prompts)]}{f.target}." for i, f in enumerate(facts)]
    return tuple(dict.fromkeys(s.strip() for s in out if s.strip()))


def _part(sentence: str, parts: int) -> int:
    return int(hashlib.sha256(sentence.encode()).hexdigest()[:8], 16) % parts


def text_sample(n: int | None = None, *, part: int = 0, parts: int = 2, seed: int = 0,
                sources: tuple[str, ...] = TEXT_SOURCES, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """``n`` sentences (all when ``None``) of part ``part`` of ``parts``, drawn with ``seed``.

    ``sources``: ``"blimp"`` (the grammatical sentence of every BLiMP pair) and/or ``"pararel"`` (each
    ParaRel fact as one sentence: one of its relation's templates, filled, with the object and a full stop).
    Raises :class:`~knlens.core.errors.DataNotFoundError` when the data folder is missing.
    """
    unknown = sorted(set(sources) - set(TEXT_SOURCES))
    if unknown or not sources:
        raise SettingsError(f"unknown text source(s) {unknown or sources}; choose from {list(TEXT_SOURCES)}")
    if not 0 <= part < parts:
        raise SettingsError(f"part {part} outside the {parts} parts")
    if n is not None and n < 1:
        raise SettingsError(f"n must be at least 1 or None, got {n}")
    pool = [s for s in _sentences(None if data_dir is None else str(data_dir), tuple(sorted(sources)))
            if _part(s, parts) == part]
    random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]
