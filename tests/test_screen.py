"""Screened integrated gradients (knlens.methods.attribution.screen) on tiny models: the screen picks layers,
the exact pass on them equals an unscreened call, the guarantee is checked against exact scores, and a
check that fails falls back to every layer, loudly."""

from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch

import knlens
from knlens.core.errors import ScreenFallbackWarning, SettingsError
from knlens.core.tokens import encode
from knlens.methods.attribution import screen as screen_module
from knlens.methods.attribution.result import Screen
from knlens.methods.attribution.screen import check_screen, first_pass, get_screen, pick_layers
from knlens.methods.selection import best_by_mean
from knlens.run.engine import read_quantity, target_logits
from knlens.run.hooks import position_mask

PROMPTS = ["the capital of france is", "the capital city of france is", "france capital city is"]
EXACT = dict(steps=6, grid="gauss-legendre", tolerance=None)


@pytest.fixture(scope="module")
def deep():
    """A tiny Llama with 6 layers, so that a screen has layers to leave out."""
    return knlens.tiny_model("llama", n_layers=6, seed=1)


@pytest.fixture(scope="module")
def full(deep):
    return knlens.attribute(deep, PROMPTS, " paris", **EXACT)


def _like(template, scores, delta=None):
    """An attribution with these scores (and layer effects: their sums unless given), for the pure functions."""
    delta = scores.sum(-1) if delta is None else delta
    return dataclasses.replace(template, scores=scores, delta=delta, activations=torch.ones_like(scores),
                               completeness_error=(scores.sum(-1) - delta).abs(), layers=tuple(range(len(scores))))


