"""The criteria section of the editing study's page (docs/methods.md, editing criteria): Niu et al.'s bijective
symmetry and synonymous invariance and Wei et al.'s relation question, per editor, with the interval over facts
and the number of facts behind each cell, and the entity- versus relation-key rank-one edits side by side. A
criterion an editor does not define says so; one no studied fact allows says that.

>>> criterion_cell({"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n_facts": 4, "before": 0.0})
'0.5 [0.25, 0.75] (n = 4; before 0)'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from knlens.core.errors import InsufficientDataError
from knlens.studies.editing_study import EDITORS, NOT_DEFINED, EditingStudy
from knlens.viz.query_localization_page import ALPHA, markdown_table

__all__ = ["CRITERIA_TEXT", "KN_EDITORS", "NO_KEY", "criterion_cell", "criteria_table", "entity_relation_table",
           "criteria_headline", "criteria_section"]

CRITERIA_TEXT = {
    "symmetry": "bijective symmetry (Niu et al.): EasyEdit accuracy of the edited subject s on the reverse prompts of "
                "the new object t′ (\"t′ is the capital of\" → s)",
    "symmetry_pn": "the same prompts: share where P(s) > P(s′), s′ the subject whose object t′ really is",
    "symmetry_old": "the old reverse fact: EasyEdit accuracy of s on the reverse prompts of the old object t",
    "synonym": "synonymous invariance (Niu et al.): EasyEdit accuracy of the new object's synonym on the synonymous "
               "prompts (P101: \"s is a famous\" → the occupation of the new field)",
    "synonym_pn": "the same prompts: share where P(new synonym) > P(old synonym)",
    "synonym_old": "the old synonym's EasyEdit accuracy on the synonymous prompts",
    "relation": "relation question (Wei et al.) on (s, new object): NLL(relation word) < NLL(\" None\")",
    "relation_old": "the same question on (s, old object)",
    "relation_margin": "log P(relation word) − log P(\" None\") on (s, new object), per token",
}
KN_EDITORS = ("kn-update", "kn-update-generic-kept", "kn-erase", "kn-consistency-aware")
NO_KEY = ("not defined: a KN edit rewrites the value slots of its neurons, read at the last prompt token; it has no "
          "key position to put at the subject or at the relation")
_SIDE_BY_SIDE = ("reliability", "reliability_es", "generality", "generality_ps", "locality", "locality_ns", "relation",
                 "relation_margin", "perplexity_change")


def criterion_cell(row: Mapping[str, Any]) -> str:
    """``mean [ci_low, ci_high] (n = facts; before b)``."""
    return (f"{row['mean']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}] (n = {int(row['n_facts'])}; before "
            f"{row['before']:.3g})")


def criteria_table(r: EditingStudy) -> pd.DataFrame:
    """Editors × criteria: :func:`criterion_cell`, or why there is no value."""
    m = r.evaluation.metrics().set_index(["editor", "metric"])
    editors = [e for e in EDITORS if e in set(m.index.get_level_values(0))]
    rows = []
    for e in editors:
        row = {"editor": e}
        for metric in CRITERIA_TEXT:
            if (e, metric) in NOT_DEFINED:
                row[metric] = "not defined: " + NOT_DEFINED[(e, metric)]
            elif (e, metric) in m.index:
                row[metric] = criterion_cell(m.loc[(e, metric)])
            else:
                row[metric] = "no studied fact allows it (see the counts)"
        rows.append(row)
    return pd.DataFrame(rows, columns=["editor", *CRITERIA_TEXT])


def _test(r: EditingStudy, a: str, b: str, metric: str) -> dict[str, Any] | None:
    try:
        t = r.evaluation.compare(a, b, metric)
    except InsufficientDataError:
        return None
    return t if t["n_units"] else None


def _verdict(t: Mapping[str, Any]) -> str:
    return ("higher" if t["difference"] > 0 else "lower") if t["p"] < ALPHA else "no significant difference"


def entity_relation_table(r: EditingStudy) -> pd.DataFrame:
    """Per metric: the rank-one edit with the key at the subject (entity) and at the relation, the paired
    difference over facts and its permutation p."""
    m = r.evaluation.metrics().set_index(["editor", "metric"])
    rows = []
    for metric in _SIDE_BY_SIDE:
        if ("rank-one", metric) not in m.index or ("rank-one-relation", metric) not in m.index:
            continue
        t = _test(r, "rank-one", "rank-one-relation", metric)
        rows.append({"metric": metric, "rank-one (key at the subject)": criterion_cell(m.loc[("rank-one", metric)]),
                     "rank-one-relation (key at the relation)": criterion_cell(m.loc[("rank-one-relation", metric)]),
                     "paired difference": t["difference"] if t else float("nan"), "p": t["p"] if t else float("nan")})
    return pd.DataFrame(rows)


def criteria_headline(r: EditingStudy) -> list[str]:
    """One line per criterion (the editors' values) and the paired comparisons the thesis turns on."""
    m = r.evaluation.metrics().set_index(["editor", "metric"])
    lines = []
    for metric, name in (("symmetry", "Bijective symmetry"), ("synonym", "Synonymous invariance")):
        have = [e for e in EDITORS if (e, metric) in m.index]
        if not have:
            lines.append(f"- **{name}**: no studied fact allows it (see the criteria's counts).")
            continue
        lines.append(f"- **{name}** (`{metric}`, mean [interval] over facts, n facts, value before): "
                     + "; ".join(f"{e} {criterion_cell(m.loc[(e, metric)])}" for e in have) + ".")
    for a, b, metric in (("kn-update", "random-kn", "symmetry_pn"), ("rank-one", "kn-update", "symmetry_pn"),
                         ("kn-update", "random-kn", "synonym_pn"), ("rank-one", "kn-update", "synonym_pn"),
                         ("rank-one", "rank-one-relation", "reliability"), ("rank-one", "rank-one-relation", "relation")):
        t = _test(r, a, b, metric)
        if t is not None:
            lines.append(f"- **{a}** vs **{b}**, {metric}: {t['mean_a']:.3g} vs {t['mean_b']:.3g} over {t['n_units']} "
                         f"facts; paired difference {t['difference']:+.3f}, p = {t['p']:.2g} ({_verdict(t)}).")
    return lines


def criteria_section(r: EditingStudy) -> list[str]:
    """The page's section on the criteria (Markdown lines)."""
    s, c = r.settings, r.tables["criteria"]
    er = entity_relation_table(r)
    return [
        "## Niu et al.'s criteria and entity- versus relation-key editing", "",
        "Each criterion is a set of prompts read before and after every edit, like the edit prompt's (EasyEdit "
        "accuracy, teacher forced), on the facts whose relation defines it:", "",
        *[f"- `{k}`: {v}" for k, v in CRITERIA_TEXT.items()], "",
        f"Bijective symmetry is defined for the relations whose reverse reading holds (`SYMMETRIC_RELATIONS`: the "
        f"bijective capital relations P36 and P1376, the symmetric P47, P530, P190), with ParaRel's reverse templates "
        f"(at most {s.max_prompts}); its reference object is the subject of the case's counterpart (the known fact "
        "whose object is the new one). Synonymous invariance is defined for P101 (field of work → occupation, "
        "`knlens.data.synonyms.FIELD_OCCUPATION`). The relation question is knlens' wording (`RELATION_QUESTION`) "
        "for the relations with a word in `RELATION_WORDS`. Cases per relation with each criterion (`studied`: "
        "facts edited), and why the others have none:", "",
        markdown_table(c), "",
        "Editors × criteria: mean over facts [95 % bootstrap interval over facts] (n = facts behind the cell; the "
        "mean before the edit). The random controls move random neurons with the norm of their editor's edit.", "",
        markdown_table(criteria_table(r)), "",
        "**Entity versus relation** (Wei et al., CIKM 2024): the same rank-one edit with its key at the subject's last "
        "token (`rank-one`) and at the relation's last token (`rank-one-relation`), on the same facts and metrics; "
        "paired permutation test over facts:", "",
        markdown_table(er) if len(er) else "(no fact was edited by both)", "",
        *[f"- `{e}`: {NO_KEY}." for e in KN_EDITORS], "",
    ]
