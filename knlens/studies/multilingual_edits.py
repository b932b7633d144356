"""The multilingual study's editing and degenerate-pair phases, within its time budget: the cross-lingual edit
matrix (KN update of the LIKN set and MEMLA, edit language × evaluation language;
:func:`~knlens.methods.multilingual.edit_matrix.cross_lingual_edits`) one edit language at a time, and the
degenerate pairs of a few facts per language (:func:`~knlens.methods.multilingual.degenerate.degenerate_pairs`).

A phase that cannot run says why in its returned note (fewer than two objects to swap, no time left), never
silently.

>>> import pandas as pd
>>> pivot_matrix(pd.DataFrame({"edit_language": ["en", "en"], "eval_language": ["en", "fr"], "editor": ["memla"] * 2,
...                            "metric": ["reliability"] * 2, "after": [1.0, 0.5], "before": [0.0, 0.0]})
... ).to_dict("records")
[{'editor': 'memla', 'metric': 'reliability', 'edit_language': 'en', 'en': 1.0, 'fr': 0.5}]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from knlens.data.multilingual import MultilingualFact
from knlens.methods.multilingual.degenerate import DegeneratePairs, degenerate_pairs
from knlens.methods.multilingual.edit_matrix import cross_lingual_edits
from knlens.methods.multilingual.edit_matrix_result import EditMatrix
from knlens.methods.multilingual.likn_result import LanguageAttributions, LanguageNeurons
from knlens.studies.editing_cases import interleave
from knlens.studies.multilingual_facts import MultilingualSettings

__all__ = ["edit_matrix_within", "degenerate_within", "pivot_matrix"]


def pivot_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """:meth:`EditMatrix.to_frame` as one row per (editor, metric, edit language), one column per evaluation
    language (the mean ``after`` the edit; rounded to 2 decimals)."""
    t = frame.pivot_table(index=["editor", "metric", "edit_language"], columns="eval_language", values="after",
                          sort=False)
    return t.round(2).reset_index().rename_axis(columns=None)


def edit_matrix_within(model: Any, facts: Sequence[MultilingualFact], neurons: LanguageNeurons,
                       s: MultilingualSettings, deadline: float, say: Callable[[str], None] = lambda _: None
                       ) -> tuple[EditMatrix | None, str]:
    """The edit matrix of ``edit_facts`` facts (taken round robin over their objects, so that the new objects,
    other facts' objects, vary), one edit language after the other (in ``languages`` order) while the mean time of
    one fits before ``deadline``; and a note on what was left out."""
    by_object: dict[str, list[MultilingualFact]] = {}
    for m in facts:
        by_object.setdefault(m.object_uri, []).append(m)
    chosen = interleave(list(by_object.values()))[:s.edit_facts]
    if len({m.object_uri for m in chosen}) < 2:
        return None, (f"no edit matrix: the {len(chosen)} fact(s) edited have fewer than two objects, and the new "
                      "object is another fact's")
    parts: list[EditMatrix] = []
    seconds: list[float] = []
    note = ""
    edit_languages = s.edit_languages or s.languages
    for lang in edit_languages:
        mean = sum(seconds) / len(seconds) if seconds else 0.0
        if time.time() + mean > deadline:
            took = f"one edit language takes {mean:.0f} s" if seconds else "before the first edit language"
            note = f"edit languages {', '.join(edit_languages[len(parts):])} left out: the budget ran out ({took})"
            break
        t = time.time()
        parts.append(cross_lingual_edits(model, chosen, neurons, edit_languages=[lang], n_neighbours=s.n_neighbours,
                                         memla_options={"steps": s.memla_steps}))
        seconds.append(time.time() - t)
        say(f"edit matrix: edited in {lang} ({seconds[-1]:.0f} s)")
    if not parts:
        return None, note or "no edit matrix: no time left"
    first = parts[0]
    done = tuple(p.settings.edit_languages[0] for p in parts)
    joined = EditMatrix(*(pd.concat([getattr(p, f) for p in parts], ignore_index=True)
                          for f in ("frame", "skips", "edits")),
                        first.facts, dataclasses.replace(first.settings, edit_languages=done))
    return joined, note


def degenerate_within(model: Any, facts: Sequence[MultilingualFact], attrs: LanguageAttributions,
                      s: MultilingualSettings, deadline: float, say: Callable[[str], None] = lambda _: None
                      ) -> tuple[DegeneratePairs | None, str]:
    """Degenerate pairs of the first ``degenerate_facts`` facts in every language, if time is left."""
    if s.degenerate_facts < 1:
        return None, "degenerate pairs not asked for (degenerate_facts = 0)"
    if time.time() > deadline:
        return None, "degenerate pairs left out: the budget ran out"
    t = time.time()
    pairs = degenerate_pairs(model, list(facts[:s.degenerate_facts]), attrs, top=s.degenerate_top)
    say(f"degenerate pairs of {min(len(facts), s.degenerate_facts)} facts ({time.time() - t:.0f} s)")
    return pairs, ""
