"""Edits as reversible weight changes (knlens/methods/editing): exact undo, the editors' effects, the rank-one
constraint, refusals that leave every weight untouched, and the evaluation's conventions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import knlens
from knlens import Fact, NeuronSet
from knlens.core.errors import (EditModelError, EditStateError, NoOpEditError, NonFiniteError, PromptError,
                                SameTargetError, TargetError)
from knlens.methods.editing.covariance import key_covariance
from knlens.methods.editing.edit import Edit, WeightSlice, fingerprint, make_edit
from knlens.methods.editing.kn import kn_erase, kn_update, random_neuron_edit
from knlens.methods.editing.rank_one import rank_one_edit, rank_one_update
from knlens.methods.editing.slots import token_vector, value_slot, value_vectors
from knlens.methods.tracing.spans import subject_token_span
from knlens.results.contract import same
from knlens.run.engine import activations_at, forward

FACT = Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france",
            name="capital-france")
TEXTS = ["the capital of france is paris", "the dog is in rome", "this cat speaks french and german",
         "the river in spain", "a city of japan is tokyo", "these dogs were born in berlin"]


def _p(model, fact, target):
    return knlens.target_probs(model, knlens.encode(model, list(fact.prompts), target))


def _active(model, fact, k=5, layer=1):
    """The k neurons of ``layer`` with the largest |activation| at the prompts' last token."""
    q = knlens.encode(model, list(fact.prompts), fact.target)
    a = activations_at(model, q, [f"blocks.{layer}.mlp.hook_post"])[f"blocks.{layer}.mlp.hook_post"].mean(0)
    return NeuronSet([(layer, i) for i in a.abs().topk(k).indices.tolist()])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return knlens.tiny_model(request.param)


@pytest.fixture(scope="module")
def cov(model):
    return key_covariance(model, 0, TEXTS, cache_dir=False)


def _edits(model, cov):
    kn = _active(model, FACT)
    return {"update": kn_update(model, FACT, " berlin", kn), "erase": kn_erase(model, kn),
            "rank-one": rank_one_edit(model, FACT, " berlin", layer=0, covariance=cov, steps=5),
            "random": random_neuron_edit(model, {0: 3, 1: 2}, 4.0)}


def test_value_slots_hold_w_out_on_gated_and_ungated_mlps(tiny):
    slot = value_slot(tiny, 1)
    assert slot.axis == (0 if tiny.cfg.model_name == "tiny-gpt2" else 1)
    assert torch.equal(value_vectors(tiny, slot), tiny.blocks[1].mlp.W_out)
    assert torch.equal(value_vectors(tiny, slot, [3, 7]), tiny.blocks[1].mlp.W_out[[3, 7]])


def test_undo_is_exact(model, cov):
    tokens = model.to_tokens("the capital city of france is")
    clean, start = forward(model, tokens), fingerprint(model)
    for name, edit in _edits(model, cov).items():
        with edit.apply(model):
            assert fingerprint(model) != start, name
            assert not torch.equal(forward(model, tokens), clean), name
        assert fingerprint(model) == start and torch.equal(forward(model, tokens), clean), name
        edit.apply(model)  # the explicit form
        assert edit.is_applied(model)
        edit.undo(model)
        assert fingerprint(model) == start and not edit.is_applied(model), name


def test_context_manager_undoes_on_error(model, cov):
    start = fingerprint(model)
    edit = _edits(model, cov)["update"]
    with pytest.raises(ZeroDivisionError):
        with edit.apply(model):
            1 / 0
    assert fingerprint(model) == start and not edit.is_applied(model)


def test_update_moves_p_new_up_and_erase_lowers_p_old(model):
    kn = _active(model, FACT)
    new_before, old_before = _p(model, FACT, " berlin"), _p(model, FACT, " paris")
    with kn_update(model, FACT, " berlin", kn).apply(model):
        assert (_p(model, FACT, " berlin") > 10 * new_before).all()
    with kn_erase(model, kn).apply(model):
        assert (_p(model, FACT, " paris") < old_before).all()


