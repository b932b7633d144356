"""The facts of the editing study: ParaRel facts the model knows, each with a counterfactual new object and
neighbouring facts, stratified by relation (docs/methods.md, the editing study).

Per relation, :func:`select_cases` counts what survives each filter, in this order:

1. **read** — ParaRel facts (object-last templates, ≥ ``min_prompts`` paraphrases), a random subset of
   ``candidates`` (``seed``);
2. **known** — answered (greedy, every target token) on at least ``min_prompts`` paraphrases
   (:func:`~knlens.methods.known.known_facts`); only the answered paraphrases are kept, at most ``max_prompts``:
   the first is the edit prompt, the others its paraphrases (generality);
3. **single token** — the object is one token (Dai's update adds one token's vector);
4. **new object** — a counterfactual: the object of another known single-token fact of the relation (the next in
   the shuffled order with a different object and another subject: its *counterpart*, whose subject the reverse
   prompts of bijective symmetry expect before the edit), as CounterFact draws them;
5. **neighbours** — at least one other known fact of the relation whose object is not the new one (their
   prompts test locality).

The cases are then interleaved across relations (round robin), so a study cut short by its time budget still
covers every relation.

>>> from knlens import Fact
>>> facts = [Fact([f"the capital of {c} is"], f" {t}", subject=c, relation="P36", name=f"P36-{i}")
...          for i, (c, t) in enumerate([("france", "paris"), ("spain", "madrid"), ("italy", "rome")])]
>>> [(c.request.fact.name, c.request.new_target) for c in counterfactual_cases(facts, neighbours=1)]
[('P36-0', ' madrid'), ('P36-1', ' rome'), ('P36-2', ' paris')]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from knlens.core.errors import InsufficientDataError, SettingsError, TargetError
from knlens.core.facts import Fact
from knlens.core.tokens import target_tokens
from knlens.data.pararel import load_pararel
from knlens.data.synonyms import SYNONYM_READINGS
from knlens.methods.editing.editors import EditRequest
from knlens.methods.known import known_facts

__all__ = ["EditingSettings", "EditCase", "counterfactual_cases", "interleave", "select_cases", "load_candidates",
           "is_single_token", "COUNT_COLUMNS"]

COUNT_COLUMNS = ("read", "known", "single-token object", "with a new object", "with neighbours")


@dataclass(frozen=True)
class EditingSettings:
    """The study's sizes: facts, neurons, editors, evaluation and the time budget (defaults: the run of
    ``benchmarks/EDITING.md``)."""

    model: str = "smollm2-135m"
    # symmetric or bijective relations (symmetry), P101 (synonymous invariance), then others
    relations: tuple[str, ...] = ("P36", "P1376", "P101", "P47", "P530", "P30", "P407", "P279")
    candidates: int = 60  # ParaRel facts read per relation before the filters
    synonym_candidates: int = 200  # read for a relation with a synonymous reading (the model knows 1 in ~20 of P101)
    min_prompts: int = 2  # a fact is known when answered on at least this many paraphrases
    max_prompts: int = 4  # answered paraphrases kept per fact (the edit prompt and its paraphrases)
    neighbours: int = 3  # other known facts of the relation whose prompts test locality
    neighbour_prompts: int = 2  # prompts per neighbouring fact
    steps: int = 8  # Gauss–Legendre nodes of integrated gradients (the KN editors' neurons)
    fallback_k: int = 3  # neurons (top mean attribution) when Dai's refinement keeps none
    generic_share: float = 0.1  # generic: in the KN sets of more than this share of a relation's located facts
    locate_share: float = 0.25  # share of the budget left after the filters spent locating facts (phase 1)
    max_located: int | None = None  # at most this many facts located in phase 1 (None: as many as locate_share allows)
    rank_one_layer: int | None = None  # None: knlens' default (a quarter of the way up)
    rank_one_steps: int = 20
    control_neurons: int = 10  # random neurons of the control of the rank-one edit
    n_text: int = 20  # sentences of the perplexity sample
    covariance_texts: int = 1000  # sentences of the rank-one key statistics
    budget_minutes: float = 30.0  # stop starting new facts when the next one would overrun this
    max_facts: int | None = None  # at most this many facts (None: as many as the budget allows)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.synonym_candidates < 1:
            raise SettingsError(f"candidates and synonym_candidates must be at least 1, got {self.candidates} and "
                                f"{self.synonym_candidates}")
        if self.min_prompts < 2 or self.max_prompts < self.min_prompts:
            raise SettingsError(f"need 2 ≤ min_prompts ≤ max_prompts (an edit prompt and a paraphrase), got "
                                f"{self.min_prompts} and {self.max_prompts}")
        if self.neighbours < 1 or self.neighbour_prompts < 1 or self.steps < 1 or self.fallback_k < 1:
            raise SettingsError("neighbours, neighbour_prompts, steps and fallback_k must be at least 1")
        if not 0 < self.locate_share < 1 or not 0 <= self.generic_share < 1:
            raise SettingsError(f"locate_share must be in (0, 1) and generic_share in [0, 1), got {self.locate_share} "
                                f"and {self.generic_share}")
        if not self.budget_minutes > 0:
            raise SettingsError(f"budget_minutes must be positive, got {self.budget_minutes}")
        for name in ("max_facts", "max_located"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1 or None, got {getattr(self, name)}")


@dataclass(frozen=True)
class EditCase:
    """One fact to edit: the request (edit prompt, paraphrases, new object, neighbours, the criteria's probes), its
    relation and its counterpart (the known fact whose object is the new one)."""

    request: EditRequest
    relation: str
    counterpart: Fact | None = None


def is_single_token(model: Any, target: str) -> bool:
    """Whether ``target`` is one token of the model's vocabulary (after a prompt: no BOS)."""
    try:
        return len(target_tokens(model, target)) == 1
    except TargetError:
        return False


def _counterpart_of(fact: Fact, other: Fact) -> bool:
    """Whether ``other`` can give ``fact`` its new object: another object, and another subject (when both name one)."""
    same_subject = fact.subject is not None and other.subject is not None and \
        fact.subject.strip() == other.subject.strip()
    return other.target.strip() != fact.target.strip() and not same_subject


def counterfactual_cases(facts: Sequence[Fact], *, neighbours: int = 3, neighbour_prompts: int = 2) -> list[EditCase]:
    """One case per fact that has a counterfactual object (the object of its counterpart: the next fact in ``facts``,
    cyclically, with another object and another subject) and a neighbour: the next ``neighbours`` other facts
    whose object is not the new one (there the new object must not win), their first ``neighbour_prompts``
    prompts."""
    cases = []
    n = len(facts)
    for i, fact in enumerate(facts):
        others = [facts[(i + j) % n] for j in range(1, n)]
        counterpart = next((g for g in others if _counterpart_of(fact, g)), None)
        new = counterpart.target if counterpart is not None else None
        near = [replace(g, prompts=g.prompts[:neighbour_prompts]) for g in others
                if new is not None and g.target.strip() != new.strip()][:neighbours]
        if counterpart is not None and near:
            cases.append(EditCase(EditRequest(fact, counterpart.target, tuple(near)), fact.relation or "", counterpart))
    return cases


def interleave(groups: Sequence[Sequence[EditCase]]) -> list[EditCase]:
    """Round robin over the groups: the first case of each, then the second of each, ...

    >>> interleave([["a1", "a2", "a3"], ["b1"]])
    ['a1', 'b1', 'a2', 'a3']
    """
    return [c for row in itertools.zip_longest(*groups) for c in row if c is not None]


def load_candidates(settings: EditingSettings, data_dir: str | None = None) -> dict[str, list[Fact]]:
    """Per relation, the ParaRel facts read (``candidates`` of them, ``synonym_candidates`` for a relation with a
    synonymous reading, drawn with ``seed``)."""
    return {rel: load_pararel(rel, data_dir=data_dir, object_last=True, min_paraphrases=settings.min_prompts,
                              max_facts=settings.synonym_candidates if rel in SYNONYM_READINGS else settings.candidates,
                              seed=settings.seed) for rel in settings.relations}


def select_cases(model: Any, candidates: Mapping[str, Sequence[Fact]], settings: EditingSettings,
                 say: Callable[[str], None] = lambda _: None) -> tuple[list[EditCase], pd.DataFrame]:
    """The cases of every relation, interleaved, and per relation how many facts survived each filter
    (columns :data:`COUNT_COLUMNS`; see the module docstring)."""
    s, rows, groups = settings, [], []
    for rel, read in candidates.items():
        known = known_facts(model, read, keep_prompts="correct", min_prompts=s.min_prompts)
        known = [replace(f, prompts=f.prompts[:s.max_prompts]) for f in known]
        single = [f for f in known if is_single_token(model, f.target)]
        cases = counterfactual_cases(single, neighbours=s.neighbours, neighbour_prompts=s.neighbour_prompts)
        with_new = sum(1 for i, f in enumerate(single) if any(_counterpart_of(f, g) for g in single[:i] + single[i + 1:]))
        counts = dict(zip(COUNT_COLUMNS, (len(read), len(known), len(single), with_new, len(cases))))
        rows.append({"relation": rel, "templates": max((len(f.prompts) for f in read), default=0), **counts})
        groups.append(cases)
        say(f"{rel}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if not any(groups):
        raise InsufficientDataError("no fact survived the filters (known, single-token object, a new object, a "
                                    "neighbour): add relations or candidates")
    return interleave(groups), pd.DataFrame(rows)
