"""mParaRel facts aligned across languages by URI (knlens/data/multilingual.py) and the known-in-every-language
filter (knlens/methods/multilingual/known.py): counts add up, nothing is dropped silently, bad input raises."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from knlens import Fact, load_model
from knlens.core.errors import MissingTranslationError, SettingsError, UnknownLanguageError
from knlens.data.multilingual import MultilingualFact, MultilingualFacts, load_multilingual
from knlens.data.pararel import default_data_dir
from knlens.methods.multilingual.known import known_in_all


def _write(folder, lang, patterns, tuples):
    (folder / lang / "patterns").mkdir(parents=True)
    (folder / lang / "tuples").mkdir(parents=True)
    (folder / lang / "patterns" / "P36.jsonl").write_text("\n".join(json.dumps({"pattern": p}) for p in patterns))
    (folder / lang / "tuples" / "P36.jsonl").write_text("\n".join(json.dumps(t) for t in tuples))


def _t(s, o, sl, ol, i):
    return {"sub_uri": s, "obj_uri": o, "sub_label": sl, "obj_label": ol, "lineid": i}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "mpararel"
    _write(root, "en", ["the capital of [X] is [Y]", "[X] has the capital [Y] .", "[Y] is the capital of [X]",
                        "the chief city of [X] is [Y] , a city"],
           [_t("Q142", "Q90", "France", "Paris", 0), _t("Q183", "Q64", "Germany", "Berlin", 1),
            _t("Q17", "Q1490", "Japan", "Tokyo", 2), _t("Q142", "Q90", "France", "Paris", 3),
            _t("Q38", "Q220", "", "Rome", 4)])
    _write(root, "fr", ["la capitale de [X] est [Y]", "l'[Y] de [X]"],
           [_t("Q183", "Q64", "Allemagne", "Berlin", 1), _t("Q142", "Q90", "France", "Paris", 0),
            _t("Q29", "Q2807", "Espagne", "Madrid", 5)])
    _write(root, "ja", ["[Y]は[X]の首都です", "[X]の首都は[Y]です"], [_t("Q142", "Q90", "フランス", "パリ", 0)])
    return tmp_path


def test_aligned_by_uri_with_every_skip_counted(data):
    facts = load_multilingual("P36", ["en", "fr"], data)
    assert [(m.subject_uri, m.object_uri) for m in facts] == [("Q142", "Q90"), ("Q183", "Q64")]  # en's file order
    assert facts[1]["fr"].prompts == ("La capitale de Allemagne est",)
    assert facts[1]["en"].prompts == ("The capital of Germany is", "Germany has the capital")
    assert facts[0]["fr"].target == " Paris" and facts[0]["en"].name == "P36-Q142-Q90/en"
    c = facts.counts.set_index("language")
    assert c.loc["en", "tuples"] == 5 and c.loc["en", "skipped_duplicate"] == 1 and c.loc["en", "skipped_no_label"] == 1
    assert c.loc["en", "templates_used"] == 2 and c.loc["en", "templates_object_not_last"] == 1
    assert c.loc["en", "templates_unusable"] == 1                       # the subject after the object
    assert c.loc["fr", "templates_unusable"] == 1                       # the object glued to "l'"
    assert c.loc["en", "facts"] == 3 and c.loc["en", "missing_in_other_languages"] == 1   # Japan: no fr version
    assert c.loc["fr", "missing_in_other_languages"] == 1                                  # Spain: no en version
    for lang in ("en", "fr"):  # every tuple is a fact, a counted skip, or both
        row = c.loc[lang]
        assert row["tuples"] == row["facts"] + row["skipped_duplicate"] + row["skipped_no_label"] + \
            row["skipped_too_few_prompts"]
        assert row["facts"] == row["aligned"] + row["missing_in_other_languages"]
    assert set(facts.counts["kept"]) == {2}
    # the object not last: cut before it, and counted as used
    loose = load_multilingual("P36", ["en"], data, object_last=False)
    assert loose.counts.loc[0, "templates_used"] == 3 and "The chief city of France is" in loose[0]["en"].prompts
    assert len(load_multilingual("P36", ["en", "fr"], data, max_facts=1)) == 1
    assert len(load_multilingual("P36", ["en"], data, min_paraphrases=2)) == 3


def test_no_space_languages_and_bad_input(data):
    with pytest.raises(MissingTranslationError, match="no usable template of P36"):
        load_multilingual("P36", ["en", "ja"], data)        # both ja templates have text after the object
    ja = load_multilingual("P36", ["ja", "en"], data, object_last=False)
    assert ja[0]["ja"].target == "パリ" and ja[0]["ja"].prompts == ("フランスの首都は",)
    with pytest.raises(UnknownLanguageError, match="'de'.*it has en, fr, ja"):
        load_multilingual("P36", ["en", "de"], data)
    with pytest.raises(MissingTranslationError, match="subject Q17 of P36 has no usable fact in fr"):
        load_multilingual("P36", ["en", "fr"], data, subjects=["Q17"])
    assert [m.subject_uri for m in load_multilingual("P36", ["en", "fr"], data, subjects=["Q183"])] == ["Q183"]
    with pytest.raises(MissingTranslationError, match="no 'de' version"):
        load_multilingual("P36", ["en", "fr"], data)[0]["de"]
    with pytest.raises(SettingsError):
        load_multilingual("P36", [], data)


def test_known_in_all_keeps_facts_known_everywhere():
    model = load_model("tiny-llama")
    prompts = ["the capital of france is", "the capital city of spain is", "the official language of japan is"]
    greedy = [" " + model.to_string(model(model.to_tokens(p))[0, -1].argmax()).strip() for p in prompts]
    wrong = [next(w for w in (" paris", " rome") if w != g) for g in greedy]
    assert len(set(greedy)) == 3                     # so that prompt 1 does not answer greedy[0]
    mf = [MultilingualFact("P0", f"Q{i}", "Q0", {"en": Fact([p], greedy[i]),
                                                 "xx": Fact([p], greedy[i] if i != 1 else wrong[i])})
          for i, p in enumerate(prompts)]
    two = MultilingualFact("P0", "Q9", "Q0", {"en": Fact(prompts[:2], greedy[0]), "xx": Fact(prompts[:1], greedy[0])})
    facts = MultilingualFacts((*mf, two), ("en", "xx"), pd.DataFrame({"language": ["en", "xx"]}))
    kept = known_in_all(model, facts)
    assert [m.subject_uri for m in kept] == ["Q0", "Q2", "Q9"]
    assert kept[2]["en"].prompts == (prompts[0],)                # its unanswered prompt dropped
    c = kept.counts.set_index("language")
    assert (c.loc["en", "known"], c.loc["xx", "known"], c.loc["xx", "not_known"]) == (4, 3, 1)
    assert set(c["known_in_all"]) == {3}
    strict = known_in_all(model, facts, keep_prompts="all")
    assert [m.subject_uri for m in strict] == ["Q0", "Q2"]        # Q9's en prompt 1 is not answered
    with pytest.raises(SettingsError):
        known_in_all(model, facts, keep_prompts="some")


@pytest.mark.skipif(not (default_data_dir() / "mpararel").is_dir(), reason="no mParaRel data folder")
def test_real_mpararel_aligns_ten_languages():
    langs = ["en", "fr", "de", "es", "it", "nl", "pt", "ru", "ja", "zh-hans"]
    facts = load_multilingual("P36", langs, max_facts=3)
    c = facts.counts
    assert list(c["language"]) == langs and (c["aligned"] > 100).all() and set(c["kept"]) == {3}
    assert ((c["facts"] - c["missing_in_other_languages"]) == c["aligned"]).all()
    for m in facts:
        assert m.languages == tuple(langs)
        assert m["en"].target.startswith(" ") and not m["zh-hans"].target.startswith(" ")
        assert all(m["fr"].subject in p for p in m["fr"].prompts)
        assert torch.tensor([len(m[l].prompts) for l in langs]).min() >= 1
