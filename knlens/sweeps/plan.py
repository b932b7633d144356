"""What a sweep runs: the studies it knows, data specs read into facts, settings checked against a study.

>>> sorted(STUDIES)
['locate', 'trace']
>>> [f.name for f in read_facts("builtin:capital", max_facts=2)]
['capital-france', 'capital-germany']
>>> get_study("locate").check({"steps": 4})
{'steps': 4}
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from knlens.core.errors import SweepError
from knlens.core.facts import Fact
from knlens.data.builtin import builtin_facts
from knlens.data.pararel import load_mpararel, load_pararel
from knlens.methods.tracing.trace import trace
from knlens.studies.knowledge_neurons import locate

__all__ = ["Study", "STUDIES", "get_study", "read_facts", "parse_setting", "dedupe"]


@dataclass(frozen=True)
class Study:
    """A study a sweep can run: ``run(model, fact, **settings)`` returns one result (a
    :class:`~knlens.results.contract.Result`); ``fixed`` are keyword arguments the sweep always passes (no
    progress bars), not part of the task's settings."""

    name: str
    run: Callable[..., Any]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""

    def settings_names(self) -> list[str]:
        """The keyword arguments a sweep may set."""
        params = list(inspect.signature(self.run).parameters.values())[2:]
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name not in self.fixed]

    def check(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """``settings`` if the study takes them all, else :class:`~knlens.core.errors.SweepError`."""
        names = self.settings_names()
        unknown = [k for k in settings if k not in names]
        if unknown:
            raise SweepError(f"study {self.name!r} takes no setting {', '.join(map(repr, unknown))}; its settings: "
                             f"{', '.join(names)}")
        return dict(settings)

    def __call__(self, model: Any, fact: Fact, settings: Mapping[str, Any]) -> Any:
        return self.run(model, fact, **{**settings, **self.fixed})


STUDIES: dict[str, Study] = {
    "locate": Study("locate", locate, {"progress": False},
                    "knowledge neurons by the Dai et al. pipeline with controls (knlens.locate)"),
    "trace": Study("trace", trace, {}, "causal tracing of the fact's first prompt (knlens.trace)"),
}
"""The studies ``knlens sweep`` runs, by name."""


def get_study(study: str | Study) -> Study:
    """The study called ``study`` (a :class:`Study` passes through)."""
    if isinstance(study, Study):
        return study
    if study not in STUDIES:
        raise SweepError(f"unknown study {study!r}; a sweep runs: {', '.join(sorted(STUDIES))}")
    return STUDIES[study]


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON (a number, true, a list, ...) or else kept as text.

    >>> parse_setting("steps=4"), parse_setting("kinds=[\\"mlp\\"]"), parse_setting("grid=right")
    (('steps', 4), ('kinds', ['mlp']), ('grid', 'right'))
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise SweepError(f"a setting is KEY=VALUE (e.g. steps=4), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _split(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


def read_facts(spec: str, *, max_facts: int | None = None, data_dir: str | os.PathLike[str] | None = None,
               seed: int = 0) -> list[Fact]:
    """The facts a data spec names: ``pararel:P36,P1376`` (ParaRel relations), ``mpararel:LANG:P36,...``,
    ``builtin`` (every built-in fact) or ``builtin:capital,currency`` (built-in relations, by name or
    Wikidata id). ``max_facts`` keeps at most that many facts of each relation (a random subset fixed by
    ``seed`` for ParaRel, the first ones for built-in facts). An unknown source is a
    :class:`~knlens.core.errors.SweepError`; an unknown relation an ``UnknownRelationError``."""
    if max_facts is not None and max_facts < 1:
        raise SweepError(f"max_facts must be at least 1, got {max_facts}")
    source, _, rest = spec.strip().partition(":")
    if source == "builtin":
        groups = [builtin_facts(r) for r in _split(rest)] if rest else [builtin_facts()]
        if max_facts is not None and not rest:
            by_rel: dict[str | None, list[Fact]] = {}
            for f in groups[0]:
                by_rel.setdefault(f.relation, []).append(f)
            groups = list(by_rel.values())
        return [f for g in groups for f in (g[:max_facts] if max_facts else g)]
    if source == "pararel" and rest:
        return [f for r in _split(rest) for f in load_pararel(r, data_dir, max_facts=max_facts, seed=seed)]
    if source == "mpararel" and rest.count(":") == 1:
        lang, rels = rest.split(":")
        return [f for r in _split(rels) for f in load_mpararel(r, lang, data_dir, max_facts=max_facts, seed=seed)]
    raise SweepError(f"unknown data spec {spec!r}: use pararel:P36,P1376, mpararel:LANG:P36, builtin or "
                     f"builtin:RELATION,...")


def dedupe(facts: Sequence[Fact]) -> list[Fact]:
    """``facts`` without repeats (the same fact named twice in a spec runs once)."""
    return list(dict.fromkeys(facts))
