"""Loaders for ParaRel (Elazar et al., 2021) and mParaRel (Fierro and Søgaard, 2022).

The data sets are not shipped with knlens; they are read from a data folder (see
:func:`default_data_dir`) laid out as::

    <data>/pararel/patterns/P36.jsonl   {"pattern": "The capital of [X] is [Y] .", "lemma": ..., ...}
    <data>/pararel/tuples/P36.jsonl     {"sub_label": ..., "obj_label": ..., "uuid": ...}
    <data>/mpararel/<lang>/patterns/P36.jsonl   {"pattern": "the capital of [X] is [Y]", "checked-by-human": false}
    <data>/mpararel/<lang>/tuples/P36.jsonl     {"sub_label", "obj_label", "sub_uri", "obj_uri", "lineid"}

Each subject-object tuple becomes one :class:`~knlens.core.facts.Fact` whose prompts are the relation's
usable templates filled with the subject and cut right before ``[Y]``.

>>> facts = load_pararel("P36", max_facts=2)          # doctest: +SKIP
>>> facts[0].prompts[0], facts[0].target               # doctest: +SKIP
('The capital of Cook County is', ' Chicago')
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from knlens.core.errors import DataFormatError, DataNotFoundError, NoSymmetryError, SettingsError
from knlens.core.facts import Fact
from knlens.data.builtin import BUILTIN_RELATIONS, UnknownRelationError

__all__ = ["DATA_ENV", "NO_SPACE_LANGUAGES", "SYMMETRIC_RELATIONS", "default_data_dir", "load_mpararel", "load_pararel",
           "mpararel_languages", "mpararel_relations", "pararel_relations", "data_subdir", "read_jsonl",
           "reverse_templates"]

DATA_ENV = "KNLENS_DATA"
"""The environment variable that overrides where the data sets are looked for."""

NO_SPACE_LANGUAGES = frozenset({"zh", "zh-hans", "zh-hant", "ja", "th", "lo", "km", "my"})
"""Languages written without spaces between words: their targets get no leading space."""

SYMMETRIC_RELATIONS: dict[str, str] = {
    "P36": "bijective: a country (or region) has one capital, a capital is the capital of one country",
    "P1376": "bijective: the inverse of P36 (capital of)",
    "P47": "symmetric: shares border with",
    "P530": "symmetric: diplomatic relation",
    "P190": "symmetric: twinned administrative body (twin cities)",
}
"""The ParaRel relations whose reverse reading holds — the object's fact names the subject again — and why.
Bijective symmetry (Niu et al., 2024) is defined for these only; every other relation is many-to-one or
one-to-many (a field of work has many people, a country many cities)."""

_REPO_ROOT = Path(__file__).resolve().parents[2]
_Y_LAST = re.compile(r"^(?P<prefix>.*)\[Y\]\s*[.。]?\s*$", re.DOTALL)


def default_data_dir() -> Path:
    """Where the data sets are looked for: ``$KNLENS_DATA`` when set, else ``../shared/data`` next to the
    repository (then next to the working directory). The folder is not required to exist; the loaders
    raise :class:`~knlens.core.errors.DataNotFoundError` (a ``FileNotFoundError``) when it does not.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def _data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if not root.is_dir():
        if data_dir is not None:
            looked = f"{root} (given as data_dir)"
        elif os.environ.get(DATA_ENV):
            looked = f"{root} (from ${DATA_ENV})"
        else:
            looked = (f"{_REPO_ROOT.parent / 'shared' / 'data'} and {Path.cwd().parent / 'shared' / 'data'} "
                      f"(../shared/data next to the repository and to the working directory)")
        raise DataNotFoundError(
            f"knlens data folder not found; looked in {looked}. Pass data_dir=... or set the environment "
            f"variable {DATA_ENV} to the folder that holds pararel/, mpararel/ and blimp/.")
    return root


def data_subdir(data_dir: str | os.PathLike[str] | None, name: str, marker: str) -> Path:
    """``<root>/<name>``, or ``root`` itself when it already is that folder (``marker``, a glob, matches in it)."""
    root = _data_root(data_dir)
    if (root / name).is_dir():
        return root / name
    if any(root.glob(marker)):
        return root
    raise DataNotFoundError(f"no {name}/ folder in {root}; set {DATA_ENV} or pass data_dir= to the folder that "
                            f"holds {name}/")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-empty line of a JSON-lines file; a bad line is a DataFormatError."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}:{i + 1}: not a JSON line ({err})") from None


def _relation_id(path: Path) -> int:
    m = re.fullmatch(r"P(\d+)", path.stem)
    return int(m.group(1)) if m else 1 << 30


def _relations_in(folder: Path) -> list[str]:
    pats, tups = folder / "patterns", folder / "tuples"
    if not pats.is_dir():
        return []
    found = [p for p in pats.glob("*.jsonl") if (tups / p.name).is_file()]
    return [p.stem for p in sorted(found, key=lambda p: (_relation_id(p), p.stem))]


