"""Tests of the Fact type, the built-in facts and the ParaRel / mParaRel / BLiMP loaders."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest

from knlens.data.blimp import BlimpPair, blimp_phenomena, load_blimp
from knlens.data.builtin import UnknownFactError, UnknownRelationError, builtin_facts, builtin_relations, get_fact
from knlens.data.pararel import (default_data_dir, load_mpararel, load_pararel, mpararel_languages,
                                 mpararel_relations, pararel_relations)
from knlens.core.errors import KnlensError, PromptError, TargetError
from knlens.core.facts import Fact


# --------------------------------------------------------------------------------------------- Fact


def test_fact_accepts_a_list_and_stores_a_tuple():
    fact = Fact(["The capital of France is", "France's capital city is"], " Paris", subject="France")
    assert fact.prompts == ("The capital of France is", "France's capital city is")
    assert isinstance(fact.prompts, tuple)
    assert Fact("The capital of France is", " Paris").prompts == ("The capital of France is",)
    assert Fact(prompts=("a b",), target=" c", subject=None, relation="r", name="n").name == "n"


def test_fact_is_frozen_hashable_and_replaceable():
    fact = Fact(["The capital of France is"], " Paris", name="f")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fact.target = " Lyon"  # type: ignore[misc]
    assert hash(fact) == hash(Fact(("The capital of France is",), " Paris", name="f"))
    other = dataclasses.replace(fact, prompts=("The capital city of France is",))
    assert other.prompts == ("The capital city of France is",) and other.target == " Paris"
    assert len(Fact(["the capital of germany is"] * 3, " berlin").prompts) == 3  # duplicates are kept


@pytest.mark.parametrize("prompts, match", [
    ([], "at least one prompt"),
    ((), "at least one prompt"),
    (["The capital of France is", ""], "prompt 1 .*empty"),
    (["   \n"], "prompt 0 .*whitespace"),
])
def test_fact_rejects_bad_prompts(prompts, match):
    with pytest.raises(PromptError, match=match):
        Fact(prompts, " Paris")


def test_fact_rejects_non_string_prompts():
    # PromptError from Fact itself; a TypeError (beartype's TypeCheckError) when the test suite's run-time
    # type checker, installed by conftest, sees the bad element first.
    with pytest.raises((PromptError, TypeError), match="(?i)string|type"):
        Fact(["ok", 3], " Paris")  # type: ignore[list-item]


@pytest.mark.parametrize("target", ["", "   "])
def test_fact_rejects_empty_target(target):
    with pytest.raises(TargetError, match="target.*empty"):
        Fact(["The capital of France is"], target)


def test_fact_errors_are_knlens_value_errors_naming_the_fact():
    with pytest.raises(ValueError, match="'capital-france'"):
        Fact(["The capital of France is"], "", name="capital-france")
    with pytest.raises(KnlensError):
        Fact([], " Paris")


def test_fact_subject_must_occur_in_every_prompt():
    with pytest.raises(PromptError, match=r"subject 'France'.*prompt 1"):
        Fact(["The capital of France is", "Its capital is"], " Paris", subject="France")
    with pytest.raises(PromptError, match="case-sensitive"):
        Fact(["the capital of france is"], " paris", subject="France")
    with pytest.raises(PromptError, match="subject"):
        Fact(["The capital of France is"], " Paris", subject="  ")


def test_subject_chars():
    fact = Fact(["The capital of France is", "France's capital city is"], " Paris", subject="France")
    assert fact.subject_chars("The capital of France is") == (15, 21)
    assert fact.subject_chars(1) == (0, 6)
    text = fact.prompts[0]
    start, end = fact.subject_chars(0)
    assert text[start:end] == "France"
    assert fact.subject_chars("Germany") is None
    assert Fact(["The capital of France is"], " Paris").subject_chars(0) is None


def test_fact_dict_round_trip():
    fact = Fact(["The capital of France is", "France's capital city is"], " Paris", subject="France",
                relation="P36", name="capital-france")
    d = fact.to_dict()
    assert d["prompts"] == list(fact.prompts)
    assert Fact.from_dict(json.loads(json.dumps(d))) == fact
    minimal = Fact.from_dict({"prompts": ["The capital of France is"], "target": " Paris"})
    assert (minimal.subject, minimal.relation, minimal.name) == (None, None, None)
    with pytest.raises(ValueError, match="missing.*target"):
        Fact.from_dict({"prompts": ["x"]})
    with pytest.raises(ValueError, match="unknown.*'subjcet'"):
        Fact.from_dict({"prompts": ["x"], "target": " y", "subjcet": "x"})
    with pytest.raises(PromptError):
        Fact.from_dict({"prompts": [], "target": " y"})


# ------------------------------------------------------------------------------------ built-in facts


def test_builtin_set_sizes_and_shape():
    facts = builtin_facts()
    assert len(facts) >= 40
    relations = {f.relation for f in facts}
    assert len(relations) >= 10
    assert relations == set(builtin_relations())
    names = [f.name for f in facts]
    assert all(names) and len(set(names)) == len(names), "built-in fact names must be unique"
    for fact in facts:
        assert len(fact.prompts) >= 3, fact.name
        assert len(set(fact.prompts)) == len(fact.prompts), fact.name
        assert fact.target.startswith(" ") and fact.target.strip() == fact.target[1:], fact.name
        assert fact.subject and all(fact.subject in p for p in fact.prompts), fact.name
        assert all(p == p.strip() and not p.endswith(".") for p in fact.prompts), fact.name
        assert re.fullmatch(r"[a-z]+(-[a-z0-9]+)+", fact.name), fact.name
    for rel in relations:
        assert len(builtin_facts(rel)) >= 3, rel


def test_capital_france():
    fact = get_fact("capital-france")
    assert fact.target == " Paris" and fact.subject == "France" and fact.relation == "capital"
    assert {"The capital of France is", "France's capital city is", "The capital city of France is"} <= set(fact.prompts)


def test_builtin_facts_by_relation_name_or_wikidata_id():
    capitals = builtin_facts("capital")
    assert capitals and all(f.relation == "capital" for f in capitals)
    assert builtin_facts("P36") == capitals
    assert builtin_facts() is not builtin_facts()  # a fresh list each call
    with pytest.raises(UnknownRelationError, match="capital.*official-language"):
        builtin_facts("capitol")


def test_get_fact_unknown_name_suggests_close_names():
    with pytest.raises(KeyError) as info:
        get_fact("capital-frnace")
    assert isinstance(info.value, UnknownFactError)
    assert "capital-france" in str(info.value) and not str(info.value).startswith('"')


# ----------------------------------------------------------------------------- loaders: fixtures


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A made-up data folder in the real layout: one ParaRel relation, one mParaRel language, one BLiMP file."""
    patterns = [
        {"pattern": "The capital of [X] is [Y] ."},  # object last, spaced final period
        {"pattern": "The capital city of [X] is [Y]."},
        {"pattern": "[X]'s capital is [Y]"},
        {"pattern": "[Y] is the capital of [X]."},  # object first: never a next-token prompt
        {"pattern": "[X] has [Y] as its capital."},  # object in the middle
    ]
    _write_jsonl(tmp_path / "pararel" / "patterns" / "P36.jsonl", patterns)
    _write_jsonl(tmp_path / "pararel" / "tuples" / "P36.jsonl", [
        {"sub_label": "France", "obj_label": "Paris", "uuid": "a"},
        {"sub_label": "Germany", "obj_label": "Berlin", "uuid": "b"},
        {"sub_label": "France", "obj_label": "Paris", "uuid": "c"},  # exact duplicate
        {"sub_label": "Italy", "obj_label": "Rome", "uuid": "d"},
    ])
    _write_jsonl(tmp_path / "pararel" / "patterns" / "P1.jsonl", [{"pattern": "[X] is [Y]."}])
    _write_jsonl(tmp_path / "pararel" / "tuples" / "P1.jsonl", [{"sub_label": "a", "obj_label": "b", "uuid": "x"}])
    _write_jsonl(tmp_path / "mpararel" / "ja" / "patterns" / "P36.jsonl", [
        {"pattern": "[X]の首都は[Y]", "checked-by-human": True},
        {"pattern": "[X]の首都、[Y]", "checked-by-human": False},
        {"pattern": "[Y]は[X]の首都です", "checked-by-human": True},
    ])
    _write_jsonl(tmp_path / "mpararel" / "ja" / "tuples" / "P36.jsonl", [
        {"sub_uri": "Q142", "obj_uri": "Q90", "obj_label": "パリ", "sub_label": "フランス", "lineid": 7}])
    _write_jsonl(tmp_path / "mpararel" / "en" / "patterns" / "P36.jsonl", [
        {"pattern": "the capital of [X] is [Y]", "checked-by-human": False},
        {"pattern": "[X]'s capital is [Y]", "checked-by-human": False}])
    _write_jsonl(tmp_path / "mpararel" / "en" / "tuples" / "P36.jsonl", [
        {"sub_uri": "Q142", "obj_uri": "Q90", "obj_label": "Paris", "sub_label": "France", "lineid": 7}])
    _write_jsonl(tmp_path / "blimp" / "toy_agreement.jsonl", [
        {"sentence_good": "Ann sold this dog.", "sentence_bad": "Ann sold this dogs.", "one_prefix_prefix": "Ann sold this",
         "one_prefix_word_good": "dog", "one_prefix_word_bad": "dogs", "UID": "toy_agreement", "pairID": "0",
         "field": "morphology", "linguistics_term": "determiner_noun_agreement", "lexically_identical": True},
    ])
    return tmp_path


