"""Editing criteria (knlens/methods/editing/criteria.py): bijective symmetry, synonymous invariance, the relation
question, the rank-one key at the relation's last token; their refusals leave every weight untouched."""

from __future__ import annotations

import math

import pytest
import torch

import knlens
from knlens import Fact, NeuronSet
from knlens.core.errors import (DataNotFoundError, FactError, NoSymmetryError, NonFiniteError, PromptError,
                                SettingsError, TargetError)
from knlens.data.pararel import SYMMETRIC_RELATIONS, reverse_templates
from knlens.data.synonyms import FIELD_OCCUPATION, synonym_of
from knlens.methods.editing.criteria import (criterion_values, entity_relation_editors, relation_probes,
                                             symmetry_request, synonym_request)
from knlens.methods.editing.edit import fingerprint
from knlens.methods.editing.editors import EditRequest, Probe, kn_update_editor, rank_one_editor
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.rank_one import key_position, rank_one_edit
from knlens.run.engine import activations_at

FRANCE = Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france",
              relation="P36", name="capital-france")
ITALY = Fact(["the capital of italy is"], " rome", subject="italy", relation="P36", name="capital-italy")
SPAIN = Fact(["the capital of spain is"], " madrid", subject="spain", relation="P36", name="capital-spain")
REVERSE = ["[Y] is the capital of", "[Y] is the capital city of"]
LANG = Fact(["the official language of france is"], " french", subject="france", relation="P37", name="lang-france")


@pytest.fixture(scope="module")
def model():
    return knlens.tiny_model("llama")


@pytest.fixture(scope="module")
def cov(model):
    return torch.eye(model.cfg.d_mlp)


def _kn(model, fact=FRANCE, k=5):
    q = knlens.encode(model, list(fact.prompts), fact.target)
    a = activations_at(model, q, ["blocks.1.mlp.hook_post"])["blocks.1.mlp.hook_post"].mean(0)
    return kn_update_editor(lambda r: NeuronSet([(1, i) for i in a.abs().topk(k).indices.tolist()]))


def test_reverse_templates_come_from_pararel_for_symmetric_relations_only():
    try:
        p36 = reverse_templates("P36")
    except DataNotFoundError as err:
        pytest.skip(f"no data folder: {err}")
    assert "[Y] is the capital of" in p36 and all(t.count("[Y]") == 1 and "[X]" not in t for t in p36)
    assert reverse_templates("capital") == p36  # the built-in relation through its Wikidata id
    assert "[Y] borders with" in reverse_templates("P47")
    for relation in ("P101", "P106", "P19", "official-language"):
        assert relation not in SYMMETRIC_RELATIONS
        with pytest.raises(NoSymmetryError, match="no symmetric or bijective reading"):
            reverse_templates(relation)


def test_symmetry_probes_ask_the_reverse_of_the_new_and_the_old_object():
    req = symmetry_request(FRANCE, ITALY, templates=REVERSE)
    assert req.new_target == " rome"
    sym = [(p.prompt, p.target_true, p.target_new) for p in req.probes if p.group == "symmetry"]
    old = [(p.prompt, p.target_true, p.target_new) for p in req.probes if p.group == "symmetry_old"]
    assert sym == [("rome is the capital of", " italy", " france"), ("rome is the capital city of", " italy", " france")]
    assert old == [("paris is the capital of", " france", None), ("paris is the capital city of", " france", None)]


def test_symmetry_is_scored_both_ways_from_the_raw_rows(model):
    req = symmetry_request(FRANCE, ITALY, templates=REVERSE, neighbours=[SPAIN])
    ev = evaluate_edits(model, [req], {"kn": _kn(model)}, n_text=0)
    f = ev.frame
    sym, old = f[f.group == "symmetry"], f[f.group == "symmetry_old"]
    assert len(sym) == len(old) == 2
    assert old.nll_new_after.isna().all() and old.nll_true_after.notna().all()  # no new object on the old fact
    m = ev.metrics().set_index("metric")["mean"]
    assert m["symmetry"] == pytest.approx(sym.acc_new_after.mean())
    assert m["symmetry_pn"] == pytest.approx((sym.nll_new_after < sym.nll_true_after).mean())
    assert m["symmetry_old"] == pytest.approx(old.acc_true_after.mean())
    assert not (sym.nll_new_after == sym.nll_new_before).all()  # the edit reached the reverse prompts' readings
    values = criterion_values(model, req, _kn(model))
    assert values["symmetry_pn"] == pytest.approx(m["symmetry_pn"])
    assert values["reliability_before"] == 0.0


def test_synonym_probes_map_both_objects_through_the_table():
    fact = Fact(["Marie Curie works in the field of"], " physics", subject="Marie Curie", relation="P101")
    req = synonym_request(fact, " mathematics")
    assert [(p.group, p.prompt, p.target_true, p.target_new) for p in req.probes] == [
        ("synonym", "Marie Curie is a famous", " physicist", " mathematician")]
    assert synonym_of("P101", " chemistry") == " " + FIELD_OCCUPATION["chemistry"]
    with pytest.raises(TargetError, match="no entry"):
        synonym_request(fact, " knitting")
    with pytest.raises(FactError, match="no synonymous reading"):
        synonym_request(FRANCE, " rome")


def test_synonym_invariance_through_any_synonymous_template(model):
    req = synonym_request(LANG, " german", templates=["[X] speaks"])  # no table: the objects themselves
    ev = evaluate_edits(model, [req], {"kn": _kn(model, LANG)}, n_text=0)
    syn = ev.frame[ev.frame.group == "synonym"]
    assert list(syn.prompt) == ["france speaks"] and list(syn.target_new) == [" german"]
    m = ev.metrics().set_index("metric")
    assert {"synonym", "synonym_pn"} <= set(m.index)
    assert m.loc["synonym_pn", "mean"] == float(syn.nll_new_after.iloc[0] < syn.nll_true_after.iloc[0])