def _check_relation(relation: str, folder: Path, what: str) -> str:
    rels = _relations_in(folder)
    rel = relation.strip()
    if rel not in rels and rel.upper() in rels:
        rel = rel.upper()
    if rel not in rels:
        raise UnknownRelationError(f"{what} has no relation {relation!r} in {folder}; available: {', '.join(rels)}")
    return rel


def _prompt_template(pattern: str, *, object_last: bool, spaced: bool, capitalize: bool) -> str | None:
    """The text before ``[Y]`` with ``[X]`` left in, or None when the pattern is unusable."""
    if pattern.count("[X]") != 1 or pattern.count("[Y]") != 1:
        return None
    if object_last:
        m = _Y_LAST.match(pattern)
        if m is None:
            return None
        prefix = m.group("prefix")
    else:
        prefix = pattern[: pattern.index("[Y]")]
    if "[X]" not in prefix:  # the subject comes after the object: no next-token prompt
        return None
    if spaced and prefix and not prefix[-1].isspace():
        return None  # the object is glued to the previous word (e.g. "l'[Y]"): a spaced target would not fit
    prefix = prefix.strip()
    if capitalize and prefix[:1].isalpha() and prefix[:1].islower():
        prefix = prefix[0].upper() + prefix[1:]
    return prefix


def _build_facts(relation: str, templates: list[str], tuples: list[tuple[str, str, str]], *, spaced: bool,
                 min_paraphrases: int, max_facts: int | None, seed: int, source: str) -> list[Fact]:
    if min_paraphrases < 1:
        raise SettingsError(f"min_paraphrases must be at least 1, got {min_paraphrases}")
    if max_facts is not None and max_facts < 0:
        raise SettingsError(f"max_facts must be >= 0 or None, got {max_facts}")
    templates = list(dict.fromkeys(templates))
    if len(templates) < min_paraphrases:
        warnings.warn(f"{source}: relation {relation} has {len(templates)} usable template(s), fewer than "
                      f"min_paraphrases={min_paraphrases}; no facts loaded (lower min_paraphrases, or pass "
                      f"object_last=False for templates whose object is not last)", stacklevel=3)
        return []
    facts: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    for key, subject, obj in tuples:
        subject, obj = subject.strip(), obj.strip()
        if not subject or not obj or (subject, obj) in seen:
            continue
        seen.add((subject, obj))
        prompts = list(dict.fromkeys(t.replace("[X]", subject) for t in templates))
        if len(prompts) < min_paraphrases:
            continue
        target = (" " + obj) if spaced else obj
        facts.append(Fact(prompts, target, subject=subject, relation=relation, name=f"{relation}-{key}"))
    if max_facts is not None and max_facts < len(facts):
        keep = sorted(random.Random(seed).sample(range(len(facts)), max_facts))
        facts = [facts[i] for i in keep]
    return facts


