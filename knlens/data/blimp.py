"""Loader for BLiMP minimal pairs (Warstadt et al., 2020), e.g. determiner-noun agreement.

Read from ``<data>/blimp/<phenomenon>.jsonl`` (see :func:`~knlens.data.default_data_dir`). BLiMP
phenomena come in two shapes:

- *one-prefix* pairs share a prefix and differ in the next word: ``prefix`` = "Raymond is selling this",
  ``word_good`` = " sketch", ``word_bad`` = " sketches";
- *two-prefix* pairs (e.g. ``determiner_noun_agreement_2``) differ in the prefix and share the next word:
  ``prefix_good`` = "Some dog stunned this", ``prefix_bad`` = "Some dog stunned these", ``word`` = " committee".

Words get a leading space, as they follow the prefix; they may be several words or tokens long.

>>> pairs = load_blimp("determiner_noun_agreement_1", max_items=1)   # doctest: +SKIP
>>> pairs[0].prefix, pairs[0].word_good, pairs[0].word_bad           # doctest: +SKIP
('Raymond is selling this', ' sketch', ' sketches')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from knlens.core.errors import DataFormatError, SettingsError
from knlens.core.facts import Fact
from knlens.data.builtin import UnknownRelationError
from knlens.data.pararel import read_jsonl, data_subdir

__all__ = ["BlimpPair", "blimp_phenomena", "load_blimp"]


@dataclass(frozen=True)
class BlimpPair:
    """One BLiMP minimal pair: a grammatical and an ungrammatical sentence, with the prefix split."""

    sentence_good: str
    sentence_bad: str
    prefix: str | None = None  # one-prefix pairs: the shared prefix
    word_good: str | None = None  # one-prefix pairs: the grammatical next word(s), with a leading space
    word_bad: str | None = None  # one-prefix pairs: the ungrammatical next word(s), with a leading space
    prefix_good: str | None = None  # two-prefix pairs: the grammatical prefix
    prefix_bad: str | None = None  # two-prefix pairs: the ungrammatical prefix
    word: str | None = None  # two-prefix pairs: the shared next word(s), with a leading space
    uid: str = ""  # the phenomenon (BLiMP's "UID")
    pair_id: str = ""  # BLiMP's "pairID"
    field: str = ""  # e.g. "morphology"
    linguistics_term: str = ""  # e.g. "determiner_noun_agreement"
    lexically_identical: bool = False

    @property
    def method(self) -> str:
        """``"one_prefix"`` or ``"two_prefix"``: which split of the sentence this pair has."""
        return "one_prefix" if self.prefix is not None else "two_prefix"

    def as_fact(self) -> Fact:
        """A one-prefix pair as a :class:`Fact`: the prefix as the prompt, ``word_good`` as the target."""
        if self.prefix is None or self.word_good is None:
            raise DataFormatError(f"BLiMP pair {self.uid}-{self.pair_id} is a two-prefix pair (no shared prefix); "
                             f"use prefix_good/prefix_bad with word instead")
        return Fact((self.prefix,), self.word_good, relation=self.uid, name=f"{self.uid}-{self.pair_id}")


def _spaced(word: Any) -> str | None:
    if word is None:
        return None
    word = str(word).strip()
    return " " + word if word else None


def _stripped(text: Any) -> str | None:
    return None if text is None else str(text).strip()


def blimp_phenomena(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The BLiMP phenomena (file names without ``.jsonl``) in the data folder, sorted."""
    folder = data_subdir(data_dir, "blimp", "*.jsonl")
    return sorted(p.stem for p in folder.glob("*.jsonl"))


def load_blimp(phenomenon: str, data_dir: str | os.PathLike[str] | None = None,
               max_items: int | None = None) -> list[BlimpPair]:
    """The minimal pairs of one BLiMP ``phenomenon`` (e.g. ``"determiner_noun_agreement_1"``), in file
    order, at most ``max_items`` of them. Raises :class:`~knlens.data.UnknownRelationError` for an
    unknown phenomenon."""
    folder = data_subdir(data_dir, "blimp", "*.jsonl")
    path = folder / f"{phenomenon}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise UnknownRelationError(f"no BLiMP phenomenon {phenomenon!r} in {folder}; available: {', '.join(known)}")
    if max_items is not None and max_items < 0:
        raise SettingsError(f"max_items must be >= 0 or None, got {max_items}")
    pairs: list[BlimpPair] = []
    for _, row in read_jsonl(path):
        if max_items is not None and len(pairs) >= max_items:
            break
        pairs.append(BlimpPair(
            sentence_good=str(row["sentence_good"]), sentence_bad=str(row["sentence_bad"]),
            prefix=_stripped(row.get("one_prefix_prefix")), word_good=_spaced(row.get("one_prefix_word_good")),
            word_bad=_spaced(row.get("one_prefix_word_bad")),
            prefix_good=_stripped(row.get("two_prefix_prefix_good")),
            prefix_bad=_stripped(row.get("two_prefix_prefix_bad")), word=_spaced(row.get("two_prefix_word")),
            uid=str(row.get("UID", phenomenon)), pair_id=str(row.get("pairID", len(pairs))),
            field=str(row.get("field", "")), linguistics_term=str(row.get("linguistics_term", "")),
            lexically_identical=bool(row.get("lexically_identical", False)),
        ))
    return pairs
