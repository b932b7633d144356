"""Keep the facts a model actually knows: its greedy prediction equals the gold target.

A multi-token target counts as known for a prompt when every gold token is the argmax under
teacher forcing. For a left-to-right model the teacher-forced rows of a prompt are prefixes of its longest
one, so one forward of that row gives every token's prediction (the logits at a position depend only on the
tokens up to it); the rows of many facts run together, sorted by length to keep padding small.

>>> from knlens import load_model, Fact
>>> model = load_model("tiny-gpt2")
>>> answers(model, Fact(["the capital of france is"], " paris")).shape
torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from knlens.core.errors import SettingsError
from knlens.core.facts import Fact
from knlens.core.tokens import encode, stack
from knlens.run.engine import chunks, forward

__all__ = ["answers", "answers_many", "known_facts"]


@torch.no_grad()
def answers_many(model: Any, facts: Sequence[Fact], *, batch_size: int = 64) -> list[Bool[Tensor, "prompt"]]:
    """For each prompt of each of ``facts``: does the model's greedy continuation equal the target? One
    boolean per prompt, one tensor per fact; the rows of all facts run in batches of ``batch_size``.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-llama")
    >>> facts = [Fact(["the capital of france is", "paris is in"], " paris is"), Fact(["the yen is"], " japan")]
    >>> [a.shape for a in answers_many(model, facts)]
    [torch.Size([2]), torch.Size([1])]
    """
    if not facts:
        return []
    q = stack([encode(model, list(f.prompts), f.target) for f in facts]).to("cpu")
    # one row runs per prompt: its last teacher-forced row, which the prompt's other rows precede
    last = torch.ones(len(q), dtype=torch.bool)
    last[:-1] = q.prompt_index[1:] != q.prompt_index[:-1]
    runs = last.nonzero()[:, 0]
    run_of = torch.searchsorted(runs, torch.arange(len(q)))
    read_at = q.position[runs][run_of] - (q.token_index[runs][run_of] - q.token_index)
    lengths = q.attention_mask[runs].sum(1)
    order = torch.argsort(lengths, stable=True)  # similar lengths together: little padding
    device = getattr(model.cfg, "device", None) or "cpu"
    hit = torch.empty(len(q), dtype=torch.bool)
    for s in chunks(len(runs), batch_size):
        picked, width = order[s], int(lengths[order[s]].max())
        slot = torch.full((len(runs),), -1)
        slot[picked] = torch.arange(len(picked))
        logits = forward(model, q.tokens[runs[picked], :width].to(device),
                         attention_mask=q.attention_mask[runs[picked], :width].to(device))
        rows = (slot[run_of] >= 0).nonzero()[:, 0]
        at = (slot[run_of[rows]].to(logits.device), read_at[rows].to(logits.device))
        hit[rows] = logits[at].argmax(-1).cpu() == q.target[rows]
    missed = torch.zeros(len(q.prompts), dtype=torch.long).index_add_(0, q.prompt_index, (~hit).long())
    return list((missed == 0).split([len(f.prompts) for f in facts]))


def answers(model: Any, fact: Fact, *, batch_size: int = 64) -> Bool[Tensor, "prompt"]:
    """For each prompt of ``fact``: does the model's greedy continuation equal the target?"""
    return answers_many(model, [fact], batch_size=batch_size)[0]


def known_facts(model: Any, facts: Sequence[Fact], *, min_prompts: int = 1, keep_prompts: str = "all",
                batch_size: int = 64) -> list[Fact]:
    """The facts the model answers correctly (:func:`answers_many`, ``batch_size`` rows a forward).

    ``keep_prompts="all"`` keeps a fact only if every prompt is answered; ``"correct"`` keeps the
    answered prompts of each fact, dropping facts with fewer than ``min_prompts`` of them.
    """
    if keep_prompts not in ("all", "correct"):
        raise SettingsError(f"keep_prompts must be 'all' or 'correct', got {keep_prompts!r}")
    kept = []
    for fact, ok in zip(facts, answers_many(model, facts, batch_size=batch_size)):
        if keep_prompts == "all":
            if bool(ok.all()) and len(fact.prompts) >= min_prompts:
                kept.append(fact)
        elif int(ok.sum()) >= max(1, min_prompts):
            kept.append(replace(fact, prompts=tuple(p for p, o in zip(fact.prompts, ok) if o)))
    return kept
