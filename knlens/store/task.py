"""One task of a sweep, as a results store files it: a study run on one fact, one model, with settings.

A task's ``key`` is a content key of the result contract (``study/fact/settings-hash``,
:func:`knlens.results.contract.content_key`) over everything that makes its result: the model, the study's
settings, the fact's prompts and target, and the knlens version. The same task gives the same key, so a
store skips it when it is done; another knlens version or other settings give another key (both kept,
never mixed).

>>> from knlens.core.facts import Fact
>>> t = Task("locate", Fact(["the capital of france is"], " paris", name="capital-france"), "tiny-llama",
...          {"steps": 4})
>>> t.key.startswith("locate/capital-france/"), t.key == Task.from_row(t.row()).key
(True, True)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from knlens.core.facts import Fact
from knlens.core.versions import __version__
from knlens.results.contract import content_key, settings_hash, slug

__all__ = ["Task", "fact_to_json", "fact_from_json"]


def fact_to_json(fact: Fact) -> str:
    """``fact`` as a JSON object of its fields (prompts as a list).

    >>> fact_from_json(fact_to_json(Fact("the capital of france is", " paris"))).target
    ' paris'
    """
    return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(fact).items()},
                      ensure_ascii=False, sort_keys=True)


def fact_from_json(text: str) -> Fact:
    """The :class:`~knlens.core.facts.Fact` that :func:`fact_to_json` wrote."""
    return Fact(**json.loads(text))


@dataclass(frozen=True)
class Task:
    """A study (``"locate"``, ``"trace"``, ...) on one ``fact`` and ``model`` (a name) with ``settings``
    (the study function's keyword arguments, JSON values)."""

    study: str
    fact: Fact
    model: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    knlens_version: str = __version__

    def identity(self) -> dict[str, Any]:
        """What the key hashes: model, settings, the fact's content, knlens version."""
        return {"model": self.model, "settings": json.loads(self.settings_json()),
                "fact": json.loads(fact_to_json(self.fact)), "knlens": self.knlens_version}

    def settings_json(self) -> str:
        """The settings as sorted JSON."""
        return json.dumps(dict(self.settings), sort_keys=True, ensure_ascii=False)

    @property
    def fact_name(self) -> str:
        """The fact's name, or its first prompt when it has none."""
        return self.fact.name or self.fact.prompts[0]

    def group(self) -> str:
        """The hash of what tasks of one setting group share: :meth:`identity` without the fact (model, settings,
        knlens version). Results of different groups are never pooled."""
        return settings_hash({k: v for k, v in self.identity().items() if k != "fact"})

    @property
    def key(self) -> str:
        """``study/fact/hash`` over :meth:`identity`."""
        return content_key(self.study, slug(self.fact_name), self.identity())

    def row(self) -> dict[str, Any]:
        """The task's columns of a store row."""
        return {"key": self.key, "study": self.study, "fact": self.fact_name, "relation": self.fact.relation,
                "model": self.model, "settings_hash": self.group(), "settings": self.settings_json(),
                "fact_json": fact_to_json(self.fact), "knlens_version": self.knlens_version}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        """The task a store row records (for retrying it)."""
        return cls(str(row["study"]), fact_from_json(str(row["fact_json"])), str(row["model"]),
                   json.loads(str(row["settings"])), str(row["knlens_version"]))
