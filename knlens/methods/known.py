"""Keep the facts a model actually knows: its greedy prediction equals the gold target.

A multi-token target counts as known for a prompt when every gold token is the argmax under
teacher forcing.

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

from knlens.run.engine import chunks, target_logits
from knlens.core.errors import SettingsError
from knlens.core.facts import Fact
from knlens.core.tokens import encode

__all__ = ["answers", "known_facts"]


@torch.no_grad()
def answers(model: Any, fact: Fact, *, batch_size: int = 64) -> Bool[Tensor, "prompt"]:
    """For each prompt of ``fact``: does the model's greedy continuation equal the target?"""
    q = encode(model, list(fact.prompts), fact.target)
    hit = torch.empty(len(q), dtype=torch.bool)
    for s in chunks(len(q), batch_size):
        sub = q.select(torch.arange(len(q))[s])
        hit[s] = (target_logits(model, sub).argmax(-1) == sub.target).cpu()
    out = torch.ones(len(fact.prompts), dtype=torch.bool)
    for i in range(len(fact.prompts)):
        out[i] = hit[(q.prompt_index == i).cpu()].all()
    return out


def known_facts(model: Any, facts: Sequence[Fact], *, min_prompts: int = 1, keep_prompts: str = "all",
                ) -> list[Fact]:
    """The facts the model answers correctly.

    ``keep_prompts="all"`` keeps a fact only if every prompt is answered; ``"correct"`` keeps the
    answered prompts of each fact, dropping facts with fewer than ``min_prompts`` of them.
    """
    if keep_prompts not in ("all", "correct"):
        raise SettingsError(f"keep_prompts must be 'all' or 'correct', got {keep_prompts!r}")
    kept = []
    for fact in facts:
        ok = answers(model, fact)
        if keep_prompts == "all":
            if bool(ok.all()) and len(fact.prompts) >= min_prompts:
                kept.append(fact)
        elif int(ok.sum()) >= max(1, min_prompts):
            kept.append(replace(fact, prompts=tuple(p for p, o in zip(fact.prompts, ok) if o)))
    return kept