def test_key_at_the_relation_reads_the_last_token_outside_the_subject(model, cov):
    assert key_position(model, "the capital of france is", "france", "relation") == 5  # "is" (BOS at 0)
    assert key_position(model, "the capital of france", "france", "relation") == 3  # subject last: "of"
    edit = rank_one_edit(model, FRANCE, " rome", layer=0, covariance=cov, steps=3, key_at="relation")
    q = knlens.encode(model, [FRANCE.prompts[0]], " rome")
    act = activations_at(model, q, ["blocks.0.mlp.hook_post"])["blocks.0.mlp.hook_post"][0]  # at the last token
    torch.testing.assert_close(edit.params["key"], act.float(), atol=1e-5, rtol=1e-5)
    assert edit.params["key_at"] == "relation"
    torch.testing.assert_close(edit.params["key"] @ edit.slices[0].new.T, edit.params["value"], atol=1e-4, rtol=1e-4)


def test_entity_and_relation_edits_of_one_fact_with_the_same_metrics(model, cov):
    req = EditRequest(FRANCE, " rome", [SPAIN], relation_probes(FRANCE, " rome", word=" capital", none=" dog"))
    ev = evaluate_edits(model, [req], entity_relation_editors(layer=0, covariance=cov, steps=5), n_text=0)
    m = ev.metrics()
    assert set(m.editor) == {"entity", "relation"}
    per = m.groupby("editor").metric.apply(set)
    assert per["entity"] == per["relation"] >= {"reliability", "locality", "relation", "relation_old",
                                                 "relation_margin"}
    rel = ev.frame[ev.frame.group == "relation"]
    assert list(rel.target_new.unique()) == [" capital"] and list(rel.target_true.unique()) == [" dog"]
    margin = m.set_index(["editor", "metric"]).loc[("entity", "relation_margin"), "mean"]
    row = rel[rel.editor == "entity"].iloc[0]
    assert margin == pytest.approx(row.nll_true_after - row.nll_new_after)
    keys = {k: ev.edits.loc[ev.edits.editor == k, "delta_norm"].item() for k in ("entity", "relation")}
    assert keys["entity"] != keys["relation"]  # two different edits of the same fact


BAD = {
    "relation without symmetric pairs": (NoSymmetryError, lambda m: criterion_values(
        m, symmetry_request(LANG, Fact(["the official language of spain is"], " spanish", subject="spain",
                                       relation="P37")), rank_one_editor(layer=0))),
    "no reverse templates": (NoSymmetryError, lambda m: symmetry_request(FRANCE, ITALY, templates=[])),
    "counterpart of another relation": (FactError, lambda m: symmetry_request(FRANCE, LANG, templates=REVERSE)),
    "synonyms equal": (TargetError, lambda m: synonym_request(LANG, " german", templates=["[X] speaks"],
                                                              table={"french": "euro", "german": "euro"})),
    "no relation word": (FactError, lambda m: relation_probes(Fact(["a b"], " c", subject="a"), " d")),
    "probe in a request's own group": (SettingsError, lambda m: Probe("locality", "the dog", " cat")),
    "key_at relation, prompt is the subject": (PromptError, lambda m: rank_one_edit(
        m, Fact(["france"], " paris", subject="france"), " rome", layer=0, covariance=torch.eye(48),
        key_at="relation")),
    "λ non-finite (rank-one lr)": (NonFiniteError, lambda m: rank_one_edit(m, FRANCE, " rome", layer=0,
                                                                           lr=float("nan"))),
    "λ non-finite (KN, through criterion_values)": (NonFiniteError, lambda m: criterion_values(
        m, symmetry_request(FRANCE, ITALY, templates=REVERSE),
        kn_update_editor(lambda r: NeuronSet([(1, 3)]), lambda2=math.inf))),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_specific_error_and_leaves_weights_intact(model, case):
    error, build = BAD[case]
    start = fingerprint(model)
    with pytest.raises(error):
        build(model)
    assert fingerprint(model) == start


@pytest.mark.integration
def test_synonymous_invariance_follows_an_entity_edit_on_the_embedded_model(real_model, tmp_path):
    """Two P101 facts SmolLM2-135M answers, each rewritten to the other's field: after the rank-one edit from the
    subject, "s is a famous" prefers the new field's occupation over the old one's."""
    from knlens.methods.editing.covariance import key_covariance

    facts = [Fact(["Hans Bethe works in the field of"], " physics", subject="Hans Bethe", relation="P101"),
             Fact(["Hypatia works in the field of"], " mathematics", subject="Hypatia", relation="P101")]
    assert knlens.answers(real_model, facts[0]).all() and knlens.answers(real_model, facts[1]).all()
    cov = key_covariance(real_model, 4, n_texts=300, cache_dir=tmp_path)
    editor = entity_relation_editors(layer=4, covariance=cov)["entity"]  # the relation key: docs/methods.md
    entity = [criterion_values(real_model, synonym_request(f, other.target), editor)
              for f, other in zip(facts, facts[::-1])]
    for f, v in zip(facts, entity):
        print(f"\n{f.subject}: reliability {v['reliability']:.2f}, synonym {v['synonym_before']:.2f} -> "
              f"{v['synonym']:.2f}, synonym_pn {v['synonym_pn_before']:.2f} -> {v['synonym_pn']:.2f}")
    assert all(v["reliability"] == 1.0 for v in entity)
    assert all(v["synonym_pn_before"] == 0.0 for v in entity)  # before: the old field's occupation wins
    assert sum(v["synonym_pn"] for v in entity) > sum(v["synonym_pn_before"] for v in entity)
