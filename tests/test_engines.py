"""The integrated-gradients engines agree with each other, with the definition, and with Captum.

``fast`` (staircase over blocks, shared prefix cache) and ``batched`` (all cells through the whole model)
must equal ``reference`` (the per-layer loop of the published code) to 1e-5 of the largest score, on
causal (Llama-style with rotary + GQA, GPT-2) and masked (BERT) tiny models, for single- and multi-token
targets, padded batches, layer subsets and every quadrature rule.
"""

from __future__ import annotations

import pytest
import torch

import knlens.run.staircase as staircase
from knlens import load_model
from knlens.methods.attribution.grids import GRIDS, quadrature
from knlens.methods.attribution.ig import attribute
from knlens.run.engine import read_quantity, target_logits
from knlens.run.hooks import hook_name, set_value
from knlens.core.tokens import encode

KINDS = ("tiny-llama", "tiny-gpt2", "tiny-bert")
PROMPTS = ["the capital of france is", "the official language of the country called france is",
           "paris is the capital city of"]  # different lengths: the batch is padded


@pytest.fixture(scope="module")
def models():
    return {k: load_model(k) for k in KINDS}


def rel_err(a, b) -> float:
    """Largest difference relative to the largest reference score."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_same(fast, ref, atol=1e-5):
    assert len(fast) == len(ref)
    for x, y in zip(fast, ref):
        assert x.layers == y.layers
        assert rel_err(x.scores, y.scores) < atol
        assert float((x.delta - y.delta).abs().max()) < atol * max(1.0, float(y.delta.abs().max()))
        assert torch.allclose(x.activations, y.activations, atol=1e-5, rtol=1e-5)
        assert abs(x.clean_value - y.clean_value) < 1e-6


@pytest.fixture
def stair_calls(monkeypatch):
    """Counts the staircase forwards, to make sure ``fast`` does not silently fall back."""
    calls = {"n": 0}
    original = staircase.Stairs.logits

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(staircase.Stairs, "logits", counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [None, [1], [1, 0]])
def test_fast_equals_reference_single_token(models, kind, layers, stair_calls):
    model = models[kind]
    prompts = PROMPTS if layers is None else PROMPTS[1:]
    ref = attribute(model, prompts, " paris", steps=5, layers=layers, engine="reference")
    fast = attribute(model, prompts, " paris", steps=5, layers=layers, engine="fast", batch_size=5)
    assert stair_calls["n"] > 0
    assert_same(fast, ref)
    if layers is None:
        assert_same(attribute(model, prompts, " paris", steps=5, engine="batched", batch_size=5), ref)
    assert fast[0].settings.engine == "fast" and ref[0].settings.engine == "reference"


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_fast_equals_reference_teacher_forcing(models, kind, stair_calls):
    model = models[kind]
    ref = attribute(model, PROMPTS[:2], " paris is", steps=4, engine="reference")
    fast = attribute(model, PROMPTS[:2], " paris is", steps=4, engine="fast", batch_size=7)
    assert_same(fast, ref)
    assert fast[0].settings.multi_token == "teacher_forcing/mean"
    assert stair_calls["n"] > 0
    summed = attribute(model, PROMPTS[:2], " paris is", steps=4, token_reduce="sum")
    assert summed[0].settings.multi_token == "teacher_forcing/sum"
    assert torch.allclose(summed[1].scores, 2 * fast[1].scores, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", GRIDS)
def test_fast_equals_reference_every_grid(models, kind, grid):
    model = models[kind]
    ref = attribute(model, PROMPTS[:1], " paris", steps=4, grid=grid, engine="reference")
    fast = attribute(model, PROMPTS[:1], " paris", steps=4, grid=grid, engine="fast")
    assert_same(fast, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_other_hook_points_quantities_and_baselines(models, kind):
    model = models[kind]
    for point in ("hook_pre", "hook_pre_linear") if kind == "tiny-llama" else ("hook_pre",):
        ref = attribute(model, PROMPTS[:2], " paris", steps=4, hook_point=point, engine="reference")
        assert_same(attribute(model, PROMPTS[:2], " paris", steps=4, hook_point=point), ref)
    for quantity in ("logprob", "logit"):
        ref = attribute(model, PROMPTS[:1], " paris", steps=4, quantity=quantity, engine="reference")
        assert_same(attribute(model, PROMPTS[:1], " paris", steps=4, quantity=quantity), ref)
    base = torch.randn(2, model.cfg.d_mlp, generator=torch.Generator().manual_seed(0)) * 0.1
    ref = attribute(model, PROMPTS[:1], " paris", steps=4, baseline=base, engine="reference")
    assert_same(attribute(model, PROMPTS[:1], " paris", steps=4, baseline=base), ref)


def test_batch_size_does_not_change_results(models):
    model = models["tiny-llama"]
    one = attribute(model, PROMPTS, " paris", steps=5, batch_size=1)
    many = attribute(model, PROMPTS, " paris", steps=5, batch_size=1000)
    assert_same(one, many)


def test_fallback_when_the_block_loop_is_unknown(models, monkeypatch, stair_calls):
    """An architecture the staircase cannot drive falls back to ``batched`` with the same numbers."""
    model = models["tiny-gpt2"]
    ref = attribute(model, PROMPTS[:2], " paris", steps=4, engine="reference")
    monkeypatch.setattr(staircase, "model_tail", lambda model: None)
    fast = attribute(model, PROMPTS[:2], " paris", steps=4, engine="fast")
    assert stair_calls["n"] == 0
    assert_same(fast, ref)
    assert fast[0].settings.engine == "batched"  # what ran is recorded, not what was asked for


def test_staircase_reproduces_a_wrong_tail_is_rejected(models, monkeypatch, stair_calls):
    """The clean-pass check refuses a block loop whose logits differ from the model's."""
    model = models["tiny-llama"]
    ref = attribute(model, PROMPTS[:1], " paris", steps=4, engine="reference", tolerance=None)
    real = staircase.model_tail

    def off_by_one(model):
        tail = real(model)
        return lambda h: tail(h) + 1.0
    monkeypatch.setattr(staircase, "model_tail", off_by_one)
    fast = attribute(model, PROMPTS[:1], " paris", steps=4, engine="fast", tolerance=None)
    assert stair_calls["n"] == 1  # only the check ran
    assert_same(fast, ref)
    assert fast[0].settings.engine == "batched"


