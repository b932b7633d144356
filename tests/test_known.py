"""The known-fact filter: one forward per prompt for all its teacher-forced tokens, many facts per batch, and
the answers of one plain forward per (prompt, target token) row."""

from __future__ import annotations

import pytest
import torch

import knlens
from knlens.methods.known import answers, answers_many, known_facts
from knlens.run.engine import target_logits

# the tiny llama's greedy continuations (random weights): "the capital of france is" → " madrid italian",
# "paris is the capital city of" → " cats river"
CAPITAL, CITY = "the capital of france is", "paris is the capital city of"


def _row_by_row(model, fact):
    """Every teacher-forced row alone: the definition."""
    q = knlens.encode(model, list(fact.prompts), fact.target)
    hit = torch.stack([target_logits(model, q.row(i)).argmax(-1)[0] == q.target[i] for i in range(len(q))])
    return torch.stack([hit[q.prompt_index == i].all() for i in range(len(fact.prompts))])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_answers_equal_one_row_at_a_time(kind):
    model = knlens.tiny_model(kind)
    targets = [" madrid italian", " madrid", " madrid cats", " cats river", " cats", " as", " of of", " city"]
    facts = [knlens.Fact([CAPITAL, CITY, "the currency of japan is"], t) for t in targets]
    if kind == "bert":
        facts = [f for f in facts if len(f.target.split()) == 1]
    for batch_size in (2, 64):
        got = answers_many(model, facts, batch_size=batch_size)
        assert [g.tolist() for g in got] == [_row_by_row(model, f).tolist() for f in facts]
    assert any(bool(g.any()) for g in got)  # the test sees both answers


def test_multi_token_target_needs_every_token(tiny_llama):
    fact = knlens.Fact([CAPITAL, CITY], " madrid italian")
    assert answers(tiny_llama, fact).tolist() == [True, False]
    assert answers(tiny_llama, knlens.Fact([CAPITAL], " madrid cats")).tolist() == [False]
    facts = [fact, knlens.Fact([CITY, CAPITAL], " cats river"), knlens.Fact([CAPITAL], " rome")]
    assert known_facts(tiny_llama, facts) == []
    kept = known_facts(tiny_llama, facts, keep_prompts="correct", batch_size=1)
    assert [f.prompts for f in kept] == [(CAPITAL,), (CITY,)]
    assert answers_many(tiny_llama, []) == []