def test_pick_layers_bounds_each_layer_by_its_peak_and_its_unexplained_effect(full):
    s = torch.tensor([[1.0, -0.1], [0.02, 0.0], [0.0, -0.06], [0.01, 0.01]])
    delta = s.sum(-1) + torch.tensor([0.0, 0.0, 0.0, 0.28])  # layer 3's screened scores miss 0.28 of its effect
    one = [_like(full[0], s, delta)]
    # a layer stays when a neuron's score + (safety - 1) × the layer's peak + |unexplained| reaches 0.2 × the top
    # screened score; a negative score bounds its neuron below the cut, the peak of a negative one counts
    assert pick_layers(one, [0, 1, 2, 3], Screen(min_count=1, top_k=0, safety=1.0)) == ([0, 3], [1])
    assert pick_layers(one, [0, 1, 2, 3], Screen(min_count=1, top_k=0, safety=4.0)) == ([0, 3], [2])
    assert pick_layers(one, [0, 1, 2, 3], Screen(min_count=1, top_k=0, safety=5.0)) == ([0, 2, 3], [1])
    # a second pick keeps the layers asked for and uses the error given
    assert pick_layers(one, [0, 1, 2, 3], Screen(min_count=1, top_k=0), error=0.0, keep=[2]) == ([0, 2, 3], [1])
    # with min_count 2, a layer that may be coarse in one prompt only is left out
    other = _like(full[0], torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert pick_layers([*one, other], [0, 1, 2, 3], Screen(min_count=2, top_k=0, safety=1.0)) == ([0], [3])
    # top_k by mean: the 3rd-best mean is 0.01 here; layer 2's neurons are bounded by 0, the others may reach it
    assert pick_layers(one, [0, 1, 2, 3], Screen(min_count=5, top_k=3, safety=1.0)) == ([0, 1, 3], [2])
    # no positive score: nothing to cut at, every layer stays
    assert pick_layers([_like(full[0], -s.abs())], [0, 1, 2, 3], Screen()) == ([0, 1, 2, 3], [])


def _grad_times_activation(model, prompt, target):
    """(a − 0) · ∂P/∂a at the clean point for every layer, by autograd on one plain forward (independent of
    the IG engine)."""
    q = encode(model, [prompt], target)
    probes, clean = {}, {}

    def probe(name):
        def hook(act, hook=None):
            at = position_mask(act, q.position)
            clean[name] = act.detach()[at][0]
            probes[name] = torch.zeros(act.shape[-1], requires_grad=True)
            return torch.where(at[:, :, None], act + probes[name], act)
        return hook
    names = [f"blocks.{l}.mlp.hook_post" for l in range(model.cfg.n_layers)]
    with torch.enable_grad():
        f = read_quantity(target_logits(model, q, [(n, probe(n)) for n in names]), q.target, "prob")
        grads = torch.autograd.grad(f.sum(), [probes[n] for n in names])
    return torch.stack([clean[n] * g for n, g in zip(names, grads)])


def test_the_gradxact_screen_is_gradient_times_activation(tiny):
    prompt = "the capital of france is" if not knlens.core.models.is_masked_lm(tiny) else "the capital of [MASK]"
    run = lambda items, layers, **kw: [knlens.attribute(tiny, [prompt], " paris", layers=layers, **kw)]  # noqa: E731
    screen = first_pass(Screen(method="gradxact"), [0, 1], run, [0])[0][0]
    torch.testing.assert_close(screen.scores, _grad_times_activation(tiny, prompt, " paris"), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["gradxact", "gauss2"])
def test_screened_equals_exact_on_the_layers_it_integrates(deep, full, method):
    scr = Screen(method=method, min_count=1, top_k=0, safety=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenFallbackWarning)
        attrs = knlens.attribute(deep, PROMPTS, " paris", screen=scr, **EXACT)
    for a, f in zip(attrs, full):
        c = a.screen
        assert a.settings.screen == scr and c.method == method
        assert sorted([*c.kept, *c.verified, *c.skipped]) == list(range(6))
        assert a.layers == (tuple(range(6)) if c.fell_back else tuple(sorted([*c.kept, *c.verified])))
        assert c.passed != c.fell_back and (c.why != "") == c.fell_back
        rows = list(a.layers)
        torch.testing.assert_close(a.scores, f.scores[rows], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(a.delta, f.delta[rows], rtol=1e-4, atol=1e-8)


def test_a_passing_check_keeps_the_coarse_neurons_and_top_of_every_layer(deep, full, monkeypatch):
    scr = Screen(threshold=0.5, min_count=1, top_k=3, safety=1.0)
    monkeypatch.setattr(screen_module, "first_pass", lambda *a: [list(full)])  # a perfect screen
    attrs = knlens.attribute(deep, PROMPTS, " paris", screen=scr, **EXACT)
    c = attrs[0].screen
    assert c.skipped and c.passed and not c.fell_back and c.beta < 1e-3
    assert 0 < c.skipped_mass < 1 and all(a.screen.bound < 0.5 * a.screen.top for a in attrs)
    for a, f in zip(attrs, full):
        assert knlens.coarse(a, 0.5) == knlens.coarse(f, 0.5)
    assert best_by_mean(attrs, 3) == best_by_mean(full, 3)


def test_an_unexplained_effect_keeps_a_layer_whose_screened_scores_are_small(deep, full, monkeypatch):
    """A screen that misses a layer's effect (as Gauss-2 misses SmolLM2's layer 0) keeps it by its residual."""
    top = int(torch.stack([f.scores.abs().amax(-1) for f in full]).amax(0).argmax())
    blind = [dataclasses.replace(f, scores=torch.where(torch.arange(6)[:, None] == top, f.scores * 1e-3, f.scores))
             for f in full]  # its delta is still the layer's true effect
    kept, _ = pick_layers(blind, list(range(6)), Screen(threshold=0.5, min_count=1, top_k=0, safety=1.0))
    assert top in kept


def test_a_loose_bound_falls_back_to_every_layer_loudly(deep, full, monkeypatch):
    """A screen that underestimates every layer but the top one 100-fold, its layer effects scaled alike so
    that nothing looks unexplained: the verified layer measures the error, and every layer is integrated."""
    top = int(torch.stack([f.scores.abs().amax(-1) for f in full]).amax(0).argmax())
    low = (torch.arange(6) != top).float() * 0.99
    blind = [dataclasses.replace(f, scores=f.scores * (1 - low[:, None]), delta=f.delta * (1 - low)) for f in full]
    monkeypatch.setattr(screen_module, "first_pass", lambda *a: [blind])
    with pytest.warns(ScreenFallbackWarning, match="screen gauss2 -> all layers: layer"):
        attrs = knlens.attribute(deep, PROMPTS, " paris", screen=Screen(min_count=1, top_k=0, safety=1.0), **EXACT)
    for a, f in zip(attrs, full):
        assert a.screen.fell_back and not a.screen.passed and a.screen.beta > 50 and a.layers == tuple(range(6))
        assert "screen gauss2 -> all layers" in a.settings.engine_note
        torch.testing.assert_close(a.scores, f.scores, rtol=0, atol=0)


def test_check_screen_fails_without_positive_exact_evidence(full):
    f = full[0]
    negative = [dataclasses.replace(f, scores=-f.scores.abs()[:1], activations=f.activations[:1], delta=f.delta[:1],
                                    completeness_error=f.completeness_error[:1], layers=(0,))]
    c = check_screen(full[:1], negative, list(range(6)), [0], [], Screen())[0]
    assert not c.passed and c.skipped == (1, 2, 3, 4, 5) and "no positive exact score" in c.why


def test_screen_with_a_tensor_baseline_slices_it_to_the_layers(deep):
    base = torch.randn(6, deep.cfg.d_mlp) * 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenFallbackWarning)
        attrs = knlens.attribute(deep, PROMPTS[:1], " paris", baseline=base, **EXACT,
                                 screen=Screen(min_count=1, top_k=0, safety=1.0))
    full = knlens.attribute(deep, PROMPTS[:1], " paris", baseline=base, **EXACT)
    torch.testing.assert_close(attrs[0].scores, full[0].scores[list(attrs[0].layers)], rtol=1e-4, atol=1e-8)


def test_bad_screens_are_refused(tiny_llama):
    with pytest.raises(SettingsError, match="unknown screen 'gauss9'"):
        knlens.attribute(tiny_llama, PROMPTS[:1], " paris", screen="gauss9")
    with pytest.raises(SettingsError, match="safety >= 1"):
        get_screen(Screen(safety=0.5))


def test_locate_asks_the_screen_for_the_guarantee_of_its_preset(deep):
    fact = knlens.Fact(PROMPTS, " paris")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenFallbackWarning)
        r = knlens.locate(deep, fact, steps=4, n_random=1, progress=False, specificity=False, held_out=False,
                          screen="gradxact")
        e = knlens.locate(deep, fact, steps=4, n_random=1, progress=False, specificity=False, preset="eleuther",
                          screen="gauss2")
    assert r.settings.screen == Screen(method="gradxact", threshold=0.2, min_count=3, top_k=20)
    assert e.settings.screen == Screen(method="gauss2", threshold=0.3, min_count=2, top_k=20)  # > 0.5 · 2 folds
    assert all(a.screen is not None for a in r.attributions)


