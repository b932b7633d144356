"""The editing study (knlens/studies/editing_cases.py, editing_study.py; the page in knlens/viz/editing_page.py):
facts counted at each filter, every editor on every fact, Niu et al.'s criteria and the relation question on every
editor that defines them, no-op edits as errors, the budget, the page; and a short real run on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from knlens import Fact, NeuronSet
from knlens.core.errors import InsufficientDataError, NoOpEditError, SettingsError
from knlens.core.models import TINY_VOCAB
from knlens.data.pararel import default_data_dir
from knlens.methods.editing.edit import fingerprint, make_edit
from knlens.methods.editing.editors import EditRequest
from knlens.studies.editing_cases import (COUNT_COLUMNS, EditingSettings, counterfactual_cases, interleave,
                                          select_cases)
from knlens.studies.editing_probes import with_criteria
from knlens.studies.editing_study import EDITORS, NOT_DEFINED, EditingStudy, editing_study, run_cases
from knlens.viz.editing_criteria_page import KN_EDITORS, NO_KEY
from knlens.viz.editing_page import render_markdown

TINY = EditingSettings(model="tiny-llama", steps=2, n_text=3, covariance_texts=20, rank_one_steps=2,
                       control_neurons=4, rank_one_layer=0, neighbours=2)
COUNTRIES = ("france", "spain", "italy", "japan", "germany", "china")


def _greedy(model, prompt: str) -> str:
    return TINY_VOCAB[int(model(model.to_tokens(prompt))[0, -1].argmax())]


def _known(model, template: str, relation: str) -> list[Fact]:
    """Facts the tiny model knows: one prompt (twice, so it counts as two known paraphrases), its greedy word."""
    out = []
    for c in COUNTRIES:
        p = template.format(c)
        word = _greedy(model, p)
        if word not in ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]") and word not in p.split():
            out.append(Fact([p, p], f" {word}", subject=c, relation=relation, name=f"{relation}-{c}"))
    return out


@pytest.fixture(scope="module")
def candidates(tiny_llama):
    known = _known(tiny_llama, "the capital of {} is", "P36")
    objects = {f.target for f in known}
    assert len(known) >= 4 and len(objects) >= 2, "the tiny model's greedy answers do not make a usable relation"
    unknown = [Fact([f"the capital city of {c} is"] * 2, f" {w}", subject=c, relation="P36", name=f"P36-x-{c}")
               for c, w in (("france", "paris"), ("spain", "madrid"))
               if _greedy(tiny_llama, f"the capital city of {c} is") != w]
    same = _known(tiny_llama, "the currency of {} is", "P38")
    same = [f for f in same if f.target == same[0].target][:2]  # two known facts with one object: nothing to edit to
    return {"P36": known + unknown, "P38": same}, len(known), len(unknown), len(same)


def test_each_filter_is_counted(tiny_llama, candidates):
    facts, n_known, n_unknown, n_same = candidates
    cases, counts = select_cases(tiny_llama, facts, TINY)
    c = counts.set_index("relation")
    assert list(counts.columns) == ["relation", "templates", *COUNT_COLUMNS]
    assert c.loc["P36", "read"] == n_known + n_unknown and c.loc["P36", "known"] == n_known
    assert c.loc["P36", "single-token object"] == n_known
    assert c.loc["P38", "known"] == n_same and c.loc["P38", "with a new object"] == 0
    assert c.loc["P38", "with neighbours"] == 0
    assert len(cases) == c["with neighbours"].sum() and {x.relation for x in cases} == {"P36"}
    for case in cases:
        r = case.request
        assert r.new_target != r.fact.target and all(n.target != r.new_target for n in r.neighbours)


def test_no_surviving_fact_is_an_error(tiny_llama, candidates):
    with pytest.raises(InsufficientDataError, match="no fact survived"):
        select_cases(tiny_llama, {"P38": candidates[0]["P38"]}, TINY)


def test_cases_alternate_between_relations():
    assert interleave([["a1", "a2"], ["b1", "b2", "b3"], []]) == ["a1", "b1", "a2", "b2", "b3"]


REVERSE = {"P36": ["[Y] is the capital of"]}


@pytest.fixture(scope="module")
def study(tiny_llama, candidates):
    cases, counts = select_cases(tiny_llama, candidates[0], TINY)
    cases, criteria = with_criteria(tiny_llama, cases, templates=REVERSE)
    settings = EditingSettings(**{**TINY.__dict__, "max_facts": 3})
    start = fingerprint(tiny_llama)
    ev, facts, generic = run_cases(tiny_llama, cases, settings)
    assert fingerprint(tiny_llama) == start
    counts["studied"] = [3, 0]
    criteria["studied"] = 3
    return EditingStudy(settings, {"counts": counts, "facts": facts, "generic": generic, "criteria": criteria},
                        evaluation=ev, numbers={"facts": 3.0, "cases": float(len(cases)),
                                                "located": float(generic.located.sum()), "skipped": 0.0, "refined": 0.0,
                                                "mean_neurons": float(facts.n_neurons.mean()), "shared_neurons": 0.0,
                                                "mean_seconds_per_fact": 1.0},
                        timings={"filter": 1.0, "total": 2.0})


def test_every_editor_and_metric_is_one_row_with_an_interval(study):
    m = study.evaluation.metrics()
    assert set(m.editor) == set(EDITORS)
    criteria = {"symmetry", "symmetry_pn", "symmetry_old"}  # P36: no synonymous reading; the tiny model has no " None"
    assert {"reliability", "reliability_es", "generality", "generality_ps", "locality", "locality_gold", "locality_ns",
            "perplexity_change", "reliability_old"} | criteria == set(m.metric)
    c = study.tables["criteria"].set_index("relation").loc["P36"]
    assert (c.symmetry, c.synonym, c["relation question"]) == (c.cases, 0, 0) and "' None'" in c["why not"]
    sym = study.evaluation.frame.query("group == 'symmetry'")
    assert sym.prompt.str.endswith("is the capital of").all() and set(sym.editor) == set(EDITORS)
    assert (m.n_facts == 3).all() and len(study.tables["facts"]) == 3
    for (editor, metric) in NOT_DEFINED:  # erase writes no new object: no symmetry value, only the old fact's fate
        assert m[(m.editor == editor) & (m.metric == metric)].empty
    assert not m[(m.editor == "kn-erase") & (m.metric == "symmetry_old")].empty
    edits = study.evaluation.edits.set_index(["fact", "editor"])
    for fact in study.tables["facts"].fact:
        for a, b in (("random-kn", "kn-update"), ("random-rank-one", "rank-one")):
            assert edits.loc[(fact, a), "delta_norm"] == pytest.approx(edits.loc[(fact, b), "delta_norm"], rel=1e-5)
    sizes = study.tables["facts"].set_index("fact")
    assert (sizes.n_neurons == [len(s.split()) for s in sizes.neurons]).all()


def test_the_study_saves_loads_and_writes_its_page(study, tmp_path):
    loaded = EditingStudy.load(study.save(tmp_path / "saved"))
    assert loaded == study
    pd.testing.assert_frame_equal(loaded.evaluation.metrics(), study.evaluation.metrics())
    page = render_markdown(study)
    for heading in ("## Headline", "## Facts", "## Editors", "## Metrics", "## The papers' numbers beside ours",
                    "## Per fact", "## Limitations"):
        assert heading in page
    assert "**3 facts** edited (P36 3)" in page and "EXTRA_CRITERIA" not in page
    assert "not defined: kn-erase writes no new object" in page and page.count(NO_KEY) == len(KN_EDITORS)
    assert "no studied fact allows it" in page  # synonymous invariance: P36 has no synonymous reading
    assert "| P36 | " + " | ".join(map(str, study.tables["criteria"].iloc[0, 1:5])) in page


def test_an_edit_that_changes_no_weight_is_an_error(tiny_llama, candidates):
    cases, _ = select_cases(tiny_llama, candidates[0], TINY)
    name = "lm_head._original_component.weight"

    def noop(*_):
        def editor(model, request, made):
            same = dict(model.named_parameters())[name].detach()[:1].clone()
            return make_edit(model, "noop", {}, [(name, 0, torch.tensor([0]), same)])
        return {"noop": editor}

    start = fingerprint(tiny_llama)
    with pytest.raises(NoOpEditError, match="does not change any weight"):
        run_cases(tiny_llama, cases, TINY, editors=noop)
    with pytest.raises(SettingsError, match="not an Edit"):
        run_cases(tiny_llama, cases, TINY, editors=lambda *_: {"none": lambda m, r, made: None})
    assert fingerprint(tiny_llama) == start


def test_the_budget_and_the_cap_bound_the_facts(tiny_llama, candidates):
    cases, _ = select_cases(tiny_llama, candidates[0], TINY)
    with pytest.raises(InsufficientDataError, match="budget ran out"):
        run_cases(tiny_llama, cases, EditingSettings(**{**TINY.__dict__, "budget_minutes": 1e-9}))
    ev, facts, _ = run_cases(tiny_llama, cases, EditingSettings(**{**TINY.__dict__, "max_facts": 1}))
    assert len(facts) == 1 and set(ev.metrics().n_facts) == {1}


def test_settings_refuse_what_cannot_be_studied():
    with pytest.raises(SettingsError, match="min_prompts"):
        EditingSettings(min_prompts=1)
    with pytest.raises(SettingsError, match="budget_minutes"):
        EditingSettings(budget_minutes=0.0)


def test_counterfactual_needs_another_object():
    a = Fact(["the capital of france is"], " paris", subject="france", relation="P36", name="a")
    b = Fact(["the capital of spain is"], " paris", subject="spain", relation="P36", name="b")
    assert counterfactual_cases([a, b]) == []


@pytest.mark.integration
def test_a_short_real_run(real_model):
    if not Path(default_data_dir()).exists():
        pytest.skip("ParaRel data not found beside the repository")
    settings = EditingSettings(relations=("P36",), candidates=15, max_facts=1, max_located=2, steps=2,
                               rank_one_steps=3, n_text=3, covariance_texts=50, neighbours=1, max_prompts=2)
    result = editing_study(real_model, settings)
    counts = result.tables["counts"]
    assert int(counts.studied.sum()) == int(result.numbers["facts"]) == 1 and int(counts.located.sum()) == 2
    assert (counts.known <= counts.read).all() and (counts["with neighbours"] <= counts.known).all()
    m = result.evaluation.metrics()
    assert set(m.editor) == set(EDITORS) and (m.n_facts == 1).all()
    print("\n" + result.evaluation.table().to_string(index=False))
    assert "## Headline" in render_markdown(result)


def test_generic_neurons_are_those_of_more_than_one_located_fact():
    from knlens.studies.editing_cases import EditCase
    from knlens.studies.editing_study import _generic, _Located, _sets

    def located(rel, name, pairs, refined=True):
        fact = Fact(["the capital of france is"], " paris", name=name)
        scores = torch.arange(30.0).reshape(1, 3, 10).expand(2, -1, -1)  # [prompt, layer, neuron], all positive
        return _Located(EditCase(EditRequest(fact, " rome"), rel), scores, NeuronSet(pairs), refined, 0.0)

    xs = [located("R", "a", [(0, 1), (1, 2)]), located("R", "b", [(0, 1), (1, 3)]),
          located("R", "c", [(0, 1), (2, 4)]), located("S", "d", [(0, 1)])]
    generic, table = _generic(xs, 0.1)
    assert generic["R"] == NeuronSet([(0, 1)]) and generic["S"] == NeuronSet()  # one fact: nothing is generic
    assert table.set_index("relation").loc["R", "most frequent"] == "L0.N1 (3)"
    sets, source = _sets(xs[0], generic["R"], 3)
    assert sets["kn"] == NeuronSet([(1, 2)]) and sets["raw"] == xs[0].raw and source == "refined"
    assert len(sets["aware"]) == 1 and not sets["aware"] & generic["R"]
    only_generic = located("R", "e", [(0, 1)])
    sets, source = _sets(only_generic, generic["R"], 3)  # nothing left: the top 3 non-generic by mean attribution
    assert source == "top 3 mean" and len(sets["kn"]) == 3 and not sets["kn"] & generic["R"]


def test_the_counterpart_has_another_subject():
    """A symmetric relation holds several facts per subject: the new object comes from another subject's fact, whose
    subject the reverse prompts expect before the edit."""
    a = Fact(["france borders"], " spain", subject="france", relation="P47", name="a")
    b = Fact(["france borders"], " italy", subject="france", relation="P47", name="b")
    c = Fact(["germany borders"], " poland", subject="germany", relation="P47", name="c")
    got = {x.request.name: (x.request.new_target, x.counterpart.name) for x in counterfactual_cases([a, b, c])}
    assert got == {"a": (" poland", "c"), "b": (" poland", "c"), "c": (" spain", "a")}


def test_criteria_say_why_a_relation_defines_none(tiny_llama):
    facts = [Fact([f"the capital of {c} is"], f" {t}", subject=c, relation="P17", name=c)
             for c, t in (("france", "paris"), ("italy", "rome"), ("spain", "madrid"))]
    cases, table = with_criteria(tiny_llama, counterfactual_cases(facts, neighbours=1))
    assert len(cases) == 3 and not any(x.request.probes for x in cases)
    row = table.iloc[0]
    assert (row.cases, row.symmetry, row.synonym, row["relation question"]) == (3, 0, 0, 0)
    assert "symmetry: relation 'P17' has no symmetric or bijective reading" in row["why not"]
