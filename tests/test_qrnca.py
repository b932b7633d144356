"""NA-ICA / QRNCA, the PCR metric, multiple-choice prompts and the two-stage filter (docs/methods.md §5, §12)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import knlens
from knlens import Fact, NeuronSet
from knlens.core.errors import EmptyStageError, ModalityError, OptionLetterError, TooFewOptionsError
from knlens.core.tokens import encode
from knlens.methods.structure.multiple_choice import check_letters, multiple_choice
from knlens.methods.structure.pcr import pcr, pcr_frame, pcr_table
from knlens.methods.structure.qrnca import (QRNCASettings, clusters_of, common_neurons, inverse_cluster_attribution,
                                            query_relevant_neurons)
from knlens.methods.structure.two_stage import TwoStageSettings, grad_x_activation, two_stage
from knlens.run.engine import activations_at, target_probs
from knlens.run.hooks import hook_name, scale

PROMPTS = ["the capital of france", "the capital city of france"]
OTHERS = ["the capital of spain", "the capital city of spain", "the capital of", "the language of japan"]
PLANTED = (1, 7)


@pytest.fixture(scope="module")
def planted():
    """A fresh tiny Llama whose neuron L1.N7 fires when the last token is the subject 'france' and writes ' paris'."""
    m = knlens.tiny_model("llama")
    q = encode(m, PROMPTS + OTHERS, " paris")
    x = activations_at(m, q, [hook_name(1, "hook_in")])[hook_name(1, "hook_in")]
    d = x[:2].mean(0) - x[2:].mean(0)
    mlp = m.blocks[1].mlp._original_component
    paris = m.tokenizer("paris", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        mlp.gate_proj.weight[PLANTED[1]] = 3 * d / d.norm()
        mlp.up_proj.weight[PLANTED[1]] = 3 * d / d.norm()
        mlp.down_proj.weight[:, PLANTED[1]] = 2 * m.W_U[:, paris] / m.W_U[:, paris].norm()
    return m


def _attr(scores):
    return SimpleNamespace(scores=torch.tensor(scores), layers=(0,))


# ----------------------------------------------------------------------------------------------- QRNCA

def test_ica_of_a_hand_made_cluster_table():
    clusters = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 1, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 0]]], dtype=torch.bool)
    ica = inverse_cluster_attribution(clusters)[0]
    want = [math.log(4 / 5), math.log(4 / 3), math.log(4 / 3), math.log(4 / 1)]
    assert ica.tolist() == pytest.approx(want, abs=1e-6)


def test_clusters_are_neurons_above_a_fraction_of_the_query_max():
    na = torch.tensor([[[0.1, 1.0, 0.21, 0.19]], [[2.0, 0.0, 0.0, 0.5]]])
    assert clusters_of(na, 0.2).tolist() == [[[False, True, True, False]], [[True, False, False, True]]]


def test_the_common_neuron_filter_removes_a_planted_common_neuron():
    """Neuron 0 has the largest na in 2 of 5 queries (40 % > 30 % of the clusters): its na × ica would make it the
    top neuron of those queries; the filter removes it, and without the filter (share 1.0) it is back."""
    rows = [[9.0, 1.0, 0, 0, 0, 0], [9.0, 0, 1.0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0], [0, 0, 0, 0, 1.0, 0],
            [0, 0, 0, 0, 0, 1.0]]
    attrs = [[_attr([r])] for r in rows]
    assert common_neurons(clusters_of(torch.tensor([[r] for r in rows])), 0.3)[0].tolist()[0]
    r = query_relevant_neurons(attrs, settings=QRNCASettings(top_v=1))
    assert list(r.common) == [(0, 0)]
    assert [list(ns) for ns in r.neurons[:2]] == [[(0, 1)], [(0, 2)]]
    unfiltered = query_relevant_neurons(attrs, settings=QRNCASettings(top_v=1, common_share=1.0))
    assert [list(ns) for ns in unfiltered.neurons[:2]] == [[(0, 0)], [(0, 0)]]
    assert len(unfiltered.common) == 0


def test_na_sums_templates_and_normalises():
    r = query_relevant_neurons([[_attr([[1.0, 3.0, 0.0]]), _attr([[1.0, -1.0, 0.0]])]])
    assert r.na[0, 0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert r.to_frame().columns.tolist() == ["query", "rank", "layer", "neuron", "na", "ica", "score"]


# ------------------------------------------------------------------------------------------------- PCR

def test_pcr_on_a_hand_made_frame():
    frame = pd.DataFrame({"action": ["suppress"] * 5, "kind": ["related"] * 2 + ["unrelated"] * 3,
                          "dp_percent": [-50.0, -30.0, -4.0, 4.0, -8.0]})
    assert pcr_table(frame)["pcr"].iloc[0] == pytest.approx(15.0)
    assert pcr([1.0], [0.0]) == math.inf and math.isnan(pcr([], [1.0]))


def test_pcr_on_a_planted_effect(planted):
    related = {"planted": [Fact(PROMPTS, " paris")], "random": [Fact(PROMPTS, " paris")]}
    unrelated = {g: [Fact(["the language of japan"], " japanese"), Fact(["the capital of spain"], " madrid")]
                 for g in related}
    sets = {"planted": NeuronSet([PLANTED]), "random": NeuronSet([(1, 20)])}
    table = pcr_table(pcr_frame(planted, sets, related, unrelated), by=("group", "action")).set_index(["group", "action"])
    assert table.loc[("planted", "suppress"), "related_dp"] < -30
    assert table.loc[("planted", "suppress"), "pcr"] > 5
    assert table.loc[("planted", "suppress"), "pcr"] > 5 * table.loc[("random", "suppress"), "pcr"]


def test_pcr_frame_on_the_fast_engine_equals_one_plain_forward_per_pair(planted):
    """The shared-clean-forward path against the reference engine, one (set, prompt) pair at a time."""
    from knlens.methods.interventions import measure

    facts = [Fact(PROMPTS, " paris", name="fr"), Fact(OTHERS[:2], " madrid", name="es"),
             Fact(OTHERS[3:], " paris", name="jp")]
    sets = {f"s{i}": NeuronSet([PLANTED, (0, 10 + i)]) if i % 2 else NeuronSet([(1, 20 + i)]) for i in range(5)}
    related = {g: facts[:1] for g in sets}
    unrelated = {g: facts[1:] for g in sets}
    fast = pcr_frame(planted, sets, related, unrelated)
    assert set(fast.engine) == {"fast"} and len(fast) == 5 * 2 * 5      # 5 sets, 2 actions, 5 prompts
    pairs = [(g, kind, f) for g in sets for kind, pool in (("related", related[g]), ("unrelated", unrelated[g]))
             for f in pool]
    ref = measure(planted, [Fact(f.prompts, f.target, name=str(i)) for i, (_, _, f) in enumerate(pairs)],
                  [sets[g] for g, _, _ in pairs], actions={"boost": 2.0, "suppress": 0.0}, n_random=0, controls=(),
                  engine="reference").frame
    ref["group"] = [pairs[int(i)][0] for i in ref.fact]
    merged = fast.merge(ref, on=["group", "prompt", "action"], suffixes=("", "_ref"))
    assert len(merged) == len(fast)
    assert merged.p_after.values == pytest.approx(merged.p_after_ref.values, rel=1e-4, abs=1e-7)
    assert merged.p_before.values == pytest.approx(merged.p_before_ref.values, rel=1e-4, abs=1e-7)
    assert merged.p_after.std() > 0                                       # the sets do move P


# ----------------------------------------------------------------------------------------- multiple choice

CAPITALS = [("france", "paris"), ("spain", "madrid"), ("italy", "rome"), ("japan", "tokyo"), ("china", "beijing")]


def _capital_facts(n=5):
    return [Fact([f"the capital of {c} is"], f" {o}", relation="P36", name=c) for c, o in CAPITALS[:n]]


def test_multiple_choice_prompts_are_seeded_and_answer_the_fact():
    a, b = multiple_choice(_capital_facts(), n_templates=3, seed=1), multiple_choice(_capital_facts(), n_templates=3,
                                                                                   seed=1)
    assert [q.prompts for q in a] == [q.prompts for q in b]
    for q in a:
        for opts, letter, prompt in zip(q.options, q.letters, q.prompts):
            assert len(set(opts)) == 4 and q.fact.target.strip() in opts
            assert f"{letter.strip()}. {q.fact.target.strip()}" in prompt
    assert len({q.letters for q in a}) > 1 or len(set(a[0].letters)) > 1  # the answer letter moves


def test_bad_multiple_choice_input_names_the_problem(tiny_llama):
    with pytest.raises(OptionLetterError, match=r"\['B', 'C', 'D'\]"):
        check_letters(tiny_llama)
    with pytest.raises(TooFewOptionsError, match="relation P36 has 3 distinct object"):
        multiple_choice(_capital_facts(3))
    check_letters(tiny_llama, ("a", "the", "of", "in"))  # single tokens of the tiny vocabulary


# --------------------------------------------------------------------------------------------- two-stage

@pytest.mark.parametrize("corruption", ["remove", "replace", "noise"])
def test_two_stage_finds_the_neuron_planted_to_respond_to_the_subject(planted, corruption):
    fact = Fact(PROMPTS, " paris", subject="france")
    r = two_stage(planted, fact, TwoStageSettings(corruption=corruption, neutral="spain", top_k=5, noise_samples=4))
    assert list(r.stage1)[0] == PLANTED          # the largest activation difference
    assert PLANTED in r.neurons and float(r.grad_x_act[PLANTED]) > 0  # kept by gradient × activation
    assert r.cost["backward"] == 1.0 and r.cost["forward"] == 2 + (8 if corruption == "noise" else 2)


def test_gradient_times_activation_matches_a_finite_difference(planted):
    q = encode(planted, PROMPTS[:1], " paris")
    acts, gxa, p = grad_x_activation(planted, q)
    eps = 1e-3
    hooks = [(hook_name(1), scale(1 + eps, [PLANTED[1]], position=q.position))]
    p_eps = target_probs(planted, q, hooks)
    assert float(p[0]) == pytest.approx(float(target_probs(planted, q)[0]), rel=1e-5)
    assert float(gxa[0, 1, PLANTED[1]]) == pytest.approx(float((p_eps.log() - p.log())[0]) / eps, rel=1e-2)


def test_two_stage_bad_input(planted):
    fact = Fact(PROMPTS, " paris", subject="france")
    with pytest.raises(EmptyStageError, match="tau_a=0.2"):  # the 'corrupted' prompt is the clean one
        two_stage(planted, fact, TwoStageSettings(corruption="replace", neutral="france"))
    with pytest.raises(EmptyStageError, match="tau_g=1000000.0"):
        two_stage(planted, fact, TwoStageSettings(corruption="remove", tau_g=1e6))
    with pytest.raises(ModalityError, match="vision-language model"):
        two_stage(planted, fact, image=object())