def test_update_follows_dai_formula_with_the_activation_sign(model):
    kn = NeuronSet([(1, 3)])
    edit = kn_update(model, FACT, " berlin", kn, lambda1=1.5, lambda2=3.0)
    slot = value_slot(model, 1)
    v = value_vectors(model, slot, [3])[0]
    e_o, e_n = token_vector(model, " paris"), token_vector(model, " berlin")
    step = -1.5 * v.norm() / e_o.norm() * e_o + 3.0 * v.norm() / e_n.norm() * e_n
    new = edit.slices[0].new.reshape(-1)
    torch.testing.assert_close(new, v + edit.params["signs"][0] * step)


def test_dai_formula_without_the_sign_pushes_away_in_a_gated_mlp():
    """In the tiny Llama the most active neurons are negative: the published formula lowers P(new)."""
    model = knlens.tiny_model("llama")
    kn = _active(model, FACT)
    before = _p(model, FACT, " berlin")
    with kn_update(model, FACT, " berlin", kn, sign="none").apply(model):
        unsigned = _p(model, FACT, " berlin")
    with kn_update(model, FACT, " berlin", kn).apply(model):
        signed = _p(model, FACT, " berlin")
    assert (signed > before).all() and (unsigned < before).all()


def test_rank_one_satisfies_its_key_value_constraint(model, cov):
    edit = rank_one_edit(model, FACT, " berlin", layer=0, covariance=cov)
    k, v, delta = edit.params["key"], edit.params["value"], edit.params["delta"]
    w = edit.slices[0].new if edit.slices[0].axis == 0 else edit.slices[0].new.T
    torch.testing.assert_close(k @ w, v, rtol=1e-5, atol=1e-5)
    assert edit.params["layer"] == 0 and delta.norm() > 0
    # the edited MLP writes the optimised output at the subject's last token, and P(new) goes up
    q = knlens.encode(model, [FACT.prompts[0]], " berlin")
    at = torch.tensor([subject_token_span(model, FACT.prompts[0], "france")[1] - 1])
    sq = dataclasses.replace(q, position=at)
    out = "blocks.0.mlp.hook_out"
    before = activations_at(model, sq, [out])[out][0]
    p_before = knlens.target_probs(model, q)
    with edit.apply(model):
        after = activations_at(model, sq, [out])[out][0]
        p_after = knlens.target_probs(model, q)
    torch.testing.assert_close(after, before + delta, rtol=1e-4, atol=1e-4)
    assert p_after > 5 * p_before


def test_rank_one_takes_multi_token_targets_and_averaged_keys(model, cov):
    edit = rank_one_edit(model, FACT, " berlin is", layer=0, covariance=cov, steps=3,
                         prefixes=("", "the dog is in rome .", "a city"))
    w = edit.slices[0].new if edit.slices[0].axis == 0 else edit.slices[0].new.T
    torch.testing.assert_close(edit.params["key"] @ w, edit.params["value"], rtol=1e-5, atol=1e-5)


def test_rank_one_update_is_the_least_change_in_c():
    g = torch.Generator().manual_seed(0)
    m, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 3), (4,), (3,)))
    new = rank_one_update(m, k, v, torch.eye(4, dtype=torch.float64), ridge=0.0)
    torch.testing.assert_close(k @ new, v)
    torch.testing.assert_close(new - m, torch.outer(k / k.dot(k), v - k @ m))  # C = I: the least Frobenius change


