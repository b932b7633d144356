"""MATRICE-style aggregation (knlens/methods/multilingual/matrice.py): the weight formula on a hand-made score
tensor, the selection rule, and its comparison with plain intersection on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from knlens import Fact, NeuronSet, load_model
from knlens.core.errors import HookShapeError, SettingsError
from knlens.data.multilingual import MultilingualFact
from knlens.methods.multilingual.likn import attribute_languages, language_neurons
from knlens.methods.multilingual.matrice import (heldout_language_effects, intersection_sets, matrice_neurons,
                                                 matrice_scores, matrice_sets, resample_stability)


def test_weight_formula_on_a_hand_made_tensor():
    # 3 cells, 1 layer, 3 neurons; the cells' largest |score| are 2, 4 and 1
    cells = torch.tensor([[[2.0, 1.0, -1.0]], [[4.0, 4.0, 0.0]], [[1.0, 0.0, 0.5]]])
    # v = [1, .5, -.5], [1, 1, 0], [1, 0, .5]; weights 1, 1, 2 -> 1/4, 1/4, 1/2
    mean = [1.0, 0.25 * 0.5 + 0.25 * 1.0, 0.25 * -0.5 + 0.5 * 0.5]                   # [1, .375, .125]
    var = [0.0, 0.25 * (0.5 - 0.375) ** 2 + 0.25 * (1 - 0.375) ** 2 + 0.5 * 0.375 ** 2,
           0.25 * (-0.5 - 0.125) ** 2 + 0.25 * 0.125 ** 2 + 0.5 * (0.5 - 0.125) ** 2]
    for k in (0.0, 1.0, 2.5):
        got = matrice_scores(cells, torch.tensor([1.0, 1.0, 2.0]), k=k)[0]
        want = torch.tensor([m - k * math.sqrt(v) for m, v in zip(mean, var)])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # uniform weights: a neuron equal (after scaling) in every cell keeps its mean, a varying one is penalised
    uniform = matrice_scores(cells)[0]
    assert float(uniform[0]) == pytest.approx(1.0)
    assert float(uniform[1]) < float(matrice_scores(cells, k=0.0)[0, 1])
    # scale does not matter: a cell multiplied by 10 changes nothing
    scaled = cells.clone()
    scaled[1] *= 10
    torch.testing.assert_close(matrice_scores(scaled), uniform[None])
    # confidence weights that are all zero but one make that cell the answer
    only = matrice_scores(cells, torch.tensor([0.0, 1.0, 0.0]))[0]
    torch.testing.assert_close(only, torch.tensor([1.0, 1.0, 0.0]))


def test_selection_rule_and_bad_input():
    scores = torch.tensor([[0.9, 0.3, 0.26], [-1.0, 0.27, 0.0]])
    assert matrice_neurons(scores, threshold=0.3) == NeuronSet([(0, 0), (0, 1), (1, 1)])
    assert matrice_neurons(scores, layers=[5, 9], threshold=0.3) == NeuronSet([(5, 0), (5, 1), (9, 1)])
    assert matrice_neurons(-scores.abs()) == NeuronSet()           # nothing positive: nothing selected
    with pytest.raises(HookShapeError):
        matrice_scores(torch.zeros(2, 3))
    with pytest.raises(SettingsError, match="k must be"):
        matrice_scores(torch.ones(2, 1, 3), k=-1.0)
    with pytest.raises(SettingsError, match="weights"):
        matrice_scores(torch.ones(2, 1, 3), torch.tensor([1.0, -1.0]))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def facts():
    def fact(key, en, de, xx, target):
        return MultilingualFact("P36", key, "Q0", {"en": Fact(en, target), "de": Fact(de, target),
                                                   "xx": Fact(xx, target)})
    return [fact("Q1", ["the capital of france is", "the capital city of france is", "france has the capital"],
                 ["capital of france is", "the capital city of france was"], ["the capital of france was",
                                                                               "capital city of france is"], " paris"),
            fact("Q2", ["the capital of spain is", "spain has the capital"], ["capital city of spain is"],
                 ["spain has the capital city", "the capital of spain was"], " madrid")]


@pytest.fixture(scope="module")
def attrs(model, facts):
    return attribute_languages(model, facts, steps=4)


def test_sets_from_shared_attributions(model, facts, attrs):
    likn = language_neurons(model, facts, attributions=attrs, threshold=0.2)
    assert intersection_sets(attrs, threshold=0.2) == {m.key: likn.independent(m.key) for m in facts}
    sets = matrice_sets(attrs, threshold=0.2)
    for m in facts:  # recomputed from the attributions by the formula, cell by cell
        cells = torch.stack([a.scores for l in attrs.languages for a in attrs.of(m.key, l)])
        v = cells / cells.abs().amax(dim=(1, 2), keepdim=True)
        score = v.mean(0) - v.std(0, unbiased=False)
        want = NeuronSet((l, i) for l, i in (score >= 0.2 * score.max()).nonzero().tolist())
        assert sets[m.key] == want
    conf = matrice_sets(attrs, threshold=0.2, weighting="confidence")
    assert set(conf) == set(sets)
    with pytest.raises((SettingsError, TypeError)):  # TypeError: a run-time type checker
        matrice_sets(attrs, weighting="entropy")


def test_stability_and_held_out_language(model, facts, attrs):
    table = resample_stability(attrs, n_resamples=4, threshold=0.2)
    assert len(table) == 2 * len(facts) and set(table["method"]) == {"matrice", "intersection"}
    q2 = table[table.fact == facts[1].key]
    assert q2["stability"].isna().all() and q2["note"].str.contains("one prompt in de").all()
    q1 = table[table.fact == facts[0].key]
    assert q1["stability"].between(0, 1).all() and (q1["note"] == "").all()
    effects = heldout_language_effects(model, facts, attrs, "xx", threshold=0.2, n_random=3)
    assert set(effects["method"]) == {"matrice", "intersection"}
    assert (effects["facts_without_set"] >= 0).all()
    with pytest.raises(SettingsError, match="held_out"):
        heldout_language_effects(model, facts, attrs, "fr")
