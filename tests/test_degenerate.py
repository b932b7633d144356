"""Degenerate neuron pairs (knlens/methods/multilingual/degenerate.py): the pair rule on a hand-made effect table,
and the drops are the single and pair suppressions of intervene."""

from __future__ import annotations

import pandas as pd
import pytest

from knlens import Fact, NeuronSet, load_model
from knlens.core.errors import SettingsError
from knlens.core.tokens import encode
from knlens.data.multilingual import MultilingualFact
from knlens.methods.interventions import intervene, per_prompt
from knlens.methods.multilingual.degenerate import DegeneratePairs, degenerate_pairs, degenerate_rule
from knlens.methods.multilingual.likn import attribute_languages


def test_the_pair_rule():
    effects = pd.DataFrame({"drop_a": [0.1, 0.2, 0.1, 0.19, -0.1],
                            "drop_b": [0.1, 0.1, 0.1, 0.0, 0.0],
                            "drop_pair": [0.3, 0.9, 0.25, 0.26, 0.5]})
    # singles must be < 20 % (0.2 is not), the pair > 25 % (0.25 is not); a negative single drop is below 20 %
    assert degenerate_rule(effects)["degenerate"].tolist() == [True, False, False, True, True]
    assert degenerate_rule(effects, single_max=0.3)["degenerate"].tolist() == [True, True, False, True, True]


def test_drops_are_intervene_suppressions():
    model = load_model("tiny-llama")
    m = MultilingualFact("P36", "Q1", "Q90", {"en": Fact(["the capital of france is", "the capital city of france is"],
                                                         " paris"), "xx": Fact(["france has the capital"], " paris")})
    res = degenerate_pairs(model, [m], attribute_languages(model, [m], steps=4), top=6, single_max=0.5, pair_min=0.1)
    assert res.languages == ("en", "xx") and len(res.singles) == 12
    q = encode(model, list(m["en"].prompts), " paris")
    clean = float(per_prompt(intervene(model, q, [NeuronSet()], 0.0), q).mean())
    s = res.singles[res.singles.language == "en"].iloc[0]
    alone = float(per_prompt(intervene(model, q, [NeuronSet([(int(s.layer), int(s.neuron))])], 0.0), q).mean())
    assert s["drop"] == pytest.approx(1 - alone / clean, rel=1e-5)
    cand = res.singles[(res.singles.language == "en") & res.singles.candidate]
    pairs = res.frame[res.frame.language == "en"]
    assert len(pairs) == len(cand) * (len(cand) - 1) // 2 and (pairs.drop_a < 0.5).all()
    assert pairs.degenerate.tolist() == degenerate_rule(pairs, single_max=0.5, pair_min=0.1).degenerate.tolist()
    assert set(res.summary().language) == {"en", "xx"}
    with pytest.raises(SettingsError, match="top"):
        degenerate_pairs(model, [m], attribute_languages(model, [m], steps=2), top=1)


def test_saves_and_loads(tmp_path):
    res = DegeneratePairs(pd.DataFrame({"fact": ["f"], "language": ["en"], "degenerate": [True]}),
                          pd.DataFrame({"fact": ["f"], "candidate": [True]}), pd.DataFrame({"p_clean": [0.5]}), ("en",))
    assert DegeneratePairs.load(res.save(tmp_path / "d")) == res
