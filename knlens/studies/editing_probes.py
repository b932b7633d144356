"""The editing study's criteria beyond the field's (docs/methods.md, editing criteria): each case's request gets
the probes of Niu et al.'s **bijective symmetry** and **synonymous invariance** and of Wei et al.'s **relation
question** wherever its relation defines them, so that every editor is read on them like on the request's own
prompts (:mod:`knlens.methods.editing.criteria`):

* ``symmetry`` — relations of :data:`~knlens.data.pararel.SYMMETRIC_RELATIONS` with reverse templates in ParaRel
  (at most ``max_templates``); the case's counterpart (the fact whose object is the new one) gives the subject
  the reverse prompts of the new object name before the edit;
* ``synonym`` — relations of :data:`~knlens.data.synonyms.SYNONYM_READINGS` whose old and new objects are in the
  reading's table;
* ``relation`` — relations with a word in :data:`~knlens.methods.editing.criteria.RELATION_WORDS`.

Where a criterion is not defined for a case (or one of its objects is not in the model's vocabulary), the case
keeps no probe of it, and :func:`with_criteria` says why.

>>> from knlens import Fact, load_model
>>> from knlens.studies.editing_cases import counterfactual_cases
>>> facts = [Fact([f"the capital of {c} is"], f" {t}", subject=c, relation="P36", name=c)
...          for c, t in (("france", "paris"), ("italy", "rome"), ("spain", "madrid"))]
>>> cases, table = with_criteria(load_model("tiny-llama"), counterfactual_cases(facts, neighbours=1),
...                              templates={"P36": ["[Y] is the capital of"]})
>>> sorted({p.group for p in cases[0].request.probes})
['symmetry', 'symmetry_old']
>>> table[["relation", "cases", "symmetry", "synonym", "relation question"]].values.tolist()
[['P36', 3, 3, 0, 0]]
>>> print(*table["why not"][0].split("; "), sep=chr(10))  # the tiny model's vocabulary has no " None"
synonym: relation 'P36' has no synonymous reading in SYNONYM_READINGS (P101): give templates (and a table)
relation question: the target ' None' is not in the model's vocabulary (it tokenizes to ['[UNK]'] with the unknown token '[UNK]')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from knlens.core.errors import FactError, NoSymmetryError, PromptError, TargetError
from knlens.core.tokens import target_tokens
from knlens.data.pararel import reverse_templates
from knlens.methods.editing.editors import Probe
from knlens.methods.editing.criteria import relation_probes, symmetry_request, synonym_request
from knlens.studies.editing_cases import EditCase

__all__ = ["CRITERIA", "with_criteria"]

CRITERIA = {"symmetry": "symmetry", "synonym": "synonym", "relation question": "relation"}
"""The criteria's names on the page → the probe group that holds them."""

_UNDEFINED = (FactError, NoSymmetryError, PromptError, TargetError)  # a criterion the case's relation does not define


def _symmetry(case: EditCase, templates: list[str] | Exception) -> list[Probe]:
    if isinstance(templates, Exception):
        raise templates
    if case.counterpart is None:
        raise FactError("the case has no counterpart (the fact whose object is the new one)")
    return list(symmetry_request(case.request.fact, case.counterpart, templates=templates).probes)


def _in_vocabulary(model: Any, probes: list[Probe]) -> list[Probe]:
    for p in probes:
        for t in (p.target_true, p.target_new):
            if t is not None:
                target_tokens(model, t)  # TargetError when the model cannot spell it
    return probes


def _probes(model: Any, case: EditCase, templates: list[str] | Exception) -> tuple[list[Probe], dict[str, str]]:
    fact, new = case.request.fact, case.request.new_target
    builders: dict[str, Callable[[], list[Probe]]] = {
        "symmetry": lambda: _symmetry(case, templates),
        "synonym": lambda: list(synonym_request(fact, new).probes),
        "relation question": lambda: relation_probes(fact, new)}
    probes, why = [], {}
    for name, build in builders.items():
        try:
            probes += _in_vocabulary(model, build())
        except _UNDEFINED as err:
            why[name] = str(err)
    return probes, why


def with_criteria(model: Any, cases: Sequence[EditCase], *, data_dir: Any = None, max_templates: int = 4,
                  templates: Mapping[str, list[str]] | None = None) -> tuple[list[EditCase], pd.DataFrame]:
    """``cases`` with the probes of every criterion their relation defines (see the module), and per relation the
    number of cases with each criterion and why the others have none (the first reason per criterion).
    ``templates``: the reverse templates per relation (default: ParaRel's, read from ``data_dir``)."""
    reverse: dict[str, list[str] | Exception] = {}
    out, rows = [], {}
    for case in cases:
        rel = case.relation
        if rel not in reverse:
            try:
                reverse[rel] = list(templates[rel] if templates and rel in templates
                                    else reverse_templates(rel, data_dir))[:max_templates]
            except NoSymmetryError as err:
                reverse[rel] = err
        probes, why = _probes(model, case, reverse[rel])
        out.append(replace(case, request=replace(case.request, probes=tuple(case.request.probes) + tuple(probes))))
        row = rows.setdefault(rel, {"relation": rel, "cases": 0, **dict.fromkeys(CRITERIA, 0), "why": {}})
        row["cases"] += 1
        for name in CRITERIA:
            if name in why:
                row["why"].setdefault(name, why[name])
            else:
                row[name] += 1
    table = pd.DataFrame([{**{k: v for k, v in r.items() if k != "why"},
                           "why not": "; ".join(f"{k}: {v}" for k, v in r["why"].items())} for r in rows.values()],
                         columns=["relation", "cases", *CRITERIA, "why not"])
    return out, table
