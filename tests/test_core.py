"""Unit tests of the vocabulary and the shared pieces: neurons, hooks, prompts, selection, interventions."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import knlens
from knlens import (Fact, HookShapeError, KnlensError, Neuron, NeuronIndexError, NeuronSet, PromptError, TargetError,
                    UnknownModelError)
from knlens.run.engine import activations_at, forward, forward_until, target_probs
from knlens.run.hooks import (add, capture, compose, hooked, mean_ablate, neuron_hooks, patch_from, replace_rows, scale,
                              set_value, zero_ablate)
from knlens.methods.interventions import intervene, measure
from knlens.methods.controls import random_control
from knlens.core.tokens import encode
from knlens.methods.selection import PRESETS, coarse, generic_neurons, refine, refine_facts

PROMPTS = ["the capital of france is", "paris is the capital city of", "the capital city of france is"]


# ---------------------------------------------------------------- neurons
def test_neuronset_operations_and_round_trips():
    a = NeuronSet([(3, 7), (5, 1), (3, 7)])
    b = NeuronSet([Neuron(5, 1), Neuron(9, 0)])
    assert len(a) == 2 and list(a) == [Neuron(3, 7), Neuron(5, 1)]
    assert set(a | b) == {Neuron(3, 7), Neuron(5, 1), Neuron(9, 0)}
    assert list(a & b) == [Neuron(5, 1)] and list(a - b) == [Neuron(3, 7)]
    assert set(a ^ b) == {Neuron(3, 7), Neuron(9, 0)}
    assert a.jaccard(b) == pytest.approx(1 / 3) and NeuronSet().jaccard(NeuronSet()) == 1.0
    assert NeuronSet.from_frame(a.to_frame()) == a
    assert NeuronSet.from_json(a.to_json()) == a and json.loads(a.to_json()) == [[3, 7], [5, 1]]
    assert a.by_layer() == {3: [7], 5: [1]}


def test_neuronset_checks_ranges():
    with pytest.raises(NeuronIndexError, match="layer 4 is out of range"):
        NeuronSet([(4, 0)]).check(n_layers=2, d_mlp=48)
    with pytest.raises(NeuronIndexError, match="index 48 is out of range"):
        NeuronSet([(1, 48)]).check(n_layers=2, d_mlp=48)
    with pytest.raises(NeuronIndexError):
        NeuronSet([(-1, 0)])


# ---------------------------------------------------------------- hook factories on plain tensors
@pytest.fixture
def act():
    torch.manual_seed(0)
    return torch.randn(3, 5, 6)


def _changed(a, b):
    return (a != b).nonzero().tolist()


def test_scale_changes_exactly_the_selected_cells(act):
    out = scale(2.0, neurons=[1, 4], position=-1)(act, None)
    assert sorted(_changed(out, act)) == sorted([b, 4, n] for b in range(3) for n in (1, 4))
    assert torch.equal(out[:, 4, [1, 4]], 2 * act[:, 4, [1, 4]])


def test_zero_set_add_mean_hooks(act):
    pos = torch.tensor([0, 2, 4])  # one position per row
    out = zero_ablate([2], pos)(act, None)
    assert sorted(_changed(out, act)) == [[0, 0, 2], [1, 2, 2], [2, 4, 2]] and out[1, 2, 2] == 0
    v = torch.arange(6.0)
    out = set_value(v, None, 1)(act, None)
    assert torch.equal(out[:, 1], v.expand(3, 6)) and torch.equal(out[:, [0, 2, 3, 4]], act[:, [0, 2, 3, 4]])
    out = add(1.5, [0], None)(act, None)
    assert torch.allclose(out[..., 0], act[..., 0] + 1.5) and torch.equal(out[..., 1:], act[..., 1:])
    assert torch.equal(mean_ablate(v, [3], 2)(act, None)[:, 2, 3], v[3].expand(3))


def test_row_specific_masks_and_patch_from(act):
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 1] = mask[2, 5] = True
    out = scale(0.0, mask, -1)(act, None)
    assert sorted(_changed(out, act)) == [[0, 4, 1], [2, 4, 5]]
    src = torch.randn(1, 5, 6)
    out = patch_from(src, [0, 1], 3)(act, None)
    assert torch.equal(out[:, 3, :2], src[0, 3, :2].expand(3, 2))
    assert len(_changed(out, act)) == 6
    with pytest.raises(HookShapeError):
        patch_from(torch.randn(2, 5, 6))(act, None)


def test_replace_rows_and_compose(act):
    rows = torch.tensor([True, False, True])
    vals = torch.randn(2, 6, requires_grad=True)
    out = replace_rows(vals, rows, -1)(act, None)
    assert torch.equal(out[[0, 2], 4], vals.detach()) and torch.equal(out[1], act[1])
    out.sum().backward()
    assert torch.equal(vals.grad, torch.ones(2, 6))
    both = compose(scale(2.0, [0], -1), add(1.0, [0], -1), lambda a, h: None)(act, None)
    assert torch.allclose(both[:, 4, 0], 2 * act[:, 4, 0] + 1)


def test_bad_positions_and_neurons(act):
    with pytest.raises(HookShapeError, match="outside the sequence"):
        scale(0.0, None, 7)(act, None)
    with pytest.raises(NeuronIndexError):
        scale(0.0, [6], -1)(act, None)


# ---------------------------------------------------------------- hooks on models
def test_hook_on_model_changes_only_the_target_position(tiny_llama):
    q = encode(tiny_llama, PROMPTS[:1], " paris")
    clean = tiny_llama(q.tokens)
    with hooked(tiny_llama, [("blocks.0.mlp.hook_post", scale(3.0, None, -1))]):
        patched = tiny_llama(q.tokens)
    assert torch.equal(patched[:, :-1], clean[:, :-1])  # causal: earlier positions untouched
    assert not torch.allclose(patched[:, -1], clean[:, -1])
    assert torch.equal(tiny_llama(q.tokens), clean)  # removed afterwards


def test_hooks_removed_after_failure(tiny):
    q = encode(tiny, PROMPTS[:1], " paris")
    before = tiny(q.tokens)

    def boom(act, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        with hooked(tiny, [("blocks.0.mlp.hook_post", scale(5.0)), ("blocks.1.mlp.hook_post", boom)]):
            tiny(q.tokens)
    with pytest.raises(HookShapeError, match="returned"):
        with hooked(tiny, [("blocks.0.mlp.hook_post", scale(5.0)),
                           ("blocks.1.mlp.hook_post", lambda a, h: a[..., :3])]):
            tiny(q.tokens)
    with pytest.raises(KnlensError, match="unknown hook point"):
        with hooked(tiny, [("blocks.0.mlp.hook_pots", scale(5.0))]):
            pass
    with pytest.raises(NeuronIndexError):
        intervene(tiny, q, [NeuronSet([(0, 999)])], 0.0)
    assert torch.equal(tiny(q.tokens), before)


def test_forward_until_returns_what_the_hook_saw_and_stops_there(tiny):
    q = encode(tiny, PROMPTS[:1], " paris")
    before = tiny(q.tokens)
    extra = ("blocks.0.mlp.hook_post", scale(3.0))
    full: list[torch.Tensor] = []
    forward(tiny, q.tokens, [extra, ("ln_final.hook_in", capture(full))])
    later: list[torch.Tensor] = []
    seen = forward_until(tiny, q.tokens, "ln_final.hook_in", [extra, ("unembed.hook_in", capture(later))])
    assert torch.equal(seen, full[0]) and not later  # the extra hooks ran, nothing after the stop did
    assert not torch.equal(forward_until(tiny, q.tokens, "ln_final.hook_in"), seen)

    def boom(act, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        forward_until(tiny, q.tokens, "ln_final.hook_in", [extra, ("blocks.1.mlp.hook_post", boom)])
    assert torch.equal(tiny(q.tokens), before)  # every hook removed, after a stop and after a failure


def test_forward_until_a_point_the_forward_skips_is_an_error(tiny_llama):
    q = encode(tiny_llama, PROMPTS[:1], " paris")
    with pytest.raises(KnlensError, match="never reached the hook point 'hook_pos_embed'"):  # rotary: no position embedding
        forward_until(tiny_llama, q.tokens, "hook_pos_embed")
    assert torch.equal(forward_until(tiny_llama, q.tokens, "hook_embed"), tiny_llama.embed(q.tokens))


def test_neuron_hooks_group_by_layer(tiny_gpt2):
    hooks = neuron_hooks(NeuronSet([(1, 3), (0, 2), (1, 5)]), lambda idx: scale(0.0, idx, -1))
    assert [n for n, _ in hooks] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]


def test_user_hook_composes_with_knlens_hooks(tiny_gpt2):
    q = encode(tiny_gpt2, PROMPTS, " paris")
    seen = []

    def record(act, hook):
        seen.append(act[torch.arange(len(q)), q.position].clone())

    name = "blocks.1.mlp.hook_post"
    p = target_probs(tiny_gpt2, q, [(name, zero_ablate([4], q.position)), (name, record)], batch_size=None)
    assert torch.all(seen[0][:, 4] == 0) and p.shape == (3,)


# ---------------------------------------------------------------- prompts and padding
def test_padding_gives_the_same_results_as_unpadded_runs(tiny):
    q = encode(tiny, PROMPTS + ["paris"], " paris")
    assert q.attention_mask.sum(1).unique().numel() > 1  # rows really have different lengths
    batched = target_probs(tiny, q)
    single = torch.cat([target_probs(tiny, q.row(i)) for i in range(len(q))])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)
    name = "blocks.1.mlp.hook_post"
    a = activations_at(tiny, q, [name])[name]
    b = torch.cat([activations_at(tiny, q.row(i), [name])[name] for i in range(len(q))])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_rows(tiny_llama):
    q = encode(tiny_llama, PROMPTS[:2], " paris france")
    ids = tiny_llama.to_tokens(PROMPTS[0])[0].tolist()
    assert len(q) == 4 and q.token_index.tolist() == [0, 1, 0, 1]
    assert q.tokens[1, :len(ids) + 1].tolist() == ids + [q.target[0].item()]
    assert q.position[1] == len(ids)
    with pytest.raises(TargetError, match="single token is required"):
        encode(tiny_llama, PROMPTS[:1], " paris france", multi_token="error")


def test_masked_lm_reads_the_mask(tiny_bert):
    q = encode(tiny_bert, PROMPTS[:1], " paris")
    assert q.tokens[0, q.position[0]] == tiny_bert.tokenizer.mask_token_id
    with pytest.raises(TargetError, match="masked LM"):
        encode(tiny_bert, PROMPTS[:1], " paris france")


def test_bad_prompts_and_targets(tiny_llama):
    with pytest.raises(PromptError, match="empty prompt"):
        encode(tiny_llama, ["  "], " paris")
    with pytest.raises(TargetError, match="not in the model's vocabulary"):
        encode(tiny_llama, PROMPTS, " zanzibar")
    with pytest.raises(TargetError, match="non-empty"):
        encode(tiny_llama, PROMPTS, "")
    with pytest.raises(NeuronIndexError, match="out of range"):
        knlens.attribute(tiny_llama, PROMPTS, " paris", layers=[5])


def test_unknown_model_names():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        knlens.load_model("no-such-model-anywhere")
    with pytest.raises(UnknownModelError, match="tiny-"):
        knlens.tiny_model("mamba")


# ---------------------------------------------------------------- selection presets on a hand-made matrix
SCORES = [  # three prompts of one fact, 2 layers x 4 neurons; maxima 1.0, 2.0, 1.0
    torch.tensor([[1.0, 0.25, 0.2, 0.0], [0.3, -1.0, 0.1, 0.31]]),
    torch.tensor([[2.0, 0.5, 0.7, 0.0], [0.59, 0.61, 0.0, 0.4]]),
    torch.tensor([[1.0, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.35]]),
]


def test_coarse_thresholds():
    assert set(coarse(SCORES[0], 0.2)) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 3)}  # >= 0.2 keeps 0.2
    assert set(coarse(SCORES[0], 0.3, strict=True)) == {(0, 0), (1, 3)}  # > 0.3 drops 0.3 itself
    assert list(coarse(SCORES[0], 0.2))[0] == (0, 0)  # best first
    assert len(coarse(-torch.ones(2, 3), 0.2)) == 0  # no positive evidence, no neurons


def test_presets_give_the_documented_sets():
    dai = [coarse(s, 0.2) for s in SCORES]
    # dai coarse: p0 {00,01,02,10,13}, p1 {00,01,02,10,11,13}, p2 {00,02,03,13}
    assert set(dai[2]) == {(0, 0), (0, 2), (0, 3), (1, 3)}
    assert set(refine(dai, 0.7, min_count=3)) == {(0, 0), (0, 2), (1, 3)}  # in all 3 prompts
    eleuther = [coarse(s, 0.3, strict=True) for s in SCORES]
    # eleuther coarse: p0 {00,13}, p1 {00,02,10,11}, p2 {00,03,13}; keep count > 1.5
    assert set(refine(eleuther, 0.5, min_count=0, strict=True)) == {(0, 0), (1, 3)}
    assert set(knlens.refined_neurons(SCORES, "eleuther")) == {(0, 0), (1, 3)}
    assert set(knlens.refined_neurons(SCORES, "dai")) == {(0, 0), (0, 2), (1, 3)}  # mean 3: in [2, 5]
    assert PRESETS["dai"].threshold == 0.2 and PRESETS["eleuther"].threshold == 0.3


def test_dai_adapts_p_until_2_to_5_neurons():
    # 10 prompts; neuron k is coarse in the first k+1 prompts (only neuron 0..9 of layer 0 positive)
    prompts = []
    for i in range(10):
        s = torch.zeros(1, 10)
        s[0, i:] = 1.0
        prompts.append(s)
    # p = 0.7 keeps neurons coarse in >= 7 prompts: 7 neurons (> 5), so p rises to 0.75, 0.8, 0.85 -> 4
    (kept,) = refine_facts([prompts], "dai")
    assert 2 <= len(kept) <= 5 and set(kept) == {(0, 6), (0, 7), (0, 8), (0, 9)}


def test_generic_neurons():
    sets = [NeuronSet([(0, 1), (2, 2)]), NeuronSet([(0, 1)]), NeuronSet([(1, 1)])] + [NeuronSet()] * 7
    assert set(generic_neurons(sets, 0.1)) == {(0, 1)}  # in 2 of 10 facts > 10 %
    assert list(knlens.drop_generic(sets, 0.1)[0]) == [(2, 2)]


# ---------------------------------------------------------------- interventions
def test_random_control_matches_layers_and_avoids_the_set():
    kn = NeuronSet([(1, 3), (1, 7), (4, 0)])
    r = random_control(kn, d_mlp=10, seed=3)
    assert r.layer_counts() == kn.layer_counts() and not (r & kn)
    assert r == random_control(kn, d_mlp=10, seed=3) and r != random_control(kn, d_mlp=10, seed=4)


def test_intervene_equals_manual_hooks_and_identity(tiny_llama):
    q = encode(tiny_llama, PROMPTS, " paris")
    kn = NeuronSet([(0, 3), (1, 7), (1, 9)])
    p = intervene(tiny_llama, q, [kn, NeuronSet()], 0.0)
    manual = target_probs(tiny_llama, q, lambda s: neuron_hooks(kn, lambda idx: zero_ablate(idx, s.position)))
    torch.testing.assert_close(p[0], manual)
    clean = target_probs(tiny_llama, q)
    torch.testing.assert_close(p[1], clean)  # the empty set changes nothing
    torch.testing.assert_close(intervene(tiny_llama, q, [kn], 1.0)[0], clean)  # x1 changes nothing
    assert not torch.allclose(p[0], clean)


def test_measure_frame_and_tests(tiny_gpt2):
    facts = [Fact(PROMPTS, " paris", name="f1"), Fact(["the capital of germany is"] * 3, " berlin", name="f2")]
    sets = [NeuronSet([(1, 2), (1, 5)]), NeuronSet([(0, 1)])]
    res = measure(tiny_gpt2, facts, sets, n_random=4)
    f = res.frame
    assert len(f) == 2 * 2 * 3 * 9  # facts x actions x prompts x (1 + 4 uniform + 4 matched sets)
    assert set(f.neurons) == {"knowledge", "random"} and set(f.action) == {"suppress", "enhance"}
    assert set(f[f.neurons == "random"].control) == {"uniform", "matched"} and set(f[f.neurons == "knowledge"].control) == {""}
    assert (f.p_before > 0).all()
    t = res.tests()
    assert set(t.action) == {"suppress", "enhance"} and t.p_empirical.between(0, 1).all()
    assert isinstance(res.delta(), pd.DataFrame)


def test_non_finite_scores_and_bad_baselines_are_reported(tiny_llama):
    nan_baseline = torch.full((2, 48), float("nan"))
    with pytest.raises(knlens.NonFiniteError, match="non-finite"):
        knlens.attribute(tiny_llama, PROMPTS[:1], " paris", steps=2, baseline=nan_baseline)
    with pytest.raises(HookShapeError, match="baseline has shape"):
        knlens.attribute(tiny_llama, PROMPTS[:1], " paris", steps=2, baseline=torch.zeros(3, 48))
