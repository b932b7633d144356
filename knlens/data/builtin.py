"""A small built-in set of hand-written, well-known facts, each asked with several paraphrases.

Every prompt ends right before the answer, so the facts suit left-to-right models; targets carry
their leading space. Relations have readable names (``"capital"``) and, where one fits, a Wikidata
property id (``"P36"``); :func:`builtin_facts` accepts either.

>>> from knlens.data import builtin_facts, get_fact
>>> fact = get_fact("capital-france")
>>> fact.prompts[0], fact.target
('The capital of France is', ' Paris')
>>> len(builtin_facts("capital")) == len(builtin_facts("P36"))
True
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from knlens.core.errors import KnlensError
from knlens.core.names import did_you_mean
from knlens.core.facts import Fact

__all__ = ["BUILTIN_RELATIONS", "BuiltinRelation", "UnknownFactError", "UnknownRelationError", "builtin_facts",
           "builtin_relations", "get_fact"]


class UnknownFactError(KnlensError, KeyError):
    """A fact name that the built-in set does not have."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class UnknownRelationError(KnlensError, ValueError):
    """A relation, language or phenomenon that a data set does not have."""


@dataclass(frozen=True)
class BuiltinRelation:
    """A relation of the built-in set: its name, Wikidata id (if any), meaning and prompt templates."""

    name: str
    wikidata: str | None
    description: str
    templates: tuple[str, ...]  # "{s}" = the subject; empty for relations with per-fact prompts
    prefix: str  # the fact names of this relation start with ``prefix + "-"``


_RELATIONS: tuple[BuiltinRelation, ...] = (
    BuiltinRelation("capital", "P36", "capital city of a country", (
        "The capital of {s} is", "{s}'s capital city is", "The capital city of {s} is",
        "The capital of {s} is the city of"), "capital"),
    BuiltinRelation("official-language", "P37", "official or main language of a country", (
        "The official language of {s} is", "In {s}, the main language is", "People in {s} speak",
        "The main language spoken in {s} is"), "language"),
    BuiltinRelation("currency", "P38", "currency of a country", (
        "The currency of {s} is the", "The official currency of {s} is the", "The currency used in {s} is the",
        "The national currency of {s} is the"), "currency"),
    BuiltinRelation("continent", "P30", "continent a country lies on", (
        "{s} is located on the continent of", "{s} is part of the continent of", "{s} lies on the continent of",
        "{s} is a country on the continent of"), "continent"),
    BuiltinRelation("founder-of", None, "company a person founded (inverse of Wikidata P112, founded by)", (
        "{s} is the founder of", "{s} is best known as the founder of", "{s}, the founder of",
        "{s} is famous as the founder of"), "founder"),
    BuiltinRelation("author", "P50", "author of a written work", (), "author"),
    BuiltinRelation("sport", "P641", "sport an athlete plays", (
        "{s} is a star of professional", "{s} became famous playing professional",
        "{s} is one of the best players in the history of", "{s} is a legend of professional"), "sport"),
    BuiltinRelation("country", "P17", "country a city is in", (
        "{s} is a city in the country of", "{s} is located in the country of",
        "{s} is a city located in the country of", "The city of {s} is located in the country of"), "country"),
    BuiltinRelation("instrument", "P1303", "instrument a musician is known for", (
        "{s} played the", "{s} was famous for playing the", "{s} is known for playing the",
        "{s} was a virtuoso of the"), "instrument"),
    BuiltinRelation("element-symbol", "P246", "chemical symbol of an element", (
        "The chemical symbol for {s} is", "The chemical symbol of {s} is",
        "In the periodic table, the symbol for {s} is", "The element {s} has the chemical symbol"), "symbol"),
    BuiltinRelation("landmark-city", "P131", "city a landmark stands in", (
        "The {s} stands in the city of", "The {s} is a famous landmark in", "The {s} is in the city of",
        "You can visit the {s} in"), "landmark"),
    BuiltinRelation("occupation", "P106", "occupation a famous person is known for", (
        "{s} worked as a", "{s} is best known as a", "{s} was a famous", "{s} is remembered as a great"),
        "occupation"),
)

