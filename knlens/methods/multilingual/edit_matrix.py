"""The cross-lingual edit matrix: edit a fact in language A, judge the edit in every language B (docs/methods.md,
cross-lingual editing).

Per fact and edit language A, each editor builds one edit on the unedited model from A's version of the fact:

* ``kn-update`` — Dai et al.'s update (:func:`~knlens.methods.editing.kn.kn_update`) on the fact's
  language-independent neurons (LIKN), which needs single-token objects in A;
* ``memla`` — MEMLA's masked update (:func:`~knlens.methods.editing.memla.memla_edit`) of two groups: the LIKN
  set and A's language-specific neurons (multi-token objects teacher forced).

The new object is CounterFact's recipe: the object of another fact of the list (the next one with another
object URI), in each language its own label. The edit is then judged in every language B by
:func:`~knlens.methods.editing.evaluate.evaluate_edits` on B's version of the fact: reliability on B's first
prompt, generality on B's other prompts, locality on up to ``n_neighbours`` other facts in B (their object is
neither the old nor the new one), with B's label of the new object. Every cell not measured is a row of
:attr:`EditMatrix.skips` with its reason, never a silent drop.

>>> from knlens import load_model, Fact
>>> from knlens.data.multilingual import MultilingualFact
>>> from knlens.methods.multilingual.likn import language_neurons
>>> model = load_model("tiny-llama")
>>> def fact(s, o, t):
...     return MultilingualFact("P36", s, o, {"en": Fact([f"the capital of {t} is"], " paris"),
...                                           "xx": Fact([f"{t} has the capital"], " paris")})
>>> facts = [fact("Q1", "Q90", "france"), MultilingualFact("P36", "Q2", "Q64", {
...     "en": Fact(["the capital of germany is"], " berlin"), "xx": Fact(["germany has the capital"], " berlin")})]
>>> found = language_neurons(model, facts, steps=4)
>>> mx = cross_lingual_edits(model, facts, found, check_known=False, memla_options={"steps": 3})
>>> mx.table("reliability", "memla").shape                       # edit language × evaluation language
(2, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from knlens.core.errors import NoOpEditError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import target_tokens
from knlens.core.versions import __version__
from knlens.data.multilingual import MultilingualFact
from knlens.methods.editing.edit import Edit, fingerprint, model_name
from knlens.methods.editing.editors import EditRequest
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.kn import kn_update
from knlens.methods.editing.memla import memla_edit
from knlens.methods.known import answers_many
from knlens.methods.multilingual.edit_matrix_result import MATRIX_METRICS, EditMatrix, EditMatrixSettings
from knlens.methods.multilingual.likn_result import LanguageNeurons

__all__ = ["cross_lingual_edits", "counterparts", "MATRIX_EDITORS"]

MATRIX_EDITORS = ("kn-update", "memla")


def counterparts(facts: Sequence[MultilingualFact]) -> dict[str, MultilingualFact]:
    """For each fact, the fact whose object becomes its new object: the next one in the list (cyclically) with
    another object URI.

    >>> a, b, c = (MultilingualFact("P36", s, o) for s, o in (("Q1", "Q9"), ("Q2", "Q9"), ("Q3", "Q8")))
    >>> {k: v.key for k, v in counterparts([a, b, c]).items()}
    {'P36-Q1-Q9': 'P36-Q3-Q8', 'P36-Q2-Q9': 'P36-Q3-Q8', 'P36-Q3-Q8': 'P36-Q1-Q9'}
    """
    out = {}
    for i, m in enumerate(facts):
        other = next((facts[(i + j) % len(facts)] for j in range(1, len(facts))
                      if facts[(i + j) % len(facts)].object_uri != m.object_uri), None)
        if other is None:
            raise SettingsError(f"fact {m.key} has no counterpart with another object: a new object is taken from "
                                f"another fact, so at least two objects are needed")
        out[m.key] = other
    return out


def _known(model: Any, facts: Sequence[MultilingualFact], languages: Sequence[str], check: bool,
           batch_size: int) -> dict[tuple[str, str], bool]:
    """Whether the model answers at least one prompt of each (fact, language) present (all True unchecked)."""
    pairs = [(m.key, l) for m in facts for l in languages if l in m.languages]
    if not check:
        return dict.fromkeys(pairs, True)
    by_key = {m.key: m for m in facts}
    ok = answers_many(model, [by_key[k][l] for k, l in pairs], batch_size=batch_size)
    return {p: bool(a.any()) for p, a in zip(pairs, ok)}


def _edit_skip(model: Any, editor: str, m: MultilingualFact, new: MultilingualFact, lang: str,
               neurons: LanguageNeurons, known: dict[tuple[str, str], bool]) -> str | None:
    """Why ``editor`` cannot edit ``m`` in ``lang`` (None: it can)."""
    if lang not in m.languages or lang not in new.languages:
        return "missing_translation"
    if not known[(m.key, lang)]:
        return "not_known"
    if m.key not in neurons.facts:
        return "not_located"
    if target_tokens(model, m[lang].target) == target_tokens(model, new[lang].target):
        return "same_object"
    if not _groups(editor, m.key, lang, neurons):
        return "no_neurons"
    if editor == "kn-update" and (len(target_tokens(model, m[lang].target)) > 1
                                  or len(target_tokens(model, new[lang].target)) > 1):
        return "multi_token_object"
    return None


def _groups(editor: str, key: str, lang: str, neurons: LanguageNeurons) -> dict[str, NeuronSet]:
    """The neuron groups an editor edits (empty groups dropped): LIKN, and for MEMLA the language's own."""
    groups = {"independent": neurons.independent(key)}
    if editor == "memla":
        groups["specific"] = neurons.specific(key, lang)
    return {g: s for g, s in groups.items() if len(s)}


