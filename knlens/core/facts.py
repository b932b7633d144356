"""The :class:`Fact` type: one piece of knowledge, asked with several paraphrased prompts.

For a left-to-right model the target follows each prompt directly, so it carries the leading
space it would have in running text.

>>> from knlens.core.facts import Fact
>>> fact = Fact(["The capital of France is", "France's capital city is"], " Paris",
...             subject="France", relation="P36", name="capital-france")
>>> fact.prompts
('The capital of France is', "France's capital city is")
>>> fact.subject_chars(1)
(0, 6)
>>> Fact.from_dict(fact.to_dict()) == fact
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knlens.core.errors import FactError, PromptError, TargetError

__all__ = ["Fact"]

_FIELDS = ("prompts", "target", "subject", "relation", "name")


@dataclass(frozen=True, init=False)
class Fact:
    """A fact: paraphrased ``prompts`` that should all be completed by ``target``.

    ``prompts`` may be given as any sequence of strings (a single string counts as one prompt) and is
    stored as a tuple. Duplicated prompts are kept (they weigh a prompt more). ``subject``, when
    given, must occur verbatim (case-sensitive) in every prompt. Invalid input raises
    :class:`~knlens.core.errors.PromptError` or :class:`~knlens.core.errors.TargetError`.

    >>> Fact("The capital of France is", " Paris").prompts
    ('The capital of France is',)
    >>> Fact([], " Paris")
    Traceback (most recent call last):
    ...
    knlens.core.errors.PromptError: a Fact needs at least one prompt, got none
    """

    prompts: tuple[str, ...]
    target: str
    subject: str | None = None
    relation: str | None = None
    name: str | None = None

    def __init__(self, prompts: Sequence[str] | str, target: str, subject: str | None = None,
                 relation: str | None = None, name: str | None = None) -> None:
        if isinstance(prompts, str):
            prompts = (prompts,)
        object.__setattr__(self, "prompts", tuple(prompts))
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "relation", relation)
        object.__setattr__(self, "name", name)
        self.__post_init__()

    def __post_init__(self) -> None:
        label = f" of fact {self.name!r}" if self.name else ""
        if not self.prompts:
            raise PromptError(f"a Fact needs at least one prompt, got none{label}")
        for i, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {i}{label} is a {type(prompt).__name__}, not a string: {prompt!r}")
            if not prompt.strip():
                raise PromptError(f"prompt {i}{label} is empty or only whitespace: {prompt!r}")
        if not isinstance(self.target, str):
            raise TargetError(f"the target{label} must be a string, got {type(self.target).__name__}")
        if not self.target.strip():
            raise TargetError(f"the target{label} is empty or only whitespace: {self.target!r}; "
                              f"give the answer as it follows the prompt, e.g. ' Paris'")
        if self.subject is not None:
            if not isinstance(self.subject, str) or not self.subject.strip():
                raise PromptError(f"the subject{label} must be a non-empty string or None, got {self.subject!r}")
            for i, prompt in enumerate(self.prompts):
                if self.subject not in prompt:
                    raise PromptError(f"the subject {self.subject!r}{label} does not occur in prompt {i}: "
                                      f"{prompt!r} (the match is case-sensitive)")

    def subject_chars(self, prompt: str | int) -> tuple[int, int] | None:
        """Character span ``(start, end)`` of the first occurrence of the subject in ``prompt``.

        ``prompt`` is a string or an index into :attr:`prompts`. ``None`` when the fact has no subject
        or the subject does not occur in ``prompt``.

        >>> Fact(["Paris is the capital of France, and so is the capital of France"], " ...",
        ...      subject="France").subject_chars(0)
        (24, 30)
        """
        text = self.prompts[prompt] if isinstance(prompt, int) else prompt
        if self.subject is None:
            return None
        start = text.find(self.subject)
        if start < 0:
            return None
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``prompts`` as a list); :meth:`from_dict` reads it back."""
        return {"prompts": list(self.prompts), "target": self.target, "subject": self.subject,
                "relation": self.relation, "name": self.name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fact:
        """Build a Fact from a dict with ``prompts`` and ``target`` and optional ``subject``, ``relation``,
        ``name``; other keys raise :class:`~knlens.core.errors.FactError` (a ``ValueError``).

        >>> Fact.from_dict({"prompts": ["The capital of France is"], "target": " Paris"}).target
        ' Paris'
        """
        missing = [k for k in ("prompts", "target") if k not in data]
        if missing:
            raise FactError(f"Fact.from_dict: missing key(s) {missing}; a fact needs 'prompts' and 'target'")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise FactError(f"Fact.from_dict: unknown key(s) {unknown}; allowed keys are {list(_FIELDS)}")
        return cls(**{k: data[k] for k in _FIELDS if k in data})
