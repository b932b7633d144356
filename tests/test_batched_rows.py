"""Rows of equal length share one clean pass and one staircase run, with the numbers of one row at a time.

Integrated gradients groups the query rows of a call (a fact's paraphrases, its teacher-forced rows, the
prompts of several facts with ``attribute_facts``) by length and target position. A group's rows must give
what each row gives alone, the self-check against a plain forward must look at every row of a group, and a
group whose check fails must fall back loudly to the reference engine.
"""

from __future__ import annotations

import pytest
import torch

import knlens
import knlens.run.staircase as staircase
from knlens.core.errors import EngineFallbackWarning, FactError
from knlens.methods.attribution import cells
from knlens.core.tokens import row_groups
from knlens.methods.attribution.ig import attribute, attribute_facts

SAME = ["the capital of france is", "the capital of spain is", "the currency of japan is"]
OTHER = "paris is the capital city of"  # another length: a group of its own


def _close(got, want, tol=1e-5):
    assert [a.prompt for a in got] == [a.prompt for a in want]
    for a, b in zip(got, want):
        assert float((a.scores - b.scores).abs().max()) <= tol * float(b.scores.abs().max())
        torch.testing.assert_close(a.activations, b.activations, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.delta, b.delta, atol=1e-6, rtol=1e-5)
        assert a.clean_value == pytest.approx(b.clean_value, rel=1e-5)


@pytest.fixture
def stair_batches(monkeypatch):
    """The number of recorded rows (prompts) of every staircase run."""
    seen: list[int] = []
    original = staircase.Stairs.logits

    def counted(self, *args, **kwargs):
        seen.append(self.batch)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(staircase.Stairs, "logits", counted)
    return seen


def test_row_groups_by_length_and_position(tiny_llama):
    q = knlens.encode(tiny_llama, [SAME[0], OTHER, SAME[1], SAME[2]], " paris")
    assert [g.tolist() for g in row_groups(q)] == [[0, 2, 3], [1]]
    assert [g.tolist() for g in row_groups(q, 2)] == [[0, 2], [3], [1]]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_a_group_equals_its_rows_one_at_a_time(kind, stair_batches):
    model = knlens.tiny_model(kind)
    prompts = [*SAME[:2], OTHER]
    together = attribute(model, prompts, " paris", steps=5, tolerance=None)
    assert max(stair_batches) == 2  # the two prompts of one length ran as one staircase
    stair_batches.clear()
    alone = [attribute(model, [p], " paris", steps=5, tolerance=None)[0] for p in prompts]
    assert max(stair_batches) == 1
    _close(together, alone)
    _close(together, attribute(model, prompts, " paris", steps=5, tolerance=None, engine="reference"))
    assert {a.settings.engine for a in together} == {"fast"}
    assert together[0].settings == alone[0].settings


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_every_engine_runs_groups(tiny_llama, engine):
    together = attribute(tiny_llama, SAME[:2], " paris", steps=4, engine=engine, tolerance=None)
    alone = [attribute(tiny_llama, [p], " paris", steps=4, engine=engine, tolerance=None)[0] for p in SAME[:2]]
    _close(together, alone)
    assert together[0].settings.engine == engine


def test_teacher_forced_rows_of_several_prompts(tiny_llama, stair_batches):
    together = attribute(tiny_llama, SAME[:2], " paris is", steps=4, tolerance=None, batch_size=7)
    assert max(stair_batches) == 2
    alone = [attribute(tiny_llama, [p], " paris is", steps=4, tolerance=None)[0] for p in SAME[:2]]
    _close(together, alone)
    assert together[0].settings.multi_token == "teacher_forcing/mean"


def test_attribute_facts_equals_attribute_per_fact(tiny_llama, stair_batches):
    facts = [knlens.Fact([SAME[0], OTHER], " paris"), knlens.Fact([SAME[1]], " madrid"),
             knlens.Fact([SAME[2]], " yen is")]
    many = attribute_facts(tiny_llama, facts, steps=2)  # adaptive: steps=2 is refined on more nodes
    assert max(stair_batches) >= 2
    for fact, got in zip(facts, many):
        want = attribute(tiny_llama, fact, steps=2)
        _close(got, want)
        assert [a.settings for a in got] == [a.settings for a in want]  # refinement passes and engine too
    assert "gauss-legendre" in many[0][0].settings.refinement
    assert attribute_facts(tiny_llama, []) == []
    with pytest.raises((FactError, TypeError)):  # TypeError: the run-time type checker of the test suite
        attribute_facts(tiny_llama, [SAME[0]])


def _corrupt_row(plan, row):
    """A staircase whose shared prefix is wrong for one row of its group (its build check still passes)."""
    keys = []
    for k, v in plan.shared.prefix:
        k = k.clone()
        k[row] *= 1.5
        keys.append((k, v))
    plan.shared = staircase.SharedPrefix(keys)
    return plan


def test_one_wrong_row_of_a_group_is_caught_and_the_group_falls_back(tiny_llama, monkeypatch):
    want = attribute(tiny_llama, SAME[:2], " paris", steps=4, engine="reference", tolerance=None)
    build = cells.build_stairs
    monkeypatch.setattr(cells, "build_stairs", lambda *a, **kw: _corrupt_row(build(*a, **kw), 1))
    with pytest.warns(EngineFallbackWarning, match=r"α = 1 .*row 1 of a group of 2"):
        got = attribute(tiny_llama, SAME[:2], " paris", steps=4, tolerance=None)
    _close(got, want)
    assert got[0].settings.engine == "reference"
    assert got[0].settings.engine_note.startswith("fast -> reference")


def test_a_cache_wrong_for_one_row_is_caught(tiny_llama, monkeypatch):
    want = attribute(tiny_llama, SAME[:2], " paris", steps=4, engine="reference", tolerance=None)
    forward = cells.forward_with_cache

    def wrong_second_row(*args, **kwargs):
        logits, kv = forward(*args, **kwargs)
        if kv.layers[0].keys.shape[0] > 1:
            for layer in kv.layers:
                layer.keys[1] *= 1.5
        return logits, kv
    monkeypatch.setattr(cells, "forward_with_cache", wrong_second_row)
    with pytest.warns(EngineFallbackWarning, match="cache is not honoured"):
        got = attribute(tiny_llama, SAME[:2], " paris", steps=4, tolerance=None)
    _close(got, want)
    assert got[0].settings.engine == "reference"


def test_locate_facts_equals_locate_per_fact(tiny_llama):
    facts = [knlens.Fact([SAME[0], OTHER, "the capital city of france is"], " paris", relation="capital", name="fr"),
             knlens.Fact([SAME[1], "paris is the capital of", "the capital city of spain is"], " madrid",
                         relation="capital", name="es")]
    kw = dict(steps=2, n_random=3, progress=False)
    joint = list(knlens.locate_facts(tiny_llama, facts, **kw))
    for fact, got in zip(facts, joint):
        want = knlens.locate(tiny_llama, fact, **kw)
        assert got.key == want.key and got.settings == want.settings
        assert got.neurons == want.neurons and got.tested == want.tested
        assert list(got.timings) == list(want.timings)
        _close(list(got.attributions), list(want.attributions))
        torch.testing.assert_close(torch.tensor(got.interventions.frame.p_after.to_numpy()),
                                   torch.tensor(want.interventions.frame.p_after.to_numpy()), rtol=1e-4, atol=1e-8)
    with pytest.raises(FactError):
        next(knlens.locate_facts(tiny_llama, facts, attributions=[]))