def test_screened_results_round_trip_with_what_they_left_out(deep, full, monkeypatch, tmp_path):
    monkeypatch.setattr(screen_module, "first_pass", lambda *a: [list(full)])  # a perfect screen: layers are left out
    scr = Screen(threshold=0.5, min_count=1, top_k=3, safety=1.0)
    attrs = knlens.attribute(deep, PROMPTS, " paris", screen=scr, **EXACT)
    r = knlens.locate(deep, knlens.Fact(PROMPTS, " paris"), attributions=attrs, n_random=1, progress=False,
                      specificity=False, held_out=False)
    assert attrs[0].screen.skipped and r.settings.screen == scr
    for i, value in enumerate((attrs[0], r)):
        back = type(value).load(value.save(tmp_path / str(i)))
        assert knlens.same(back, value) and back.key == value.key
    assert type(r).load(tmp_path / "1").attributions[0].screen == attrs[0].screen


OTHER = ["the capital of spain is", "spain's capital city is", "the capital city of spain is"]


def test_attribute_facts_screens_every_fact_on_its_own_in_shared_passes(deep, monkeypatch):
    facts = [knlens.Fact(PROMPTS, " paris"), knlens.Fact(OTHER, " madrid"), knlens.Fact(PROMPTS[:2], " rome"),
             knlens.Fact(PROMPTS[::-1], " paris")]  # the first fact again: the same layers, one exact pass
    scr = Screen(method="gauss2", threshold=0.9, min_count=2, top_k=0, safety=1.0)
    calls = []
    real = knlens.methods.attribution.ig._fixed_grid

    def counting(model, items, **kwargs):  # every fixed-grid pass: which facts, which layers
        calls.append((len(items), tuple(kwargs["layers"])))
        return real(model, items, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenFallbackWarning)
        one_by_one = [knlens.attribute(deep, f, screen=scr, **EXACT) for f in facts]
        calls.clear()
        monkeypatch.setattr(knlens.methods.attribution.ig, "_fixed_grid", counting)
        together = knlens.methods.attribution.ig.attribute_facts(deep, facts, screen=scr, **EXACT)
    assert calls[0] == (4, tuple(range(6)))  # one screen of every fact
    picked = [tuple(sorted([*a[0].screen.kept, *a[0].screen.verified])) for a in together]
    assert not any(a[0].screen.fell_back for a in together) and all(a[0].screen.skipped for a in together)
    assert len(set(picked)) > 1 and picked[0] == picked[3]  # facts pick layers of their own
    assert sorted(calls[1:]) == sorted((picked.count(p), p) for p in set(picked))  # one exact pass per set
    for attrs, alone in zip(together, one_by_one):
        for a, b in zip(attrs, alone):
            assert a.layers == b.layers and a.screen.kept == b.screen.kept and a.screen.fell_back == b.screen.fell_back
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-8)


