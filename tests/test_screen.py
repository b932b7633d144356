"""Screened integrated gradients (knlens.methods.attribution.screen) on tiny models: the screen picks layers,
the exact pass on them equals an unscreened call, the guarantee is checked against exact scores, and a
check that fails falls back to every layer, loudly."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import knlens
from knlens.core.errors import ScreenFallbackWarning, SettingsError
from knlens.methods.attribution import screen as screen_module
from knlens.methods.attribution.result import Screen
from knlens.methods.attribution.screen import check_screen, get_screen, grad_x_activation, pick_layers

PROMPTS = ["the capital of france is", "the capital city of france is", "france capital city is"]


@pytest.fixture(scope="module")
def deep():
    """A tiny Llama with 6 layers, so that a screen has layers to leave out."""
    return knlens.tiny_model("llama", n_layers=6, seed=1)


def test_pick_layers_keeps_what_can_reach_the_level_and_verifies_the_nearest_skipped():
    s = torch.tensor([[1.0, -0.1], [0.02, 0.0], [0.0, -0.06], [0.01, 0.01]])
    # level = 0.2 × 1.0; a layer stays when its largest |score| reaches level / 4 = 0.05 (a negative one too)
    assert pick_layers([s], [0, 1, 2, 3], Screen(top_k=0, safety=4.0)) == ([0, 2], [1])
    assert pick_layers([s], [0, 1, 2, 3], Screen(top_k=0, safety=1.0)) == ([0], [2])
    # another prompt keeps what it needs: the union is integrated
    other = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.0]])
    assert pick_layers([s, other], [0, 1, 2, 3], Screen(top_k=0, safety=1.0)) == ([0, 3], [2])
    # top_k lowers the level to the k-th score: here the 3rd is 0.02, so layers down to 0.005 stay
    assert pick_layers([s], [0, 1, 2, 3], Screen(top_k=3, safety=4.0)) == ([0, 1, 2, 3], [])
    # no positive score: nothing to cut at, every layer stays
    assert pick_layers([-s.abs()], [0, 1, 2, 3], Screen()) == ([0, 1, 2, 3], [])


def test_grad_x_activation_is_integrated_gradients_on_one_node_at_one(tiny):
    prompts = ["the capital of france is", "the capital city of"]
    targets = (" paris",) if knlens.core.models.is_masked_lm(tiny) else (" paris", " paris is")  # + teacher forcing
    for target in targets:
        gx = grad_x_activation(tiny, prompts, target, [0, 1])
        ig = knlens.attribute(tiny, prompts, target, steps=1, grid="right", tolerance=None)
        for g, a in zip(gx, ig):
            torch.testing.assert_close(g, a.scores, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["gradxact", "gauss2"])
def test_screened_equals_exact_on_the_layers_it_integrates(deep, method):
    scr = Screen(method=method, top_k=0, safety=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenFallbackWarning)
        attrs = knlens.attribute(deep, PROMPTS, " paris", steps=6, grid="gauss-legendre", tolerance=None, screen=scr)
    full = knlens.attribute(deep, PROMPTS, " paris", steps=6, grid="gauss-legendre", tolerance=None)
    for a, f in zip(attrs, full):
        c = a.screen
        assert a.settings.screen == scr and c.method == method
        assert sorted([*c.kept, *c.verified, *c.skipped]) == list(range(6))
        if c.fell_back:
            assert a.layers == tuple(range(6)) and "screen" in a.settings.engine_note
        else:
            assert c.passed and c.bound < c.level and a.layers == tuple(sorted([*c.kept, *c.verified]))
        rows = list(a.layers)
        torch.testing.assert_close(a.scores, f.scores[rows], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(a.delta, f.delta[rows], rtol=1e-4, atol=1e-8)


def test_a_screen_that_leaves_layers_out_keeps_the_exact_coarse_neurons(deep, monkeypatch):
    """When the check passes, the coarse neurons and the top k over the exact layers are those of all layers."""
    scr = Screen(method="gauss2", threshold=0.5, top_k=3, safety=1.0)
    full = knlens.attribute(deep, PROMPTS, " paris", steps=6, grid="gauss-legendre", tolerance=None)
    monkeypatch.setattr(screen_module, "_first_pass", lambda *a, **kw: [f.scores for f in full])  # a perfect screen
    attrs = knlens.attribute(deep, PROMPTS, " paris", steps=6, grid="gauss-legendre", tolerance=None, screen=scr)
    c = attrs[0].screen
    assert c.skipped and c.passed and not c.fell_back and c.ratio == pytest.approx(1.0, rel=1e-4)
    for a, f in zip(attrs, full):
        assert len(a.layers) < 6
        assert knlens.coarse(a, 0.5) == knlens.coarse(f, 0.5) and a.top(3) == f.top(3)


def test_a_loose_bound_falls_back_to_every_layer_loudly(deep, monkeypatch):
    """A screen that underestimates every layer but the top one 100-fold: the verified layer measures it,
    the bound exceeds the level, and every layer is integrated exactly."""
    full = knlens.attribute(deep, PROMPTS, " paris", steps=6, grid="gauss-legendre", tolerance=None)
    top = int(torch.stack([f.scores.abs().amax(-1) for f in full]).amax(0).argmax())

    def blind(model, prompts, target, screen, layers, run, **kw):
        return [torch.where(torch.arange(len(layers))[:, None] == top, f.scores, f.scores * 1e-2) for f in full]
    monkeypatch.setattr(screen_module, "_first_pass", blind)
    with pytest.warns(ScreenFallbackWarning, match="screen gauss2 -> all layers"):
        attrs = knlens.attribute(deep, PROMPTS, " paris", steps=6, grid="gauss-legendre", tolerance=None,
                                 screen=Screen(top_k=0, safety=1.0))
    for a, f in zip(attrs, full):
        assert a.screen.fell_back and a.screen.ratio > 50 and a.layers == tuple(range(6))
        assert "screen gauss2 -> all layers" in a.settings.engine_note
        torch.testing.assert_close(a.scores, f.scores, rtol=0, atol=0)


def test_check_screen_fails_without_positive_exact_evidence(deep):
    exact = knlens.attribute(deep, PROMPTS[:1], " paris", layers=[0], steps=2, tolerance=None)
    negative = dataclasses.replace(exact[0], scores=-exact[0].scores.abs())
    screens = [torch.ones(6, deep.cfg.d_mlp) * 1e-9]
    c = check_screen(screens, [negative], list(range(6)), [0], [], Screen())[0]
    assert not c.passed and c.skipped == (1, 2, 3, 4, 5)


def test_screen_with_a_tensor_baseline_slices_it_to_the_layers(deep):
    base = torch.randn(6, deep.cfg.d_mlp) * 0.01
    attrs = knlens.attribute(deep, PROMPTS[:1], " paris", steps=4, tolerance=None, baseline=base,
                             screen=Screen(top_k=0, safety=1.0))
    full = knlens.attribute(deep, PROMPTS[:1], " paris", steps=4, tolerance=None, baseline=base)
    rows = list(attrs[0].layers)
    torch.testing.assert_close(attrs[0].scores, full[0].scores[rows], rtol=1e-4, atol=1e-8)


def test_bad_screens_are_refused(tiny_llama):
    with pytest.raises(SettingsError, match="unknown screen 'gauss9'"):
        knlens.attribute(tiny_llama, PROMPTS[:1], " paris", screen="gauss9")
    with pytest.raises(SettingsError, match="safety >= 1"):
        get_screen(Screen(safety=0.5))


def test_locate_records_the_screen(deep):
    fact = knlens.Fact(PROMPTS, " paris")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenFallbackWarning)
        r = knlens.locate(deep, fact, steps=4, n_random=1, progress=False, specificity=False, held_out=False,
                          screen="gradxact")
    assert r.settings.screen == Screen(method="gradxact", threshold=0.2)
    assert all(a.screen is not None for a in r.attributions)
