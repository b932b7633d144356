"""The prompt sets of the syntax study (Niu et al., ICLR 2024): BLiMP minimal pairs as next-token prompts for a
left-to-right model, split by grammatical number (docs/methods.md, syntax and the KN thesis critique).

Two tasks, each read the way Niu et al.'s code reads BLiMP for a decoder (the prompt is the sentence up to the
first token where the grammatical and the ungrammatical sentence differ; the targets are those tokens):

* ``determiner`` — ``determiner_noun_agreement_2``: "Some dog stunned" → " this" (grammatical) / " these";
  singular when the grammatical determiner is this/that, plural for these/those;
* ``subject-verb`` — ``regular_plural_subject_verb_agreement_1``: "Paula" → " references" / " reference",
  "Most legislatures" → " haven" ('t) / " hasn"; singular when the grammatical verb is the singular form
  (has, is, was, does and their negations, else a verb ending in -s), plural otherwise.

A pair is kept when both words are one token, or several tokens that differ only in the first (" hasn't" /
" haven't" → " hasn" / " haven"); the others are counted as dropped.

Each task also names the continuations whose probability a suppression moves (:data:`WORD_CLASSES`): singular,
plural and number-neutral words that can stand where the target stands (determiners; auxiliaries and modals).

>>> verb_number("hasn't"), verb_number("resemble"), verb_number("tours")
('singular', 'plural', 'singular')
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import pandas as pd

from knlens.core.errors import SettingsError, TargetError
from knlens.core.tokens import target_tokens
from knlens.data.blimp import BlimpPair, load_blimp

__all__ = ["TASKS", "NUMBERS", "WORD_CLASSES", "SyntaxItem", "verb_number", "determiner_number", "task_items",
           "class_tokens"]

TASKS = {"determiner": "determiner_noun_agreement_2", "subject-verb": "regular_plural_subject_verb_agreement_1"}
NUMBERS = ("singular", "plural")
WORD_CLASSES: dict[str, dict[str, tuple[str, ...]]] = {
    "determiner": {"singular": ("this", "that", "a", "an", "each", "every", "another"),
                   "plural": ("these", "those", "many", "several", "both", "few"),
                   "neutral": ("the", "some", "any", "no", "my", "his", "her", "their", "our", "your")},
    "subject-verb": {"singular": ("is", "was", "has", "does", "isn", "wasn", "hasn", "doesn"),
                     "plural": ("are", "were", "have", "do", "aren", "weren", "haven", "don"),
                     "neutral": ("will", "would", "can", "could", "should", "might", "must", "did", "had")},
}
_SINGULAR_VERBS = {"has", "is", "was", "does", "hasn't", "isn't", "wasn't", "doesn't"}
_PLURAL_VERBS = {"have", "are", "were", "do", "haven't", "aren't", "weren't", "don't"}


@dataclass(frozen=True)
class SyntaxItem:
    """One prompt of a task: the grammatical (``good``) and ungrammatical (``bad``) next token, both with a
    leading space, the ``number`` the grammatical token marks, and the BLiMP pair it came from."""

    task: str
    number: str
    prompt: str
    good: str
    bad: str
    pair_id: str

    @property
    def name(self) -> str:
        return f"{self.task}-{self.pair_id}"


def verb_number(word: str) -> str:
    """``"singular"`` or ``"plural"``: the number a present-tense verb or auxiliary agrees with."""
    w = word.strip().lower()
    if w in _SINGULAR_VERBS:
        return "singular"
    if w in _PLURAL_VERBS:
        return "plural"
    return "singular" if w.endswith("s") else "plural"


def determiner_number(word: str) -> str:
    """``"singular"`` for this/that, ``"plural"`` for these/those (else :class:`SettingsError`)."""
    w = word.strip().lower()
    if w in ("this", "that"):
        return "singular"
    if w in ("these", "those"):
        return "plural"
    raise SettingsError(f"{word!r} is not a demonstrative determiner (this, that, these, those)")


def _split(pair: BlimpPair, task: str) -> tuple[str, str, str] | None:
    """(prompt, grammatical word, ungrammatical word) of a pair, as whole words with a leading space."""
    if task == "determiner" and pair.prefix_good and pair.prefix_bad:
        head, good = pair.prefix_good.rsplit(" ", 1)
        head_bad, bad = pair.prefix_bad.rsplit(" ", 1)
        return (head, f" {good}", f" {bad}") if head == head_bad else None
    if task == "subject-verb" and pair.prefix and pair.word_good and pair.word_bad:
        return pair.prefix, pair.word_good, pair.word_bad
    return None


def _first_difference(model: Any, good: str, bad: str) -> tuple[str, str] | None:
    """The two words as single tokens: themselves, or the first tokens when only those differ."""
    try:
        g, b = target_tokens(model, good), target_tokens(model, bad)
    except TargetError:
        return None
    if not (len(g) == len(b) and g[0] != b[0] and g[1:] == b[1:]):
        return None
    words = model.tokenizer.decode([g[0]]), model.tokenizer.decode([b[0]])
    same = all(target_tokens(model, w) == [t] for w, t in zip(words, (g[0], b[0])) if w.strip())
    return words if same and all(w.strip() for w in words) else None


def task_items(model: Any, task: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0
               ) -> tuple[dict[str, list[SyntaxItem]], dict[str, int]]:
    """The task's items by number (shuffled with ``seed``), and counts: pairs read, kept, dropped because a
    word is not one token (or several differing only in the first)."""
    if task not in TASKS:
        raise SettingsError(f"unknown syntax task {task!r}; choose from {sorted(TASKS)}")
    pairs = load_blimp(TASKS[task], data_dir)
    by_number: dict[str, list[SyntaxItem]] = {n: [] for n in NUMBERS}
    dropped = 0
    for pair in pairs:
        split = _split(pair, task)
        words = _first_difference(model, split[1], split[2]) if split else None
        if split is None or words is None:
            dropped += 1
            continue
        number = determiner_number(split[1]) if task == "determiner" else verb_number(split[1])
        by_number[number].append(SyntaxItem(task, number, split[0], words[0], words[1], pair.pair_id))
    for n, items in by_number.items():
        random.Random(f"{seed}-{task}-{n}").shuffle(items)
    counts = {"read": len(pairs), "kept": sum(map(len, by_number.values())), "dropped (tokens)": dropped,
              **{n: len(v) for n, v in by_number.items()}}
    return by_number, counts


def class_tokens(model: Any, task: str) -> tuple[dict[str, list[int]], pd.DataFrame]:
    """Each word class of the task as single-token ids (" word"), and which words were left out (not one token)."""
    out, rows = {}, []
    for cls, words in WORD_CLASSES[task].items():
        ids = []
        for w in words:
            try:
                tok = target_tokens(model, f" {w}")
            except TargetError:
                tok = []
            if len(tok) == 1:
                ids.append(tok[0])
            rows.append({"task": task, "class": cls, "word": w, "single token": len(tok) == 1})
        out[cls] = list(dict.fromkeys(ids))
    return out, pd.DataFrame(rows)

