"""Answers to two-hop questions, with and without a chain of thought, under hooks (Wang et al., EMNLP 2024).

* :func:`answer` — P(target | prompt) (the product of the teacher-forced token probabilities) and whether every
  gold token is the greedy choice, with ``hooks`` attached over the whole prompt.
* :func:`cot_answer` — the scaffolded chain of thought: the model completes the first hop's prompt greedily (the
  bridge, cut at the first clause end), then answers ``"{hop-1 prompt} {bridge}. {hop-2 prompt about the
  bridge}"``; ``hooks`` are active at every generated step and over the answer
  (:func:`knlens.methods.generation_hooks.generate`).
* :func:`conflict_prompt` — the two-hop question after a sentence asserting a false first hop.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> a = answer(model, "the capital of france is", " paris")
>>> 0.0 < a.p < 1.0, isinstance(a.correct, bool)
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knlens.core.tokens import encode
from knlens.data.two_hop import TwoHop
from knlens.methods.generation_hooks import generate
from knlens.run.engine import target_logits
from knlens.run.hooks import Hook

__all__ = ["Answer", "CotAnswer", "answer", "cot_answer", "first_clause", "conflict_prompt"]


@dataclass(frozen=True)
class Answer:
    """P(target | prompt) and whether the greedy continuation is the target (every token)."""

    p: float
    correct: bool


@dataclass(frozen=True)
class CotAnswer:
    """A chain of thought: the bridge the model stated, whether it is the gold one, the prompt it then answered,
    and the answer."""

    bridge: str
    bridge_correct: bool
    prompt: str
    answer: Answer


@torch.no_grad()
def answer(model: Any, prompt: str, target: str, hooks: Sequence[Hook] = ()) -> Answer:
    """P(``target``) after ``prompt`` and whether each of its tokens is the argmax, ``hooks`` attached."""
    q = encode(model, [prompt], target)
    logits = target_logits(model, q, list(hooks)).float()
    target = q.target.to(logits.device)
    p = logits.softmax(-1).gather(1, target[:, None]).prod()
    return Answer(float(p), bool((logits.argmax(-1) == target).all()))


def first_clause(text: str) -> str:
    """The generated text up to its first clause end (``. , ; \\n``), stripped.

    >>> first_clause(" Germany. It is"), first_clause(" New York, USA"), first_clause(" Paris")
    ('Germany', 'New York', 'Paris')
    """
    head = text.strip()
    cut = min([i for i in (head.find(c) for c in ".,;\n") if i > 0], default=len(head))
    return head[:cut].strip()


def cot_answer(model: Any, question: TwoHop, hooks: Sequence[Hook] = (), *, bridge_tokens: int = 6) -> CotAnswer:
    """The scaffolded chain of thought of ``question`` with ``hooks`` active at every generated step and over the
    final answer (see the module docstring); an empty generation states the bridge as ``"?"``."""
    gen = generate(model, question.hop1.prompts[0], bridge_tokens, hooks=hooks)
    bridge = first_clause(gen.text) or "?"
    prompt = question.cot_prompt(bridge)
    return CotAnswer(bridge, bridge == question.bridge.strip(), prompt, answer(model, prompt, question.answer, hooks))


def conflict_prompt(question: TwoHop, false_bridge: str) -> tuple[str, str]:
    """The question after a sentence asserting ``false_bridge`` as the first hop, and that sentence (the prefix).

    >>> from knlens.core.facts import Fact
    >>> q = TwoHop("q", ("P19", "P1376"), "Ann", " Rome", " Italy", "The city where Ann was born is the capital of",
    ...            Fact(["Ann was born in"], " Rome", subject="Ann"), Fact(["Rome is the capital of"], " Italy"))
    >>> conflict_prompt(q, " Paris")[0]
    'Ann was born in Paris. The city where Ann was born is the capital of'
    """
    prefix = f"{question.hop1.prompts[0]} {false_bridge.strip()}."
    return f"{prefix} {question.question}", prefix