def pararel_relations(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The ParaRel relation ids with both a patterns and a tuples file, e.g. ``['P17', 'P19', ...]``."""
    return _relations_in(data_subdir(data_dir, "pararel", "patterns/*.jsonl"))


def load_pararel(relation: str, data_dir: str | os.PathLike[str] | None = None, *, object_last: bool = True,
                 min_paraphrases: int = 3, max_facts: int | None = None, seed: int = 0) -> list[Fact]:
    """One :class:`Fact` per ParaRel tuple of ``relation`` (e.g. ``"P36"``), in file order.

    Each usable template gives one prompt: ``[X]`` filled with the subject, cut right before ``[Y]``
    and stripped; the target is ``" " + object``. With ``object_last`` (the default) only templates
    whose ``[Y]`` ends them (a final period is dropped) are used, so the prompt is the whole
    sentence; with ``object_last=False`` every template whose ``[X]`` precedes ``[Y]`` is used and
    the text after the object is dropped. Facts with fewer than ``min_paraphrases`` distinct prompts
    are skipped (a warning says so when the relation has too few templates). Exact duplicate tuples
    are dropped; a subject with several objects gives several facts. ``max_facts`` keeps a random
    subset (fixed by ``seed``) in file order. Names are ``"<relation>-<line of the tuples file>"``.

    >>> facts = load_pararel("P36")                        # doctest: +SKIP
    >>> facts[0].prompts[:2]                               # doctest: +SKIP
    ('The capital of Cook County is', 'The capital city of Cook County is')
    """
    folder = data_subdir(data_dir, "pararel", "patterns/*.jsonl")
    rel = _check_relation(relation, folder, "ParaRel")
    templates = [t for _, row in read_jsonl(folder / "patterns" / f"{rel}.jsonl")
                 if (t := _prompt_template(str(row.get("pattern", "")), object_last=object_last, spaced=True,
                                           capitalize=False)) is not None]
    tuples = [(str(i), str(row["sub_label"]), str(row["obj_label"]))
              for i, row in read_jsonl(folder / "tuples" / f"{rel}.jsonl")]
    return _build_facts(rel, templates, tuples, spaced=True, min_paraphrases=min_paraphrases, max_facts=max_facts,
                        seed=seed, source="ParaRel")


def reverse_templates(relation: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The templates of ``relation`` that ask for the subject given the object, cut before the subject, with
    ``[Y]`` (the object) left in: ParaRel patterns whose ``[X]`` ends them and follows ``[Y]``
    (``"[Y] is the capital of [X]."`` gives ``"[Y] is the capital of"``).

    ``relation`` is a ParaRel id or a built-in relation name with a Wikidata id (``"capital"`` is P36).
    Raises :class:`~knlens.core.errors.NoSymmetryError` for a relation not in :data:`SYMMETRIC_RELATIONS`
    or one whose patterns have no such template.

    >>> reverse_templates("P36")[:2]                    # doctest: +SKIP
    ['[Y] is the capital of', '[Y] is the capital city of']
    """
    rel = relation.strip()
    builtin = BUILTIN_RELATIONS.get(rel)
    if builtin is not None and builtin.wikidata:
        rel = builtin.wikidata
    if rel.upper() not in SYMMETRIC_RELATIONS:
        raise NoSymmetryError(f"relation {relation!r} has no symmetric or bijective reading, so its edits have no "
                              f"reverse fact to test; relations with one: "
                              f"{', '.join(SYMMETRIC_RELATIONS)}")
    folder = data_subdir(data_dir, "pararel", "patterns/*.jsonl")
    rel = _check_relation(rel, folder, "ParaRel")
    out = []
    for _, row in read_jsonl(folder / "patterns" / f"{rel}.jsonl"):
        swapped = str(row.get("pattern", "")).replace("[X]", "\x00").replace("[Y]", "[X]").replace("\x00", "[Y]")
        t = _prompt_template(swapped, object_last=True, spaced=True, capitalize=False)
        if t is not None:
            out.append(t.replace("[X]", "[Y]"))  # the object, in the reverse reading's subject place
    if not out:
        raise NoSymmetryError(f"ParaRel's {rel} has no template that asks for the subject after the object "
                              f"(\"[Y] ... [X].\"), so its reverse facts cannot be asked")
    return list(dict.fromkeys(out))


def mpararel_languages(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The mParaRel language codes present, e.g. ``['de', 'en', ..., 'zh-hans']``."""
    folder = data_subdir(data_dir, "mpararel", "*/patterns")
    return sorted(p.name for p in folder.iterdir() if (p / "patterns").is_dir())


def _mpararel_lang_dir(lang: str, data_dir: str | os.PathLike[str] | None) -> Path:
    folder = data_subdir(data_dir, "mpararel", "*/patterns")
    if not (folder / lang / "patterns").is_dir():
        langs = sorted(p.name for p in folder.iterdir() if (p / "patterns").is_dir())
        raise UnknownRelationError(f"mParaRel has no language {lang!r} in {folder}; available: {', '.join(langs)}")
    return folder / lang


def mpararel_relations(lang: str = "en", data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The relation ids mParaRel has for ``lang``."""
    return _relations_in(_mpararel_lang_dir(lang, data_dir))


def load_mpararel(relation: str, lang: str, data_dir: str | os.PathLike[str] | None = None, *,
                  object_last: bool = True, min_paraphrases: int = 3, max_facts: int | None = None, seed: int = 0,
                  human_checked_only: bool = False, capitalize: bool = True,
                  space_before_target: bool | None = None) -> list[Fact]:
    """Like :func:`load_pararel` for mParaRel's ``lang`` (``"en"``, ``"fr"``, ``"zh-hans"``, ...).

    mParaRel's templates are lower-cased and have no final period; ``capitalize`` upper-cases a
    template's first letter (German nouns stay lower-case). ``space_before_target`` defaults to
    ``True`` except for :data:`NO_SPACE_LANGUAGES` (Chinese, Japanese, ...), whose targets have no
    leading space. ``human_checked_only`` keeps only templates marked ``checked-by-human`` (none are,
    in some languages). Names are ``"<relation>-<lineid>"``: the same name in two languages is the
    same Wikidata fact.

    >>> facts = load_mpararel("P36", "zh-hans")             # doctest: +SKIP
    >>> facts[0].target                                     # doctest: +SKIP
    '巴库'
    """
    lang_dir = _mpararel_lang_dir(lang, data_dir)
    rel = _check_relation(relation, lang_dir, f"mParaRel ({lang})")
    spaced = (lang.lower() not in NO_SPACE_LANGUAGES) if space_before_target is None else space_before_target
    templates = []
    for _, row in read_jsonl(lang_dir / "patterns" / f"{rel}.jsonl"):
        if human_checked_only and not row.get("checked-by-human", False):
            continue
        t = _prompt_template(str(row.get("pattern", "")), object_last=object_last, spaced=spaced,
                             capitalize=capitalize)
        if t is not None:
            templates.append(t)
    tuples = [(str(row.get("lineid", i)), str(row["sub_label"]), str(row["obj_label"]))
              for i, row in read_jsonl(lang_dir / "tuples" / f"{rel}.jsonl")]
    return _build_facts(rel, templates, tuples, spaced=spaced, min_paraphrases=min_paraphrases,
                        max_facts=max_facts, seed=seed, source=f"mParaRel ({lang})")
