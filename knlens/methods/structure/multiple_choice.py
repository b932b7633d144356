"""Multiple-choice prompts from cloze facts, the proxy task of NA-ICA / QRNCA (docs/methods.md, Query-relevant neurons).

A fact's question becomes a 4-option prompt whose answer is one option letter: the options are the fact's object
and three other objects of the same relation, shuffled anew (seeded) for each of several templates, so the right
letter moves between templates and the attribution summed over them is not the attribution of one letter.

>>> from knlens import Fact
>>> facts = [Fact([f"The capital of {c} is"], f" {o}", relation="P36", name=c)
...          for c, o in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo")]]
>>> q = multiple_choice(facts, n_templates=2, seed=0)[0]
>>> len(q.prompts), sorted(q.options[0]) == sorted(["Paris", "Madrid", "Rome", "Tokyo"]), q.letters[0] in " A B C D"
(2, True, True)
>>> print(q.prompts[0])
Question: The capital of France is ...?
A. Paris
B. Rome
C. Madrid
D. Tokyo
Answer:
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from knlens.core.errors import OptionLetterError, SettingsError, TargetError, TooFewOptionsError
from knlens.core.facts import Fact
from knlens.core.tokens import target_tokens

__all__ = ["LETTERS", "TEMPLATES", "TEMPLATES_BY_LANGUAGE", "MCQuery", "multiple_choice", "check_letters",
           "templates_for"]

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
TEMPLATES: tuple[str, ...] = (
    "Question: {question}\n{options}\nAnswer:",
    "{question}\n{options}\nThe correct option is",
    "Choose the right answer.\n{question}\n{options}\nAnswer:",
    "Read the question and pick one option.\nQ: {question}\n{options}\nA:",
)

TEMPLATES_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": TEMPLATES,
    "fr": ("Question: {question}\n{options}\nRéponse:", "{question}\n{options}\nLa bonne option est",
           "Choisissez la bonne réponse.\n{question}\n{options}\nRéponse:",
           "Lisez la question et choisissez une option.\nQ: {question}\n{options}\nR:"),
    "de": ("Frage: {question}\n{options}\nAntwort:", "{question}\n{options}\nDie richtige Option ist",
           "Wählen Sie die richtige Antwort.\n{question}\n{options}\nAntwort:",
           "Lesen Sie die Frage und wählen Sie eine Option.\nF: {question}\n{options}\nA:"),
    "it": ("Domanda: {question}\n{options}\nRisposta:", "{question}\n{options}\nL'opzione corretta è",
           "Scegli la risposta giusta.\n{question}\n{options}\nRisposta:",
           "Leggi la domanda e scegli un'opzione.\nD: {question}\n{options}\nR:"),
    "pt": ("Pergunta: {question}\n{options}\nResposta:", "{question}\n{options}\nA opção correta é",
           "Escolha a resposta certa.\n{question}\n{options}\nResposta:",
           "Leia a pergunta e escolha uma opção.\nP: {question}\n{options}\nR:"),
    "es": ("Pregunta: {question}\n{options}\nRespuesta:", "{question}\n{options}\nLa opción correcta es",
           "Elige la respuesta correcta.\n{question}\n{options}\nRespuesta:",
           "Lee la pregunta y elige una opción.\nP: {question}\n{options}\nR:"),
}
"""The templates' frame (instruction, "Answer:") in each language knlens has them for; the option letters stay."""


def templates_for(language: str) -> tuple[tuple[str, ...], str]:
    """The templates of ``language`` and the language they are written in: English when knlens has none for it.

    >>> templates_for("de")[0][0].splitlines()[0], templates_for("sv")[1]
    ('Frage: {question}', 'en')
    """
    if language in TEMPLATES_BY_LANGUAGE:
        return TEMPLATES_BY_LANGUAGE[language], language
    return TEMPLATES, "en"