def test_one_fact_of_several_falls_back_alone_and_loudly(deep, full, monkeypatch):
    facts = [knlens.Fact(PROMPTS, " paris"), knlens.Fact(PROMPTS, " paris")]
    top = int(torch.stack([f.scores.abs().amax(-1) for f in full]).amax(0).argmax())
    low = (torch.arange(6) != top).float() * 0.99
    blind = [dataclasses.replace(f, scores=f.scores * (1 - low[:, None]), delta=f.delta * (1 - low)) for f in full]
    monkeypatch.setattr(screen_module, "first_pass", lambda *a: [list(full), blind])  # perfect, then blind
    scr = Screen(threshold=0.5, min_count=1, top_k=3, safety=1.0)
    with pytest.warns(ScreenFallbackWarning, match=r"1 of 2 facts; screen gauss2 -> all layers: layer .*\(fact 1\)"):
        good, bad = knlens.methods.attribution.ig.attribute_facts(deep, facts, screen=scr, **EXACT)
    assert all(a.screen.passed and a.screen.skipped and "screen" not in a.settings.engine_note for a in good)
    assert all(a.screen.fell_back and a.layers == tuple(range(6)) and "screen gauss2 -> all layers" in
               a.settings.engine_note for a in bad)
    for a, f in zip(bad, full):
        torch.testing.assert_close(a.scores, f.scores, rtol=1e-5, atol=1e-8)


def test_the_passes_of_a_screened_call_share_their_clean_passes(deep, full, monkeypatch):
    from knlens.core.tokens import row_groups
    from knlens.methods.attribution import cells
    seen = []
    real = cells._plain_state

    def counting(model, rows, names, record):
        seen.append(len(names))
        return real(model, rows, names, record)
    monkeypatch.setattr(cells, "_plain_state", counting)
    attrs = knlens.attribute(deep, PROMPTS, " paris", screen=Screen(threshold=0.9, min_count=2, top_k=0, safety=1.0),
                             **EXACT)
    assert attrs[0].screen.skipped and not attrs[0].screen.fell_back  # an exact pass on fewer layers ran
    assert seen == [6] * len(row_groups(encode(deep, PROMPTS, " paris")))  # the screen's plain forwards only
    assert cells._KEPT.get() is None  # nothing kept after the call
    for a, f in zip(attrs, full):
        torch.testing.assert_close(a.scores, f.scores[list(a.layers)], rtol=1e-4, atol=1e-8)


def test_a_failed_check_picks_again_with_the_error_it_measured(deep, full, monkeypatch):
    """A screen at half the exact scores of layer 1 (its effect alike, so nothing looks unexplained), exact
    elsewhere: picked with no error allowed, the exact pass measures beta = 1 on layer 1 and the check fails;
    picked again with it, the second check passes without integrating every layer."""
    half = torch.where(torch.arange(6) == 1, 0.5, 1.0)
    screen = [dataclasses.replace(f, scores=f.scores * half[:, None], delta=f.delta * half) for f in full]
    monkeypatch.setattr(screen_module, "first_pass", lambda *a: [screen])
    scr = Screen(threshold=0.5, min_count=2, top_k=0, safety=1.0)
    first = pick_layers(screen, list(range(6)), scr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScreenFallbackWarning)
        attrs = knlens.attribute(deep, PROMPTS, " paris", screen=scr, **EXACT)
    c = attrs[0].screen
    assert c.rounds == 2 and c.passed and not c.fell_back and c.skipped and abs(c.beta - 1) < 1e-3
    assert set(first[0]) < set(c.kept) and "picked again" in screen_module.describe_screen(attrs)
    def coarse_in_two(attributions):
        counts = collections.Counter(n for a in attributions for n in knlens.coarse(a, 0.5))
        return {n for n, k in counts.items() if k >= 2}
    assert coarse_in_two(full) and coarse_in_two(attrs) == coarse_in_two(full)
