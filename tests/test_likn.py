"""Language-independent and language-specific neurons (knlens/methods/multilingual/likn.py): the sets are what
their definitions say (intersection over languages, each language's remainder, per-language coarse sets of
AMIG or IG), the statistics add up, and the LIKN sets' effects are measured in every language."""

from __future__ import annotations

import pytest
import torch

from knlens import Fact, NeuronSet, load_model
from knlens.core.errors import MissingTranslationError, SettingsError
from knlens.core.tokens import encode
from knlens.data.multilingual import MultilingualFact
from knlens.methods.attribution.amig import attribute_amig
from knlens.methods.interventions import intervene
from knlens.methods.multilingual.likn import (effects_by_language, language_neurons, language_set, likn_effects,
                                              split_languages)
from knlens.methods.selection import coarse


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def facts():
    def fact(key, en, de, xx, target):
        return MultilingualFact("P36", key, "Q0", {"en": Fact(en, target), "de": Fact(de, target),
                                                   "xx": Fact(xx, target)})
    return [fact("Q1", ["the capital of france is", "the capital city of france is"], ["capital of france is"],
                 ["the capital of france was"], " paris"),
            fact("Q2", ["the capital of spain is"], ["capital city of spain is"], ["spain has the capital"], " madrid")]


@pytest.fixture(scope="module")
def found(model, facts):
    return language_neurons(model, facts, steps=4, threshold=0.2)


def test_split_is_intersection_and_remainder():
    sets = {"en": NeuronSet([(0, 1), (1, 2), (1, 3)]), "fr": NeuronSet([(1, 2), (1, 3)]), "zh": NeuronSet([(1, 2)])}
    independent, specific = split_languages(sets)
    assert independent == NeuronSet([(1, 2)])
    assert specific == {"en": NeuronSet([(0, 1), (1, 3)]), "fr": NeuronSet([(1, 3)]), "zh": NeuronSet()}
    for lang, s in sets.items():  # each language's set = LIKN ∪ its specific part, disjoint
        assert specific[lang] | independent == s and not (specific[lang] & independent)
    two, _ = split_languages(sets, across=["en", "fr"])                  # MEMLA intersects a subset
    assert two == NeuronSet([(1, 2), (1, 3)])
    with pytest.raises(MissingTranslationError, match="de"):
        split_languages(sets, across=["en", "de"])


def test_sets_follow_their_definition(model, facts, found):
    assert found.languages == ("en", "de", "xx") and found.settings.attribution == "amig/authors"
    for m in facts:
        per_lang = {}
        for lang in found.languages:  # recomputed: AMIG of each prompt, coarse ≥ 0.2·max, in > half the prompts
            coarse_sets = [coarse(a, 0.2) for a in attribute_amig(model, m[lang], steps=4)]
            need = len(coarse_sets) // 2 + 1
            per_lang[lang] = NeuronSet(n for n in NeuronSet.union(coarse_sets)
                                       if sum(n in c for c in coarse_sets) >= need)
            assert found.neurons(m.key, lang) == per_lang[lang]
        likn = NeuronSet.intersection(per_lang.values())
        assert found.independent(m.key) == likn
        for lang in found.languages:
            assert found.specific(m.key, lang) == per_lang[lang] - likn
            row = found.sizes[(found.sizes.fact == m.key) & (found.sizes.language == lang)].iloc[0]
            assert (row.n_neurons, row.n_independent, row.n_specific) == (len(per_lang[lang]), len(likn),
                                                                        len(per_lang[lang] - likn))
    assert any(len(found.independent(m.key)) for m in facts), "the test needs a non-empty LIKN set"
    stats = found.layer_stats()
    assert stats["independent"].sum() == sum(len(found.independent(m.key)) for m in facts)
    for lang in found.languages:
        assert stats[f"{lang}_neurons"].sum() == found.sizes[found.sizes.language == lang]["n_neurons"].sum()
    ov = found.overlap().set_index(["language_a", "language_b"])
    a, b = (found.neurons(m.key, "en") for m in facts), (found.neurons(m.key, "xx") for m in facts)
    want = sum(x.jaccard(y) if (x or y) else 1.0 for x, y in zip(a, b)) / len(facts)
    assert ov.loc[("en", "xx"), "jaccard"] == pytest.approx(want)
    assert list(found.summary()["language"]) == ["en", "de", "xx"]


def test_language_set_and_settings_errors(model, facts):
    one = torch.tensor([[1.0, 0.5, 0.1], [0.0, 0.31, 0.29]])
    assert language_set([one], threshold=0.3) == NeuronSet([(0, 0), (0, 1), (1, 1)])
    with pytest.raises(SettingsError):
        language_set([one], threshold=0.0)
    with pytest.raises((SettingsError, TypeError)):  # TypeError: a run-time type checker
        language_neurons(model, facts, attribution="lrp", steps=2)
    with pytest.raises(MissingTranslationError, match="languages"):
        language_neurons(model, [facts[0], facts[1].restrict(["en", "de"])], steps=2)
    ig = language_neurons(model, facts[:1], attribution="ig", steps=4, threshold=0.2)
    assert ig.settings.attribution == "integrated_gradients"


def test_likn_effects_in_every_language(model, facts, found):
    res = likn_effects(model, facts, found, n_random=3)
    with_set = [m for m in facts if found.independent(m.key)]
    kn = res.frame[res.frame.neurons == "knowledge"]
    assert set(kn["fact"]) == {f"{m.key}/{l}" for m in with_set for l in found.languages}
    assert (kn.groupby("fact")["n_neurons"].first() == [len(found.independent(f.rsplit("/")[0]))
                                                       for f in kn.groupby("fact")["n_neurons"].first().index]).all()
    # the knowledge row of one (fact, language) equals a plain intervention with that fact's LIKN set
    m, lang = with_set[0], "de"
    q = encode(model, list(m[lang].prompts), m[lang].target)
    want = intervene(model, q, [found.independent(m.key)], 0.0)[0]
    got = kn[(kn.action == "suppress") & (kn.prompt == m[lang].prompts[0])]["p_after"]
    assert float(got.iloc[0]) == pytest.approx(float(want[0]), rel=1e-5)
    table = effects_by_language(res, found)
    assert set(table["language"]) == {"en", "de", "xx"} and set(table["action"]) == {"suppress", "enhance"}
    assert set(table["facts_without_set"]) == {len(facts) - len(with_set)}
    with pytest.raises(MissingTranslationError):
        likn_effects(model, facts, found, which="specific", source="fr")


def test_result_saves_and_loads_exactly(found, tmp_path):
    from knlens.results.contract import same

    back = type(found).load(found.save(tmp_path / "likn"))
    assert same(back, found) and back.settings == found.settings
    assert back.key.startswith("language-neurons/")
    fig = found.plot()
    assert len(fig.axes[0].get_yticklabels()) == len(found.languages) + 1
