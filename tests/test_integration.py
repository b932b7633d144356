"""Integration tests on the embedded SmolLM2-135M: real facts, real neurons, real effects."""

from __future__ import annotations

import pytest
import torch

import knlens
from knlens.data.builtin import builtin_facts
from knlens.methods.known import known_facts

pytestmark = pytest.mark.integration


def test_embedded_model_is_a_gated_bridge_with_post_activation_neurons(real_model):
    cfg = real_model.cfg
    assert (cfg.n_layers, cfg.d_mlp, cfg.gated_mlp) == (30, 1536, True)
    q = knlens.encode(real_model, ["The capital of France is"], " Paris")
    logits, cache = real_model.run_with_cache(q.tokens)
    mlp = real_model.blocks[3].mlp
    x = cache["blocks.3.mlp.hook_in"]
    gate, up = cache["blocks.3.mlp.hook_pre"], cache["blocks.3.mlp.hook_pre_linear"]
    # hook_post is silu(gate) * up, the input of W_out, and the MLP output is hook_post @ W_out
    torch.testing.assert_close(cache["blocks.3.mlp.hook_post"], torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(cache["blocks.3.mlp.hook_out"], cache["blocks.3.mlp.hook_post"] @ mlp.W_out,
                               atol=1e-4, rtol=1e-4)
    assert x.shape[-1] == cfg.d_model
    assert real_model.to_string(logits[0, -1].argmax()) == " Paris"


def test_suppressing_knowledge_neurons_beats_random_control(real_model):
    facts = known_facts(real_model, builtin_facts(), min_prompts=3, keep_prompts="correct")
    assert len(facts) >= 5, f"the model answers only {len(facts)} built-in facts"
    facts = facts[:5]
    sets = []
    for fact in facts:
        attrs = knlens.attribute(real_model, fact, steps=10, tolerance=None)  # a fixed grid, as it asserts
        assert max(a.relative_completeness_error for a in attrs) < 0.25
        sets.append(knlens.refined_neurons(attrs, preset="dai"))
    res = knlens.measure(real_model, facts, sets, n_random=10)
    tests = res.tests().set_index("action")
    kn, rand = tests.loc["suppress", "knowledge_relative"], tests.loc["suppress", "random_relative"]
    print(f"\nsuppress over {len(facts)} facts: knowledge {kn:+.1%}, random {rand:+.1%}, "
          f"p_empirical {tests.loc['suppress', 'p_empirical']:.3f}; neurons per fact {[len(s) for s in sets]}")
    print(res.summary().to_string())
    assert kn < rand - 0.2, "suppressing the knowledge neurons should lower P(target) clearly more than random"
    assert tests.loc["suppress", "p_empirical"] < 0.2
