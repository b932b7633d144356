"""Synonymous readings of a relation, for Niu et al.'s *synonymous invariance* (docs/methods.md, editing
criteria): the same fact asked through another relation whose object is a fixed function of the first one's.

ParaRel's P101 (field of work: "Marie Curie works in the field of physics") has a synonymous reading through
an occupation ("Marie Curie is a famous physicist"); :data:`FIELD_OCCUPATION` is the table that maps a field
to its occupation noun (Niu et al. write one such table; this one is knlens' own). :data:`SYNONYM_READINGS`
says, per relation, which templates ask the synonymous reading and which table maps the object.

>>> synonym_of("P101", " physics")
' physicist'
>>> synonym_of("P101", " knitting")
Traceback (most recent call last):
...
knlens.core.errors.TargetError: the object ' knitting' has no entry in P101's synonym table (FIELD_OCCUPATION); known: anatomy, anthropology, architecture, art, astronomy, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from knlens.core.errors import TargetError
from knlens.data.builtin import UnknownRelationError

__all__ = ["FIELD_OCCUPATION", "SynonymReading", "SYNONYM_READINGS", "synonym_of"]

FIELD_OCCUPATION: dict[str, str] = {
    "anatomy": "anatomist", "anthropology": "anthropologist", "architecture": "architect", "art": "artist", "astronomy": "astronomer",
    "biology": "biologist", "botany": "botanist", "chemistry": "chemist", "computer science": "computer scientist",
    "ecology": "ecologist", "economics": "economist", "engineering": "engineer", "genetics": "geneticist", "geography": "geographer", "geometry": "geometer",
    "geology": "geologist", "history": "historian", "journalism": "journalist", "law": "lawyer",
    "linguistics": "linguist", "literature": "writer", "logic": "logician", "mathematics": "mathematician",
    "medicine": "physician", "music": "musician", "neuroscience": "neuroscientist", "painting": "painter",
    "pharmacy": "pharmacist", "philosophy": "philosopher", "photography": "photographer", "physics": "physicist", "physiology": "physiologist",
    "poetry": "poet", "politics": "politician", "psychology": "psychologist", "sculpture": "sculptor",
    "sociology": "sociologist", "statistics": "statistician", "theology": "theologian", "zoology": "zoologist",
}
"""A field of work (ParaRel P101's objects) → the occupation noun of someone who works in it."""


@dataclass(frozen=True)
class SynonymReading:
    """Another way to ask a relation: ``templates`` (``[X]`` = the subject, the object follows) and the
    ``table`` that maps the relation's object to the object of this reading (``name`` names the table)."""

    templates: tuple[str, ...]
    table: Mapping[str, str]
    name: str


SYNONYM_READINGS: dict[str, SynonymReading] = {
    "P101": SynonymReading(("[X] is a famous",), FIELD_OCCUPATION, "FIELD_OCCUPATION"),
}
"""Per ParaRel relation, its synonymous reading (Niu et al.'s template for P101)."""


def synonym_of(relation: str, target: str) -> str:
    """The object of ``relation``'s synonymous reading for ``target`` (the leading space kept)."""
    if relation not in SYNONYM_READINGS:
        raise UnknownRelationError(f"relation {relation!r} has no synonymous reading; give templates and a table, "
                                   f"or use one of {', '.join(SYNONYM_READINGS)}")
    reading = SYNONYM_READINGS[relation]
    key = target.strip()
    if key not in reading.table:
        raise TargetError(f"the object {target!r} has no entry in {relation}'s synonym table ({reading.name}); known: "
                          f"{', '.join(sorted(reading.table)[:5])}, ...")
    return target[: len(target) - len(target.lstrip())] + reading.table[key]