BAD = {
    "same target (KN)": (SameTargetError, lambda m: kn_update(m, FACT, " paris", NeuronSet([(1, 3)]))),
    "same target (rank-one)": (SameTargetError, lambda m: rank_one_edit(m, FACT, " paris", layer=0,
                                                                        covariance=torch.eye(48))),
    "multi-token new target (KN)": (TargetError, lambda m: kn_update(m, FACT, " berlin is", NeuronSet([(1, 3)]))),
    "λ NaN": (NonFiniteError, lambda m: kn_update(m, FACT, " berlin", NeuronSet([(1, 3)]), lambda1=float("nan"))),
    "λ inf": (NonFiniteError, lambda m: kn_update(m, FACT, " berlin", NeuronSet([(1, 3)]), lambda2=float("inf"))),
    "zero steps": (NoOpEditError, lambda m: kn_update(m, FACT, " berlin", NeuronSet([(1, 3)]), lambda1=0.0, lambda2=0.0)),
    "no neurons": (NoOpEditError, lambda m: kn_update(m, FACT, " berlin", NeuronSet())),
    "no subject": (PromptError, lambda m: rank_one_edit(m, Fact(FACT.prompts, " paris"), " berlin", layer=0)),
    "random norm NaN": (NonFiniteError, lambda m: random_neuron_edit(m, {1: 2}, float("nan"))),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_specific_error_and_leaves_weights_intact(model, case):
    error, build = BAD[case]
    start = fingerprint(model)
    with pytest.raises(error):
        build(model)
    assert fingerprint(model) == start


def test_an_edit_refuses_another_model_and_a_second_application(model):
    edit = kn_update(model, FACT, " berlin", NeuronSet([(1, 3)]))
    other = knlens.tiny_model(model.cfg.model_name, seed=1)
    start, other_start = fingerprint(model), fingerprint(other)
    with pytest.raises(EditModelError, match="made for"):
        edit.apply(other)
    assert fingerprint(other) == other_start
    with edit.apply(model):
        during = fingerprint(model)
        with pytest.raises(EditStateError, match="already applied"):
            edit.apply(model)
        assert fingerprint(model) == during
    assert fingerprint(model) == start
    with pytest.raises(EditStateError, match="not applied"):
        edit.undo(model)
    assert fingerprint(model) == start


def test_undo_refuses_when_a_later_edit_moved_its_weights(model):
    a = kn_update(model, FACT, " berlin", NeuronSet([(1, 3)]))
    start = fingerprint(model)
    with a.apply(model):
        b = kn_erase(model, NeuronSet([(1, 3)]))  # made for the edited weights
        b.apply(model)
        with pytest.raises(EditStateError, match="undo the later"):
            a.undo(model)
        b.undo(model)
    assert fingerprint(model) == start


def test_a_write_that_fails_half_way_is_rolled_back(model):
    good = kn_update(model, FACT, " berlin", NeuronSet([(0, 2), (1, 3)]))
    broken = WeightSlice(good.slices[1].name, good.slices[1].axis, torch.tensor([10 ** 6]),
                         good.slices[1].old, good.slices[1].new)
    edit = Edit("broken", {}, (good.slices[0], broken), good.model, good.fingerprint)
    start = fingerprint(model)
    with pytest.raises((IndexError, RuntimeError)):
        edit.apply(model)
    assert fingerprint(model) == start and not edit.is_applied(model)


def test_an_edit_that_changes_nothing_is_refused(model):
    name = next(n for n, _ in model.named_parameters())
    p = dict(model.named_parameters())[name]
    with pytest.raises(NoOpEditError):
        make_edit(model, "nothing", {}, [(name, 0, torch.tensor([0]), p[:1].detach().clone())])


def test_saved_edit_loads_equal_and_applies_the_same(model, cov, tmp_path):
    start = fingerprint(model)
    for name, edit in _edits(model, cov).items():
        back = Edit.load(edit.save(tmp_path / name))
        assert same(back, edit) and back.digest == edit.digest, name
        with edit.apply(model):
            edited = fingerprint(model)
            with pytest.raises(EditStateError):
                back.apply(model)  # a copy of an applied edit is refused too
        with back.apply(model):
            assert fingerprint(model) == edited
        assert fingerprint(model) == start


def test_key_covariance_is_cached(model, tmp_path, monkeypatch):
    first = key_covariance(model, 1, TEXTS, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    import knlens.methods.editing.covariance as covariance

    monkeypatch.setattr(covariance, "_second_moment", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(key_covariance(model, 1, TEXTS, cache_dir=tmp_path), first)
    assert torch.allclose(first, first.T) and (first.diagonal() >= 0).all()
