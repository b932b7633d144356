"""The editing evaluation (knlens/methods/editing/evaluate.py): the field's conventions computed from raw
per-prompt quantities, intervals over facts, editors and controls, weights intact after any failure; and the
integration test on the embedded model: the rank-one editor beats random neurons of the same norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import knlens
from knlens import Fact, NeuronSet
from knlens.core.errors import DataNotFoundError, SameTargetError, SettingsError
from knlens.data.builtin import builtin_facts
from knlens.data.text import text_sample
from knlens.methods.editing.covariance import key_covariance
from knlens.methods.editing.edit import fingerprint
from knlens.methods.editing.editors import (EditRequest, consistency_editors, kn_erase_editor, kn_update_editor,
                                            random_editor, rank_one_editor)
from knlens.methods.editing.evaluate import evaluate_edits, text_nll
from knlens.methods.known import known_facts
from knlens.stats.intervals import bootstrap_ci

FRANCE = Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france",
              name="capital-france")
GERMANY = Fact(["the capital of germany is", "the capital city of germany is"], " berlin", subject="germany",
               name="capital-germany")
ITALY = Fact(["the capital of italy is"], " rome", name="capital-italy")
TEXTS = ["the dog is in paris", "this cat speaks french", "the river of spain is in madrid"]
REQUESTS = [EditRequest(FRANCE, " berlin", (ITALY, GERMANY)), EditRequest(GERMANY, " rome", (ITALY, FRANCE))]
KN = {"capital-france": NeuronSet([(1, 3), (1, 5)]), "capital-germany": NeuronSet([(1, 7)])}


def evaluation(model):
    cov = key_covariance(model, 0, TEXTS + ["the capital of japan is tokyo"], cache_dir=False)
    editors = {"kn": kn_update_editor(KN), "kn-random": random_editor("kn"),
               "rank-one": rank_one_editor(layer=0, covariance=cov, steps=5),
               "rank-one-random": random_editor("rank-one", n_neurons=4), "erase": kn_erase_editor(KN)}
    return evaluate_edits(model, REQUESTS, editors, text=TEXTS)


@pytest.fixture(scope="module")
def ev(tiny_llama):
    return evaluation(tiny_llama)


def test_rows_hold_raw_quantities_per_group(ev):
    f = ev.frame
    assert set(f.group) == {"reliability", "generality", "locality"}
    assert len(f) == 5 * 2 * (1 + 1 + 3)  # editors × facts × (edit prompt, paraphrase, neighbours' prompts)
    before = f.groupby(["fact", "group", "prompt"])["nll_new_before"].nunique()
    assert (before == 1).all(), "every editor starts from the same unedited model"
    for c in ("acc_true_after", "acc_new_after", "agreement"):
        assert f[c].between(0, 1).all()
    same = f.argmax_true_before == f.argmax_true_after
    assert np.array_equal(f.agreement.to_numpy() == 1.0, same.to_numpy())


def test_metrics_reduce_the_rows_by_each_convention(ev):
    m = ev.metrics().set_index(["editor", "metric"])
    f = ev.frame
    rel = f[(f.group == "reliability") & (f.editor == "kn")]
    assert m.loc[("kn", "reliability"), "mean"] == pytest.approx(rel.acc_new_after.mean())
    assert m.loc[("kn", "reliability_es"), "mean"] == pytest.approx((rel.nll_new_after < rel.nll_true_after).mean())
    loc = f[(f.group == "locality") & (f.editor == "rank-one")]
    per_fact = loc.groupby("fact").agreement.mean()
    assert m.loc[("rank-one", "locality"), "mean"] == pytest.approx(per_fact.mean())
    assert m.loc[("rank-one", "locality"), "before"] == 1.0
    assert set(m.index.get_level_values("metric")) == {"reliability", "reliability_es", "generality", "generality_ps",
                                                       "locality", "locality_gold", "locality_ns",
                                                       "perplexity_change"}
    assert (m.n_facts == 2).all() and (m.ci_low <= m["mean"] + 1e-12).all() and (m["mean"] <= m.ci_high + 1e-12).all()
    assert set(ev.table().columns) >= {"editor", "reliability", "locality"}


def test_controls_have_the_norm_of_their_edit_and_fluency_is_measured(ev):
    e = ev.edits.set_index(["fact", "editor"])
    for fact in ("capital-france", "capital-germany"):
        assert e.loc[(fact, "kn-random"), "delta_norm"] == pytest.approx(e.loc[(fact, "kn"), "delta_norm"], rel=1e-5)
        assert e.loc[(fact, "rank-one-random"), "delta_norm"] == pytest.approx(
            e.loc[(fact, "rank-one"), "delta_norm"], rel=1e-5)
    fl = ev.fluency
    assert len(fl) == 10 and (fl.ppl_before == fl.ppl_before.iloc[0]).all() and (fl.ppl_after != fl.ppl_before).all()
    assert ev.compare("kn", "kn-random")["n_units"] == 2


def test_evaluation_leaves_the_weights_and_fails_cleanly(tiny_llama):
    start = fingerprint(tiny_llama)
    evaluation(tiny_llama)
    assert fingerprint(tiny_llama) == start

    def failing(model, request, made):
        raise SettingsError("editor failed")
    with pytest.raises(SettingsError, match="editor failed"):
        evaluate_edits(tiny_llama, REQUESTS, {"kn": kn_update_editor(KN), "bad": failing}, text=TEXTS)
    with pytest.raises(SettingsError, match="needs the editor"):
        evaluate_edits(tiny_llama, REQUESTS, {"random": random_editor("kn")}, n_text=0)
    assert fingerprint(tiny_llama) == start


def test_a_request_needs_a_new_object():
    with pytest.raises(SameTargetError):
        EditRequest(FRANCE, "paris ")


def test_consistency_aware_editing_compares_sets_of_equal_size(tiny_llama):
    attrs = {f.name: knlens.attribute(tiny_llama, f, steps=2, tolerance=None) for f in (FRANCE, GERMANY)}
    editors = consistency_editors(attrs, 3)
    ev = evaluate_edits(tiny_llama, REQUESTS, editors, n_text=0)
    assert set(ev.frame.editor) == {"kn-query", "kn-mean", "kn-consistency-aware"}
    assert len(ev.fluency) == 0 and "perplexity_change" not in set(ev.metrics().metric)
    assert set(ev.edits.n_changed) == {3 * tiny_llama.cfg.d_model}  # exactly 3 value vectors for every selection


def test_text_nll_counts_every_token_after_the_first(tiny_gpt2):
    total, n = text_nll(tiny_gpt2, ["the dog", "the capital of france"])
    assert n == 2 + 4 and math.isfinite(total) and total > 0


def test_bootstrap_interval():
    low, high = bootstrap_ci([0.1, 0.5, 0.9, 0.3, 0.7])
    assert low < 0.5 < high
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([0.3]))


def test_text_sample_parts_are_disjoint():
    try:
        a, b = text_sample(200, part=0), text_sample(200, part=1)
    except DataNotFoundError as err:
        pytest.skip(f"no data folder: {err}")
    assert len(a) == len(b) == 200 and not set(a) & set(b)
    assert text_sample(200, part=0) == a and text_sample(200, part=0, seed=1) != a


def _counterfacts(facts, n):
    """Up to ``n`` requests: each fact rewritten to another fact's object of its relation, the relation's other
    facts as neighbours (CounterFact's recipe, on facts the model knows)."""
    requests = []
    for fact in facts:
        same = [g for g in facts if g.relation == fact.relation and g is not fact]
        other = next((g.target for g in same if g.target.strip() != fact.target.strip()), None)
        if other is not None and len(requests) < n:
            requests.append(EditRequest(fact, other, tuple(same[:2])))
    return requests


@pytest.mark.integration
def test_rank_one_beats_random_neurons_of_the_same_norm(real_model, tmp_path):
    facts = known_facts(real_model, builtin_facts(), keep_prompts="correct", min_prompts=2)
    requests = _counterfacts(facts, 5)
    assert len(requests) >= 5, f"only {len(requests)} known facts with another object in their relation"
    layer = 4
    cov = key_covariance(real_model, layer, n_texts=300, cache_dir=tmp_path)
    editors = {"rank-one": rank_one_editor(layer=layer, covariance=cov),
               "random": random_editor("rank-one", n_neurons=10)}
    ev = evaluate_edits(real_model, requests, editors, n_text=20)
    m = ev.metrics().set_index(["editor", "metric"])
    print(f"\nrank-one (layer {layer}) vs random neurons of the same norm over {len(requests)} known facts "
          f"(mean [95% bootstrap CI over facts]):")
    print(ev.table().to_string(index=False))
    print(ev.edits[["fact", "editor", "delta_norm"]].to_string(index=False))
    rank, rand = m.loc[("rank-one", "reliability"), "mean"], m.loc[("random", "reliability"), "mean"]
    assert rank > rand
    assert m.loc[("rank-one", "reliability_es"), "mean"] > m.loc[("random", "reliability_es"), "mean"]
    assert ev.compare("rank-one", "random", "reliability")["difference"] > 0