def test_object_last_excludes_templates_with_the_object_elsewhere(tiny_data):
    facts = load_pararel("P36", tiny_data)
    assert [f.name for f in facts] == ["P36-0", "P36-1", "P36-3"]  # the duplicate tuple is dropped
    france = facts[0]
    assert france.prompts == ("The capital of France is", "The capital city of France is", "France's capital is")
    assert france.target == " Paris" and france.subject == "France" and france.relation == "P36"
    assert not any("has" in p or "[" in p for f in facts for p in f.prompts)
    # object_last=False: templates whose subject precedes the object are cut before it
    loose = load_pararel("P36", tiny_data, object_last=False)
    assert loose[0].prompts[-1] == "France has"
    assert not any(p.startswith("is the capital") for f in loose for p in f.prompts)


def test_loader_options(tiny_data):
    with pytest.warns(UserWarning, match="3 usable template"):
        assert load_pararel("P36", tiny_data, min_paraphrases=4) == []
    assert len(load_pararel("P36", tiny_data, min_paraphrases=4, object_last=False)) == 3
    two = load_pararel("P36", tiny_data, max_facts=2, seed=1)
    assert len(two) == 2 and two == load_pararel("P36", tiny_data, max_facts=2, seed=1)
    assert load_pararel("P36", tiny_data, max_facts=0) == []
    with pytest.raises(ValueError, match="min_paraphrases"):
        load_pararel("P36", tiny_data, min_paraphrases=0)
    with pytest.warns(UserWarning, match="P1 has 1 usable template"):
        assert load_pararel("P1", tiny_data) == []
    assert load_pararel("p36", tiny_data)[0].relation == "P36"
    assert pararel_relations(tiny_data) == ["P1", "P36"]
    assert load_pararel("P36", tiny_data / "pararel")[0].target == " Paris"  # the pararel folder itself