def _make(model: Any, editor: str, fact: Fact, new_target: str, groups: dict[str, NeuronSet],
          options: Mapping[str, Any]) -> Edit:
    if editor == "kn-update":
        return kn_update(model, fact, new_target, groups["independent"], **options)
    return memla_edit(model, fact, new_target, groups, **options)


def _request(m: MultilingualFact, new: MultilingualFact, lang: str, facts: Sequence[MultilingualFact],
             known: dict[tuple[str, str], bool], n_neighbours: int) -> EditRequest:
    """B's request: B's version of the fact (named ``key/B``), B's label of the new object, B's neighbours."""
    i = next(j for j, f in enumerate(facts) if f.key == m.key)
    old, target = m[lang].target.strip(), new[lang].target.strip()
    neighbours = [f[lang] for f in (facts[(i + j) % len(facts)] for j in range(1, len(facts)))
                  if lang in f.languages and known[(f.key, lang)] and f[lang].target.strip() not in (old, target)]
    return EditRequest(replace(m[lang], name=f"{m.key}/{lang}"), new[lang].target, neighbours[:n_neighbours])


def _cell_skip(m: MultilingualFact, new: MultilingualFact, lang: str, known: dict[tuple[str, str], bool]
               ) -> str | None:
    if lang not in m.languages or lang not in new.languages:
        return "missing_translation"
    if not known[(m.key, lang)]:
        return "not_known"
    if m[lang].target.strip() == new[lang].target.strip():
        return "same_object"
    return None