BUILTIN_RELATIONS: dict[str, BuiltinRelation] = {r.name: r for r in _RELATIONS}

# (relation, subject, target) for the relations with templates.
_TEMPLATED: tuple[tuple[str, str, str], ...] = (
    ("capital", "France", " Paris"), ("capital", "Germany", " Berlin"), ("capital", "Italy", " Rome"),
    ("capital", "Japan", " Tokyo"), ("capital", "China", " Beijing"), ("capital", "Greece", " Athens"),
    ("capital", "Portugal", " Lisbon"), ("capital", "Austria", " Vienna"), ("capital", "Russia", " Moscow"),
    ("official-language", "France", " French"), ("official-language", "Germany", " German"),
    ("official-language", "Spain", " Spanish"), ("official-language", "Italy", " Italian"),
    ("official-language", "Japan", " Japanese"), ("official-language", "Russia", " Russian"),
    ("official-language", "Mexico", " Spanish"), ("official-language", "Brazil", " Portuguese"),
    ("official-language", "the Netherlands", " Dutch"),
    ("currency", "Japan", " yen"), ("currency", "the United States", " dollar"), ("currency", "Italy", " euro"),
    ("currency", "France", " euro"), ("currency", "Germany", " euro"), ("currency", "the United Kingdom", " pound"),
    ("currency", "Russia", " ruble"),
    ("continent", "France", " Europe"), ("continent", "Germany", " Europe"), ("continent", "Italy", " Europe"),
    ("continent", "Kenya", " Africa"), ("continent", "Nigeria", " Africa"), ("continent", "Japan", " Asia"),
    ("founder-of", "Mark Zuckerberg", " Facebook"), ("founder-of", "Elon Musk", " SpaceX"),
    ("founder-of", "Bill Gates", " Microsoft"), ("founder-of", "Steve Jobs", " Apple"),
    ("founder-of", "Jeff Bezos", " Amazon"),
    ("sport", "Lionel Messi", " football"), ("sport", "Cristiano Ronaldo", " football"),
    ("sport", "Kobe Bryant", " basketball"), ("sport", "Michael Jordan", " basketball"),
    ("sport", "Tiger Woods", " golf"), ("sport", "Serena Williams", " tennis"),
    ("country", "Tokyo", " Japan"), ("country", "Mumbai", " India"), ("country", "Barcelona", " Spain"),
    ("country", "Moscow", " Russia"), ("country", "Shanghai", " China"), ("country", "Cairo", " Egypt"),
    ("country", "Munich", " Germany"), ("country", "Toronto", " Canada"),
    ("instrument", "Jimi Hendrix", " guitar"), ("instrument", "Eric Clapton", " guitar"),
    ("instrument", "Jimmy Page", " guitar"), ("instrument", "Frédéric Chopin", " piano"),
    ("instrument", "B.B. King", " guitar"), ("instrument", "Louis Armstrong", " trumpet"),
    ("element-symbol", "gold", " Au"), ("element-symbol", "silver", " Ag"), ("element-symbol", "iron", " Fe"),
    ("element-symbol", "sodium", " Na"), ("element-symbol", "oxygen", " O"), ("element-symbol", "hydrogen", " H"),
    ("element-symbol", "potassium", " K"), ("element-symbol", "copper", " Cu"),
    ("landmark-city", "Eiffel Tower", " Paris"), ("landmark-city", "Colosseum", " Rome"),
    ("landmark-city", "Brandenburg Gate", " Berlin"), ("landmark-city", "Kremlin", " Moscow"),
    ("landmark-city", "Louvre", " Paris"), ("landmark-city", "Statue of Liberty", " New York"),
    ("landmark-city", "Golden Gate Bridge", " San Francisco"),
    ("occupation", "Albert Einstein", " physicist"), ("occupation", "Ludwig van Beethoven", " composer"),
    ("occupation", "Wolfgang Amadeus Mozart", " composer"), ("occupation", "Pablo Picasso", " painter"),
    ("occupation", "Vincent van Gogh", " painter"),
)

