"""Editing criteria beyond reliability, generality and locality (docs/methods.md, editing criteria): Niu et al.'s
bijective symmetry and synonymous invariance, and Wei et al.'s entity-versus-relation editing.

Each criterion is a set of :class:`~knlens.methods.editing.editors.Probe` prompts added to an
:class:`~knlens.methods.editing.editors.EditRequest`, so that :func:`~knlens.methods.editing.evaluate.evaluate_edits`
reads them before and after every edit like the request's own prompts:

* :func:`symmetry_request` — edit "The capital of s is" t → t′, where t′ is the capital of another country s′;
  group ``symmetry``: the reverse prompts of t′ ("t′ is the capital of") should now give s (the true object
  there is s′); group ``symmetry_old``: the reverse prompts of t ("t is the capital of") → s, the old reverse
  fact, reported before and after. The reverse templates come from ParaRel
  (:func:`~knlens.data.pararel.reverse_templates`); a relation without a reverse reading raises
  :class:`~knlens.core.errors.NoSymmetryError`.
* :func:`synonym_request` — edit "s works in the field of" t → t′; group ``synonym``: "s is a famous" should now
  give the occupation of t′ (true: the occupation of t), through a table
  (:data:`~knlens.data.synonyms.FIELD_OCCUPATION`, or any table and templates given).
* :func:`relation_probes` and :func:`entity_relation_editors` — the same fact edited with the rank-one key at the
  subject's last token (``entity``) and at the relation's last token (``relation``); groups ``relation`` /
  ``relation_old``: a question on the relation between s and t′ (t) whose continuation is the relation's word
  (" capital") or " None" — success is NLL(relation) < NLL(None).

:func:`criterion_values` evaluates one fact with one editor and returns ``{metric: value after the edit}``.

>>> from knlens import load_model, Fact, NeuronSet
>>> from knlens.methods.editing.editors import kn_update_editor
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is"], " paris", subject="france", relation="P36", name="capital-france")
>>> other = Fact(["the capital of italy is"], " rome", subject="italy", relation="P36")
>>> req = symmetry_request(fact, other, templates=["[Y] is the capital of"])
>>> [(p.group, p.prompt, p.target_true, p.target_new) for p in req.probes]
[('symmetry', 'rome is the capital of', ' italy', ' france'), ('symmetry_old', 'paris is the capital of', ' france', None)]
>>> values = criterion_values(model, req, kn_update_editor(lambda r: NeuronSet([(1, 3)])))
>>> sorted(k for k in values if k.startswith("symmetry"))[:4]
['symmetry', 'symmetry_before', 'symmetry_old', 'symmetry_old_before']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from knlens.core.errors import FactError, NoSymmetryError, PromptError, TargetError
from knlens.core.facts import Fact
from knlens.data.pararel import reverse_templates
from knlens.data.synonyms import SYNONYM_READINGS
from knlens.methods.editing.editors import EditRequest, Editor, Probe, rank_one_editor
from knlens.methods.editing.evaluate import evaluate_edits

__all__ = ["RELATION_WORDS", "RELATION_QUESTION", "symmetry_probes", "symmetry_request", "synonym_probes",
           "synonym_request", "relation_probes", "entity_relation_editors", "criterion_values"]

RELATION_WORDS: dict[str, str] = {
    "P36": " capital", "P1376": " capital", "capital": " capital", "P101": " field", "P47": " border",
    "P530": " diplomatic", "P190": " twin", "P106": " occupation", "occupation": " occupation",
    "P37": " language", "official-language": " language", "P38": " currency", "currency": " currency",
    "P30": " continent", "continent": " continent", "P17": " country", "country": " country",
    "P407": " language", "P1412": " language", "P178": " developer", "P279": " subclass",
}
"""A one-word answer naming each relation, for the relation question (knlens' own wording)."""

RELATION_QUESTION = "Question: which relation holds between {subject} and {object}? Answer:"
"""The relation question; its continuation is the relation's word or " None" (the variant documented in
docs/methods.md, entity versus relation editing)."""


def _space(text: str) -> str:
    return " " + text.strip()


def _need_subject(fact: Fact, what: str) -> str:
    if not fact.subject:
        raise PromptError(f"{what} needs the subject of fact {fact.name or fact.prompts[0]!r}: give the fact a subject")
    return fact.subject


def symmetry_probes(subject: str, old: str, new: str, new_subject: str, templates: Sequence[str]) -> list[Probe]:
    """The ``symmetry`` probes (each template with ``[Y]`` = ``new``: should give ``subject`` after the edit,
    ``new_subject`` before) and the ``symmetry_old`` probes (``[Y]`` = ``old``: the old reverse fact → ``subject``)."""
    if not templates:
        raise NoSymmetryError("no reverse templates: bijective symmetry has nothing to ask")
    bad = [t for t in templates if t.count("[Y]") != 1]
    if bad:
        raise PromptError(f"a reverse template must hold [Y] (the object) once, got {bad[0]!r}")
    probes = [Probe("symmetry", t.replace("[Y]", new.strip()), _space(new_subject), _space(subject)) for t in templates]
    return probes + [Probe("symmetry_old", t.replace("[Y]", old.strip()), _space(subject)) for t in templates]


def symmetry_request(fact: Fact, counterpart: Fact, *, templates: Sequence[str] | None = None,
                     data_dir: Any = None, neighbours: Sequence[Fact] = ()) -> EditRequest:
    """Edit ``fact`` (s → t) to ``counterpart``'s object t′ (the capital of another country s′), judged on
    bijective symmetry. ``templates``: the reverse templates (``"[Y] is the capital of"``); ``None`` reads
    them from ParaRel for ``fact.relation`` (:class:`~knlens.core.errors.NoSymmetryError` when it has none)."""
    subject, other = _need_subject(fact, "bijective symmetry"), _need_subject(counterpart, "bijective symmetry")
    if counterpart.relation != fact.relation:
        raise FactError(f"the counterpart's relation {counterpart.relation!r} is not the fact's {fact.relation!r}")
    if subject.strip() == other.strip():
        raise FactError(f"the counterpart has the fact's own subject {subject!r}: the reverse prompts cannot tell them "
                        f"apart")
    if templates is None:
        if fact.relation is None:
            raise NoSymmetryError("the fact names no relation: give its reverse templates")
        templates = reverse_templates(fact.relation, data_dir)
    probes = symmetry_probes(subject, fact.target, counterpart.target, other, templates)
    return EditRequest(fact, counterpart.target, neighbours, probes)


def synonym_probes(subject: str, old: str, new: str, templates: Sequence[str],
                   table: Mapping[str, str] | None = None) -> list[Probe]:
    """The ``synonym`` probes: each template with ``[X]`` = ``subject``, whose object should move from the
    synonym of ``old`` to that of ``new`` (``table[object]``; no table: the objects themselves)."""
    def synonym(obj: str) -> str:
        if table is None:
            return obj
        if obj.strip() not in table:
            raise TargetError(f"the object {obj!r} has no entry in the synonym table (known: "
                              f"{', '.join(sorted(table)[:6])}, ...)")
        return _space(table[obj.strip()])

    bad = [t for t in templates if t.count("[X]") != 1]
    if not templates or bad:
        raise PromptError(f"synonymous templates must each hold [X] (the subject) once, got {list(templates)!r}")
    old_syn, new_syn = synonym(old), synonym(new)
    if old_syn.strip() == new_syn.strip():
        raise TargetError(f"{old!r} and {new!r} have the same synonym {old_syn!r}: the synonymous prompts cannot "
                          f"tell the edit")
    return [Probe("synonym", t.replace("[X]", subject), old_syn, new_syn) for t in templates]


def synonym_request(fact: Fact, new_target: str, *, templates: Sequence[str] | None = None,
                    table: Mapping[str, str] | None = None, neighbours: Sequence[Fact] = ()) -> EditRequest:
    """Edit ``fact`` to ``new_target``, judged on synonymous invariance. ``templates``/``table`` default to the
    fact's relation's reading in :data:`~knlens.data.synonyms.SYNONYM_READINGS` (P101: "[X] is a famous" and
    the field → occupation table); any relation works with templates (and a table, unless the objects are
    the same)."""
    subject = _need_subject(fact, "synonymous invariance")
    if templates is None:
        reading = SYNONYM_READINGS.get(fact.relation or "")
        if reading is None:
            raise FactError(f"relation {fact.relation!r} has no synonymous reading in SYNONYM_READINGS "
                            f"({', '.join(SYNONYM_READINGS)}): give templates (and a table)")
        templates, table = reading.templates, reading.table if table is None else table
    return EditRequest(fact, new_target, neighbours, synonym_probes(subject, fact.target, new_target, templates,
                                                                     table))


def relation_probes(fact: Fact, new_target: str, *, word: str | None = None, none: str = " None",
                    question: str = RELATION_QUESTION) -> list[Probe]:
    """The ``relation`` probe (the question on the subject and ``new_target``: the relation's word should beat
    ``none`` after the edit) and the ``relation_old`` probe (on the subject and the old object). ``word``
    defaults to :data:`RELATION_WORDS` of the fact's relation."""
    subject = _need_subject(fact, "the relation question")
    word = word if word is not None else RELATION_WORDS.get(fact.relation or "")
    if word is None:
        raise FactError(f"no relation word for relation {fact.relation!r}: pass word=' ...' (known: "
                        f"{', '.join(RELATION_WORDS)})")
    ask = [question.format(subject=subject, object=o.strip()) for o in (new_target, fact.target)]
    return [Probe("relation", ask[0], none, word), Probe("relation_old", ask[1], word, none)]


def entity_relation_editors(**options: Any) -> dict[str, Editor]:
    """Two rank-one editors of the same fact: ``entity`` (key at the subject's last token) and ``relation``
    (key at the relation's last token); ``options`` go to both (``layer``, ``covariance``, ...)."""
    return {"entity": rank_one_editor(key_at="subject", **options),
            "relation": rank_one_editor(key_at="relation", **options)}


def criterion_values(model: Any, request: EditRequest, editor: Editor, **options: Any) -> dict[str, float]:
    """One fact, one editor: ``{metric: mean over the fact's prompts after the edit}`` for every metric its
    prompts give, plus ``"<metric>_before"``; ``options`` go to
    :func:`~knlens.methods.editing.evaluate.evaluate_edits` (no perplexity unless ``n_text`` is given)."""
    options.setdefault("n_text", 0)
    per_fact = evaluate_edits(model, [request], {"editor": editor}, **options).per_fact()
    out = {m: float(v) for m, v in zip(per_fact.metric, per_fact.after)}
    return out | {f"{m}_before": float(v) for m, v in zip(per_fact.metric, per_fact.before)}