def cross_lingual_edits(model: Any, facts: Sequence[MultilingualFact], neurons: LanguageNeurons, *,
                        editors: Sequence[str] = MATRIX_EDITORS, edit_languages: Sequence[str] | None = None,
                        eval_languages: Sequence[str] | None = None, n_neighbours: int = 4,
                        check_known: bool = True, kn_options: Mapping[str, Any] | None = None,
                        memla_options: Mapping[str, Any] | None = None, batch_size: int = 64,
                        progress: bool = False) -> EditMatrix:
    """Edit each fact in each of ``edit_languages`` with each editor and judge it in each of ``eval_languages``
    (both default to ``neurons.languages``); see the module docstring. ``neurons``: the facts' LIKN and
    language-specific sets (:func:`~knlens.methods.multilingual.likn.language_neurons`). ``check_known``: skip
    (fact, language) pairs whose prompts the model answers none of (``not_known``). ``kn_options`` /
    ``memla_options`` go to the editors. No perplexity is measured (it does not depend on the language)."""
    unknown = [e for e in editors if e not in MATRIX_EDITORS]
    if unknown or not editors:
        raise SettingsError(f"unknown editor(s) {unknown or 'none given'}; the matrix's editors are {MATRIX_EDITORS}")
    if not facts:
        raise SettingsError("no facts to edit")
    if n_neighbours < 0:
        raise SettingsError(f"n_neighbours must be at least 0, got {n_neighbours}")
    edit_langs = tuple(edit_languages or neurons.languages)
    eval_langs = tuple(eval_languages or neurons.languages)
    odd = [l for l in edit_langs if l not in neurons.languages]
    if odd:
        raise SettingsError(f"no neuron sets in edit language(s) {odd}; the neurons' languages are {neurons.languages}")
    options = {"kn-update": dict(kn_options or {}), "memla": dict(memla_options or {})}
    start = fingerprint(model)
    known = _known(model, facts, list(dict.fromkeys([*edit_langs, *eval_langs])), check_known, batch_size)
    new_of = counterparts(facts)
    frames, skips, sizes = [], [], []
    for a in tqdm(edit_langs, desc="edit languages", disable=not progress):
        for editor in editors:
            made: dict[str, Edit] = {}
            requests = []
            for m in facts:
                new = new_of[m.key]
                why = _edit_skip(model, editor, m, new, a, neurons, known)
                if why is None:
                    try:
                        made[m.key] = _make(model, editor, m[a], new[a].target, _groups(editor, m.key, a, neurons),
                                            options[editor])
                    except NoOpEditError:
                        why = "no_op"
                for b in eval_langs:
                    reason = why or _cell_skip(m, new, b, known)
                    if reason:
                        skips.append({"fact": m.key, "edit_language": a, "eval_language": b, "editor": editor,
                                      "reason": reason})
                    else:
                        requests.append(_request(m, new, b, facts, known, n_neighbours))
                if m.key in made:
                    e = made[m.key]
                    sizes.append({"fact": m.key, "edit_language": a, "editor": editor, "n_changed": e.n_changed,
                                  "delta_norm": e.delta_norm, "steps_run": e.params.get("steps_run", 0),
                                  "p_new": e.params.get("p_new", float("nan"))})
            if not requests:
                continue

            def cached(model_: Any, request: EditRequest, _: Any, made: dict[str, Edit] = made) -> Edit:
                return made[request.name.rsplit("/", 1)[0]]
            ev = evaluate_edits(model, requests, {editor: cached}, n_text=0, batch_size=batch_size)
            per = ev.per_fact()
            split = per["fact"].str.rsplit("/", n=1)
            frames.append(per.assign(fact=split.str[0], eval_language=split.str[1], edit_language=a))
    columns = ["fact", "edit_language", "eval_language", "editor", "metric", "convention", "before", "after"]
    frame = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    frame = frame[frame.metric.isin(MATRIX_METRICS)].dropna(subset=["after"]).reset_index(drop=True)
    settings = EditMatrixSettings(editors=tuple(editors), options={k: repr(options[k]) for k in editors},
                                  edit_languages=edit_langs, eval_languages=eval_langs, n_neighbours=n_neighbours,
                                  check_known=check_known, neurons=f"{neurons.settings.attribution}, threshold "
                                  f"{neurons.settings.threshold}, across {','.join(neurons.settings.across)}",
                                  model=model_name(model), fingerprint=start, knlens_version=__version__)
    return EditMatrix(frame, pd.DataFrame(skips, columns=["fact", "edit_language", "eval_language", "editor", "reason"]),
                      pd.DataFrame(sizes, columns=["fact", "edit_language", "editor", "n_changed", "delta_norm",
                                                   "steps_run", "p_new"]),
                      tuple(m.key for m in facts), settings)
