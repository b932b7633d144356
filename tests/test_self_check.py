"""The fast IG engines check themselves against a plain forward and fall back loudly.

The breakages here are the ones that happened or could: a key/value cache that the attention layers
ignore (TransformerLens 4.3 under transformers 5.24), and a staircase whose cells are wrong although
its build check passed. Each must give the reference engine's numbers, a warning, and a record of the
engine that actually ran.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import knlens
from breakages import cache_ignored
from knlens.methods.attribution import cells
from knlens.core.errors import EngineCheckError, EngineFallbackWarning
from knlens.run.staircase import SharedPrefix

PROMPTS = ["the capital of france is", "paris is the capital city of"]


def _attribute(model, engine, **kw):
    return knlens.attribute(model, PROMPTS, " paris", steps=6, engine=engine, **kw)


def _assert_same_scores(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=1e-4)
        assert a.clean_value == pytest.approx(b.clean_value, rel=1e-6)


def test_fast_engine_runs_unwarned_on_this_environment(tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        attrs = _attribute(tiny_llama, "fast")
    assert attrs[0].settings.engine == "fast" and attrs[0].settings.engine_note == ""
    assert attrs[0].settings.versions["transformers"] != "missing"


@pytest.mark.parametrize("engine", ["fast", "batched"])
def test_ignored_cache_falls_back_to_reference_with_a_warning(tiny_llama, monkeypatch, engine):
    want = _attribute(tiny_llama, "reference")
    monkeypatch.setattr(cells, "cache_keyword_fix", cache_ignored)
    with pytest.warns(EngineFallbackWarning, match="cache is not honoured"):
        got = _attribute(tiny_llama, engine)
    _assert_same_scores(got, want)
    assert got[0].settings.engine == "reference"
    assert got[0].settings.engine_note.startswith(f"{engine} -> reference")


def test_ignored_cache_would_have_given_wrong_numbers(tiny_llama):
    """The breakage is real: without the check, the cached clean logits are far from the plain ones."""
    q = knlens.encode(tiny_llama, PROMPTS[:1], " paris")
    with torch.no_grad(), cache_ignored(tiny_llama):
        _, kv = tiny_llama(q.tokens[:, :-1], return_type="logits_and_cache")
        cached = tiny_llama(q.tokens[:, -1:], past_key_values=kv)[:, -1]
    plain = tiny_llama(q.tokens)[:, -1]
    assert (cached - plain).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_wrong_staircase_cells_are_caught_by_the_alpha_one_check(tiny_llama, monkeypatch, dtype):
    """Also in bf16, where the check compares P(target) in log space with a looser tolerance."""
    want = _attribute(tiny_llama, "reference", dtype=dtype)
    build = cells.build_stairs

    def corrupted(*args, **kwargs):  # passes its own build check, then serves wrong prefix keys
        plan = build(*args, **kwargs)
        if plan is not None and plan.shared is not None:
            plan.shared = SharedPrefix([(k * 1.5, v) for k, v in plan.shared.prefix])
        return plan
    monkeypatch.setattr(cells, "build_stairs", corrupted)
    with pytest.warns(EngineFallbackWarning, match="α = 1"):
        got = _attribute(tiny_llama, "fast", dtype=dtype)
    _assert_same_scores(got, want)
    assert got[0].settings.engine == "reference"


def test_a_model_whose_hooks_change_its_output_is_refused(tiny_llama, monkeypatch):
    plain = cells._plain_state

    def shifted(*args, **kwargs):  # the "plain forward" no longer matches what any engine computes
        logits, acts, calls = plain(*args, **kwargs)
        return logits + torch.linspace(0, 3, logits.shape[-1]), acts, calls
    monkeypatch.setattr(cells, "_plain_state", shifted)
    with pytest.raises(EngineCheckError), warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineFallbackWarning)
        _attribute(tiny_llama, "fast")


@pytest.mark.integration
def test_ignored_cache_on_the_embedded_model_gives_reference_numbers(real_model, monkeypatch):
    kw = dict(steps=2, layers=[0, 14, 29])
    fact = knlens.Fact(["The capital of France is"], " Paris")
    want = knlens.attribute(real_model, fact, engine="reference", **kw)
    monkeypatch.setattr(cells, "cache_keyword_fix", cache_ignored)
    with pytest.warns(EngineFallbackWarning):
        got = knlens.attribute(real_model, fact, engine="fast", **kw)
    assert got[0].settings.engine == "reference"
    torch.testing.assert_close(got[0].scores, want[0].scores, atol=1e-7, rtol=1e-4)
    assert got[0].clean_value == pytest.approx(0.75, abs=0.05)  # P(Paris) of the plain forward


def test_half_precision_tolerance_is_measured_not_fixed(tiny_llama):
    """In bf16 the tolerance is the model's own batch-shape disagreement times NOISE_FACTOR, at least
    LOG_FLOOR; in float32 there is none (the fixed relative tolerance applies)."""
    from knlens.run.precision import LOG_FLOOR, NOISE_FACTOR, log_tolerance, self_disagreement

    q = knlens.encode(tiny_llama, PROMPTS[:1], " paris")
    args = (q.tokens, int(q.position[0]), int(q.target[0]), 16)
    assert log_tolerance(tiny_llama, *args) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        noise = self_disagreement(tiny_llama, *args).quantity
        assert log_tolerance(tiny_llama, *args).quantity == pytest.approx(max(LOG_FLOOR, NOISE_FACTOR * noise))
    assert noise < 0.088 / NOISE_FACTOR  # the planted corruption above (0.088 nat in bf16) stays detectable