def test_unknown_relation_is_a_clear_error(tiny_data):
    with pytest.raises(UnknownRelationError, match=r"no relation 'P999'.*available: P1, P36"):
        load_pararel("P999", tiny_data)
    with pytest.raises(UnknownRelationError, match="no language 'xx'.*en, ja"):
        load_mpararel("P36", "xx", tiny_data)
    with pytest.raises(UnknownRelationError, match="toy_agreement"):
        load_blimp("no_such_phenomenon", tiny_data)


def test_missing_data_dir_names_the_place_and_the_variable(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*KNLENS_DATA"):
        load_pararel("P36", missing)
    monkeypatch.setenv("KNLENS_DATA", str(missing))
    assert default_data_dir() == missing
    with pytest.raises(FileNotFoundError, match=r"nowhere \(from \$KNLENS_DATA\)"):
        pararel_relations()
    with pytest.raises(FileNotFoundError, match="KNLENS_DATA"):
        blimp_phenomena()


def test_data_env_variable_is_used(tiny_data, monkeypatch):
    monkeypatch.setenv("KNLENS_DATA", str(tiny_data))
    assert load_pararel("P36")[0].prompts[0] == "The capital of France is"
    assert blimp_phenomena() == ["toy_agreement"]


def test_mpararel_languages_without_spaces(tiny_data):
    (fact,) = load_mpararel("P36", "ja", tiny_data, min_paraphrases=2)
    assert fact.prompts == ("フランスの首都は", "フランスの首都、") and fact.target == "パリ"
    assert fact.name == "P36-7"
    assert load_mpararel("P36", "ja", tiny_data, min_paraphrases=1, human_checked_only=True)[0].prompts == (
        "フランスの首都は",)
    (en,) = load_mpararel("P36", "en", tiny_data, min_paraphrases=2)
    assert en.prompts == ("The capital of France is", "France's capital is") and en.target == " Paris"
    assert en.name == fact.name  # the same lineid: the same fact in two languages
    assert load_mpararel("P36", "en", tiny_data, min_paraphrases=2, capitalize=False)[0].prompts[0].startswith("the")
    assert mpararel_languages(tiny_data) == ["en", "ja"]
    assert mpararel_relations("ja", tiny_data) == ["P36"]


def test_blimp_fixture(tiny_data):
    (pair,) = load_blimp("toy_agreement", tiny_data)
    assert pair.prefix == "Ann sold this" and pair.word_good == " dog" and pair.word_bad == " dogs"
    assert pair.method == "one_prefix"
    fact = pair.as_fact()
    assert fact.prompts == ("Ann sold this",) and fact.target == " dog"


# -------------------------------------------------------------------------------- loaders: real data


@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = default_data_dir()
    if not (root / "pararel").is_dir():
        pytest.skip(f"reference data not found at {root}: the real-data loader tests need ../shared/data "
                    f"next to the repository, or KNLENS_DATA set to such a folder")
    return root


def test_pararel_real(data_dir):
    rels = pararel_relations(data_dir)
    assert "P36" in rels and len(rels) >= 20
    assert rels == sorted(rels, key=lambda r: int(r[1:]))
    facts = load_pararel("P36", data_dir)
    assert len(facts) > 100
    assert facts[0].prompts[0] == "The capital of Cook County is" and facts[0].target == " Chicago"
    names = [f.name for f in facts]
    assert len(set(names)) == len(names)
    for fact in facts:
        assert fact.relation == "P36" and fact.target.startswith(" ")
        assert len(fact.prompts) >= 3
        for p in fact.prompts:
            assert "[X]" not in p and "[Y]" not in p and p == p.strip() and not p.endswith(".")
            assert fact.subject in p
    sample = load_pararel("P36", data_dir, max_facts=10, seed=3)
    assert len(sample) == 10 and set(f.name for f in sample) <= set(names)
    assert sample == load_pararel("P36", data_dir, max_facts=10, seed=3)
    assert sample != load_pararel("P36", data_dir, max_facts=10, seed=4)
    # "[X] is a [Y]-born person." style templates only appear without object_last
    p19, p19_all = load_pararel("P19", data_dir), load_pararel("P19", data_dir, object_last=False)
    assert len(p19_all[0].prompts) > len(p19[0].prompts)
    with pytest.warns(UserWarning, match="P1001"):
        assert load_pararel("P1001", data_dir) == []


def test_every_pararel_relation_loads(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = {r: load_pararel(r, data_dir, max_facts=5) for r in pararel_relations(data_dir)}
    assert sum(1 for facts in loaded.values() if facts) >= 15


def test_mpararel_real(data_dir):
    langs = mpararel_languages(data_dir)
    assert {"en", "fr", "de", "zh-hans", "ja"} <= set(langs)
    en = load_mpararel("P36", "en", data_dir)
    assert en[0].prompts[0] == "The capital of Azerbaijan is" and en[0].target == " Baku"
    fr = {f.name: f for f in load_mpararel("P36", "fr", data_dir, min_paraphrases=1)}
    assert fr[en[0].name].target == " Bakou"  # names are aligned across languages by lineid
    zh = load_mpararel("P36", "zh-hans", data_dir)
    assert zh and all(not f.target.startswith(" ") for f in zh)
    assert all(f.target.startswith(" ") for f in load_mpararel("P36", "ru", data_dir))
    assert "P36" in mpararel_relations("en", data_dir)


def test_blimp_real(data_dir):
    phenomena = blimp_phenomena(data_dir)
    assert "determiner_noun_agreement_1" in phenomena
    pairs = load_blimp("determiner_noun_agreement_1", data_dir)
    assert len(pairs) == 1000 and all(isinstance(p, BlimpPair) for p in pairs)
    for p in pairs:
        assert p.method == "one_prefix" and p.word_good.startswith(" ") and p.word_bad.startswith(" ")
        assert p.sentence_good.startswith(p.prefix + p.word_good)
        assert p.sentence_bad.startswith(p.prefix + p.word_bad)
    assert pairs[0].uid == "determiner_noun_agreement_1" and pairs[0].linguistics_term == "determiner_noun_agreement"
    assert len(load_blimp("determiner_noun_agreement_1", data_dir, max_items=5)) == 5
    two = load_blimp("determiner_noun_agreement_2", data_dir, max_items=3)
    assert all(p.method == "two_prefix" and p.prefix is None for p in two)
    assert all(p.sentence_good.startswith(p.prefix_good + p.word) for p in two)
    with pytest.raises(ValueError, match="two-prefix"):
        two[0].as_fact()
    for ph in phenomena:
        assert load_blimp(ph, data_dir, max_items=1)