@pytest.mark.parametrize("kind", KINDS)
def test_completeness_error_shrinks_with_steps(models, kind):
    model = models[kind]
    errs = [attribute(model, PROMPTS[:1], " paris", steps=m, grid="right", tolerance=None)[0].relative_completeness_error
            for m in (2, 8, 32)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05
    gl = attribute(model, PROMPTS[:1], " paris", steps=8, grid="gauss-legendre", tolerance=None)[0]
    assert gl.relative_completeness_error < errs[2]


def test_bf16_and_device(models):
    model = models["tiny-llama"]
    ref = attribute(model, PROMPTS[:1], " paris", steps=8)[0]
    low = attribute(model, PROMPTS[:1], " paris", steps=8, dtype=torch.bfloat16, device="cpu")[0]
    assert low.settings.dtype == "bfloat16" and ref.settings.dtype == "float32"
    assert low.scores.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([low.scores.flatten(), ref.scores.flatten()]))[0, 1]
    assert corr > 0.999
    assert attribute(model, PROMPTS[:1], " paris", steps=2, dtype="bf16")[0].settings.dtype == "bfloat16"
    with pytest.raises(ValueError):
        attribute(model, PROMPTS[:1], " paris", dtype="int8")
    with pytest.raises((ValueError, TypeError)):  # TypeError: the run-time type checker of the test suite
        attribute(model, PROMPTS[:1], " paris", engine="turbo")
    with pytest.raises(ValueError):
        attribute(model, PROMPTS[:1], " paris", batch_size=0)


# --- Captum: the same function, integrated by an independent implementation ---------------------------

captum_attr = pytest.importorskip("captum.attr")


def _function_of_layer(model, prompt, target, layer):
    """f(x) = P(target | blocks.{layer}.mlp.hook_post at the target position replaced by x), batched."""
    q = encode(model, [prompt], target)

    def f(x: torch.Tensor) -> torch.Tensor:
        rows = q.select(torch.zeros(len(x), dtype=torch.long))
        hook = (hook_name(layer), set_value(x, position=rows.position))
        return read_quantity(target_logits(model, rows, [hook]), rows.target)
    return f


@pytest.mark.parametrize(("kind", "captum_method", "grid"), [
    *[(k, "riemann_right", "right") for k in KINDS], *[(k, "gausslegendre", "gauss-legendre") for k in KINDS],
    ("tiny-llama", "riemann_left", "left"), ("tiny-gpt2", "riemann_middle", "midpoint"),
    ("tiny-bert", "riemann_trapezoid", "trapezoid")])
def test_matches_captum(models, kind, captum_method, grid):
    model = models[kind]
    prompt, steps = PROMPTS[0], 7
    ours = attribute(model, [prompt], " paris", steps=steps, grid=grid, tolerance=None)[0]  # a fixed grid
    for row, layer in enumerate(ours.layers):
        f = _function_of_layer(model, prompt, " paris", layer)
        x = ours.activations[row][None].clone().requires_grad_(True)
        ig_captum = captum_attr.IntegratedGradients(f)
        theirs = ig_captum.attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method=captum_method,
                                     internal_batch_size=steps)[0].detach()
        if captum_method == "riemann_trapezoid":
            # Captum's trapezoid weights are 1/n (ends 1/2n) over n nodes spaced 1/(n−1): they sum to
            # (n−1)/n, not 1. knlens uses the textbook weights 1/(n−1); the two differ by that factor.
            theirs = theirs * steps / (steps - 1)
        assert rel_err(ours.scores[row], theirs) < 1e-5, (layer, rel_err(ours.scores[row], theirs))


def test_quadrature_rules_integrate_polynomials():
    f = lambda a: 3 * a**2  # noqa: E731  ∫₀¹ = 1
    for grid in GRIDS:
        a, w = quadrature(grid, 64)
        assert abs(float((w * f(a)).sum()) - 1.0) < 0.05
    a, w = quadrature("gauss-legendre", 3)
    assert abs(float((w * a**5).sum()) - 1 / 6) < 1e-12  # exact up to degree 2m − 1
