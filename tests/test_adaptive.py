"""Adaptive integration (knlens.methods.attribution.adaptive) on tiny models: refine until the completeness error is
within the tolerance, record what ran, warn when the budget is spent."""

from __future__ import annotations

import warnings

import pytest
import torch

import knlens
from knlens.methods.attribution.adaptive import describe, refinements
from knlens.core.errors import CompletenessWarning, KnlensError, SettingsError

PROMPTS = ["the capital of france is", "the capital city of france is", "france capital city is"]


def test_prompts_above_the_tolerance_are_refined_and_say_how(tiny_llama):
    fixed = knlens.attribute(tiny_llama, PROMPTS, " paris", steps=2, tolerance=None)
    assert all(a.relative_completeness_error > 0.05 for a in fixed)  # the premise: 2 right steps are too few
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        attrs = knlens.attribute(tiny_llama, PROMPTS, " paris", steps=2, tolerance=0.05)
    for a, f in zip(attrs, fixed):
        s = a.settings
        assert a.relative_completeness_error <= 0.05
        assert s.grid == "gauss-legendre" and s.tolerance == 0.05 and s.max_steps == 128
        assert s.refinement.startswith(f"right 2: {f.relative_completeness_error:.3g} -> gauss-legendre 2: ")
        assert s.refinement.endswith(f"gauss-legendre {s.steps}: {a.relative_completeness_error:.3g}")
        # the pass kept is exactly what a fixed call on its grid gives
        same = knlens.attribute(tiny_llama, [a.prompt], " paris", steps=s.steps, grid=s.grid, tolerance=None)[0]
        torch.testing.assert_close(a.scores, same.scores, rtol=0, atol=0)
    assert describe(attrs).startswith("right 2, refined on Gauss-Legendre nodes (up to 128) where the relative "
                                      "completeness error > 0.05: ended on gauss-legendre ")


def test_prompts_within_the_tolerance_are_not_recomputed(tiny_llama, monkeypatch):
    calls = []
    real = knlens.methods.attribution.ig._fixed_grid

    def counting(*args, **kwargs):  # every fixed-grid pass, the first and any refinement
        calls.append(kwargs.get("grid"))
        return real(*args, **kwargs)
    monkeypatch.setattr(knlens.methods.attribution.ig, "_fixed_grid", counting)
    attrs = knlens.attribute(tiny_llama, PROMPTS, " paris", steps=16, grid="gauss-legendre", tolerance=0.05)
    assert calls == ["gauss-legendre"]  # the first pass only
    assert all(a.settings.steps == 16 and "->" not in a.settings.refinement for a in attrs)


def test_fixed_grid_when_tolerance_is_none(tiny_gpt2):
    a = knlens.attribute(tiny_gpt2, PROMPTS[:1], " paris", steps=3, grid="left", tolerance=None)[0]
    assert (a.settings.grid, a.settings.steps, a.settings.tolerance, a.settings.refinement) == ("left", 3, None, "")
    assert describe([a]) == "fixed grid: left 3 (1 prompt)"


def test_budget_exhausted_warns_and_keeps_the_best_pass(tiny_bert):
    with pytest.warns(CompletenessWarning, match=r"'the capital of france is' -> ' paris'.*max_steps=4"):
        a = knlens.attribute(tiny_bert, PROMPTS[:1], " paris", steps=1, tolerance=1e-9, max_steps=4)[0]
    passes = a.settings.refinement.split(" -> ")
    assert [p.split(":")[0] for p in passes] == ["right 1", "gauss-legendre 1", "gauss-legendre 2", "gauss-legendre 4"]
    errors = [float(p.split(": ")[1]) for p in passes]
    assert f"{a.relative_completeness_error:.3g}" == f"{min(errors):.3g}"
    assert "1 prompt still above the tolerance" in describe([a])


def test_settings_survive_save_and_load(tiny_llama, tmp_path):
    a = knlens.attribute(tiny_llama, PROMPTS[:1], " paris", steps=2)[0]
    a.save(tmp_path / "attr")
    assert knlens.Attribution.load(tmp_path / "attr").settings == a.settings


@pytest.mark.parametrize("kwargs, message", [
    ({"tolerance": 0.0}, "tolerance must be a positive number"),
    ({"tolerance": -0.1}, "tolerance must be a positive number"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
])
def test_bad_budget_is_a_settings_error(tiny_llama, kwargs, message):
    with pytest.raises(SettingsError, match=message) as info:
        knlens.attribute(tiny_llama, PROMPTS[:1], " paris", **kwargs)
    assert isinstance(info.value, KnlensError) and isinstance(info.value, ValueError)


def test_refinement_schedule():
    assert refinements("right", 20, 128) == [20, 40, 80, 128]
    assert refinements("left", 200, 128) == [128]
    assert refinements("gauss-legendre", 16, 128) == [32, 64, 128]
    assert refinements("gauss-legendre", 128, 128) == []
    assert refinements("gauss-legendre", 200, 128) == []