# Relations whose paraphrases depend on the kind of subject: written out per fact.
_EXPLICIT: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("author", "Hamlet", " William Shakespeare", (
        "Hamlet is a play by", "The play Hamlet was written by", "Hamlet is a tragedy written by",
        "Hamlet is a famous play by")),
    ("author", "Macbeth", " William Shakespeare", (
        "Macbeth is a play by", "The play Macbeth was written by", "Macbeth is a tragedy written by",
        "Macbeth is a famous play by")),
    ("author", "Romeo and Juliet", " William Shakespeare", (
        "Romeo and Juliet is a play by", "The play Romeo and Juliet was written by",
        "Romeo and Juliet is a tragedy written by", "Romeo and Juliet is a famous play by")),
    ("author", "Pride and Prejudice", " Jane Austen", (
        "Pride and Prejudice is a novel by", "The novel Pride and Prejudice was written by",
        "Pride and Prejudice is a book written by", "The author of the novel Pride and Prejudice is")),
    ("author", "Harry Potter", " J.K. Rowling", (
        "Harry Potter is a series of novels by", "Harry Potter is a famous book series by",
        "The author of the Harry Potter books is", "Harry Potter is a book series written by")),
)


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    ascii_text = re.sub(r"^the\s+", "", ascii_text.lower())
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


@lru_cache(maxsize=1)
def _all_facts() -> tuple[Fact, ...]:
    facts: list[Fact] = []
    for rel_name, subject, target in _TEMPLATED:
        rel = BUILTIN_RELATIONS[rel_name]
        prompts = tuple(t.format(s=subject) for t in rel.templates)
        facts.append(Fact(prompts, target, subject=subject, relation=rel.name, name=f"{rel.prefix}-{_slug(subject)}"))
    for rel_name, subject, target, prompts in _EXPLICIT:
        rel = BUILTIN_RELATIONS[rel_name]
        facts.append(Fact(prompts, target, subject=subject, relation=rel.name, name=f"{rel.prefix}-{_slug(subject)}"))
    names = [f.name for f in facts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # a guard for whoever edits the tables above
        raise RuntimeError(f"duplicate built-in fact names: {dupes}")
    return tuple(facts)


def _resolve_relation(relation: str) -> str:
    for rel in _RELATIONS:
        if relation in (rel.name, rel.wikidata):
            return rel.name
    known = [f"{r.name} ({r.wikidata})" if r.wikidata else r.name for r in _RELATIONS]
    raise UnknownRelationError(f"unknown built-in relation {relation!r}; known relations: {', '.join(known)}")


def builtin_relations() -> list[str]:
    """The names of the built-in relations, in a fixed order.

    >>> builtin_relations()[:3]
    ['capital', 'official-language', 'currency']
    """
    return [r.name for r in _RELATIONS]


def builtin_facts(relation: str | None = None) -> list[Fact]:
    """The built-in facts, all of them or those of one ``relation`` (a name such as ``"capital"`` or a
    Wikidata id such as ``"P36"``). Raises :class:`UnknownRelationError` for an unknown relation.

    >>> [f.name for f in builtin_facts("capital")][:2]
    ['capital-france', 'capital-germany']
    """
    facts = _all_facts()
    if relation is None:
        return list(facts)
    name = _resolve_relation(relation)
    return [f for f in facts if f.relation == name]


def get_fact(name: str, *, listing: str = "knlens.data.builtin_facts() lists them") -> Fact:
    """The built-in fact called ``name`` (e.g. ``"capital-france"``).

    Raises :class:`UnknownFactError` (a ``KeyError``) that suggests close names and says where the names are
    listed (``listing``).

    >>> get_fact("symbol-gold").target
    ' Au'
    """
    for fact in _all_facts():
        if fact.name == name:
            return fact
    hint = did_you_mean(name, [f.name for f in _all_facts() if f.name])
    raise UnknownFactError(f"unknown fact {name!r}{hint} ({listing})")