@dataclass(frozen=True)
class MCQuery:
    """One fact asked as multiple-choice prompts: ``prompts[j]`` (template ``j`` with its own shuffle of
    ``options[j]``) is answered by ``letters[j]`` (with its leading space, e.g. ``" C"``)."""

    fact: Fact
    prompts: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    letters: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.fact.name or self.fact.prompts[0]

    def facts(self) -> list[Fact]:
        """One single-prompt :class:`Fact` per template (its letter as target), named ``name#t<j>``."""
        return [Fact([p], letter, relation=self.fact.relation, name=f"{self.name}#t{j}")
                for j, (p, letter) in enumerate(zip(self.prompts, self.letters))]


def check_letters(model: Any, letters: Sequence[str] = LETTERS) -> None:
    """Raise :class:`~knlens.core.errors.OptionLetterError` unless every ``" " + letter`` is one token of the
    model's tokenizer and the tokens differ (an answer must be one next token).

    >>> from knlens import load_model
    >>> check_letters(load_model("tiny-llama"))
    Traceback (most recent call last):
    ...
    knlens.core.errors.OptionLetterError: option letters ['B', 'C', 'D'] are not single tokens of tiny-llama's tokenizer (after a space); choose letters that are, e.g. check model.tokenizer(' A')
    """
    ids, bad = [], []
    for letter in letters:
        try:
            tok = target_tokens(model, f" {letter}")
        except TargetError:  # a letter outside the vocabulary: reported below with the others
            tok = []
        (ids.append(tok[0]) if len(tok) == 1 else bad.append(letter))
    name = getattr(model.cfg, "model_name", "the model")
    if bad:
        raise OptionLetterError(f"option letters {bad} are not single tokens of {name}'s tokenizer (after a space); "
                                f"choose letters that are, e.g. check model.tokenizer(' A')")
    if len(set(ids)) != len(ids):
        raise OptionLetterError(f"option letters {list(letters)} share a token in {name}'s tokenizer; use distinct ones")


def _question(fact: Fact) -> str:
    return f"{fact.prompts[0].rstrip()} ...?"


def multiple_choice(facts: Sequence[Fact], *, n_templates: int = 3, seed: int = 0, letters: Sequence[str] = LETTERS,
                    templates: Sequence[str] = TEMPLATES, model: Any = None) -> list[MCQuery]:
    """Every fact of ``facts`` as :class:`MCQuery` prompts with ``n_templates`` templates (``len(letters)`` options:
    its object and objects of other facts of the same relation, drawn and shuffled per template with ``seed``).

    A relation with fewer distinct objects than options raises :class:`~knlens.core.errors.TooFewOptionsError`
    naming it and its count; with ``model``, the letters are checked first (:func:`check_letters`).
    """
    if model is not None:
        check_letters(model, letters)
    if not 1 <= n_templates <= len(templates):
        raise SettingsError(f"n_templates must be between 1 and the {len(templates)} templates, got {n_templates}")
    objects: dict[str | None, list[str]] = {}
    for f in facts:
        objects.setdefault(f.relation, [])
        if f.target.strip() not in objects[f.relation]:
            objects[f.relation].append(f.target.strip())
    short = {r: len(o) for r, o in objects.items() if len(o) < len(letters)}
    if short:
        rel, n = next(iter(short.items()))
        raise TooFewOptionsError(f"relation {rel} has {n} distinct object(s) among the facts given, fewer than the "
                                 f"{len(letters)} options of a question; give more facts of it")
    rng = random.Random(seed)
    out = []
    for f in facts:
        true = f.target.strip()
        others = [o for o in objects[f.relation] if o != true]
        prompts, options, answers = [], [], []
        for template in templates[:n_templates]:
            opts = [true, *rng.sample(others, len(letters) - 1)]
            rng.shuffle(opts)
            listing = "\n".join(f"{letter}. {o}" for letter, o in zip(letters, opts))
            prompts.append(template.format(question=_question(f), options=listing))
            options.append(tuple(opts))
            answers.append(f" {letters[opts.index(true)]}")
        out.append(MCQuery(f, tuple(prompts), tuple(options), tuple(answers)))
    return out
