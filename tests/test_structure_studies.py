"""``knlens study qrnca`` and ``knlens study twostage`` end to end on hand-written facts the tiny random Llama can
read: every table present and consistent with the others, the pages rendered with their sections, the results saved
and loaded back equal."""

from __future__ import annotations

import pandas as pd
import pytest

from knlens import Fact
from knlens.studies.qrnca_study import QRNCAStudy, QRNCAStudySettings, qrnca_study
from knlens.studies.two_stage_study import TwoStageStudy, TwoStageStudySettings, two_stage_study
from knlens.viz import qrnca_page, two_stage_page

COUNTRIES = ("france", "germany", "italy", "spain", "japan", "china")
CAPITALS = ("paris", "berlin", "rome", "madrid", "tokyo", "beijing")
LANGUAGES = ("french", "german", "italian", "spanish", "japanese", "chinese")
LETTERS = ("a", "the", "of", "in")  # single tokens of the tiny vocabulary (A-D are not)


def _facts() -> list[Fact]:
    capitals = [Fact([f"the capital of {c} is", f"the capital city of {c} is", f"{c} capital is"], f" {o}",
                     subject=c, relation="P36", name=f"P36-{c}") for c, o in zip(COUNTRIES, CAPITALS)]
    languages = [Fact([f"the official language of {c} is", f"the language of {c} is"], f" {o}", subject=c,
                      relation="P37", name=f"P37-{c}") for c, o in zip(COUNTRIES, LANGUAGES)]
    return capitals + languages


@pytest.fixture(scope="module")
def qrnca(tiny_llama):
    # 2 queries a domain (4 in all: a neuron in one cluster is under the common share), 1 template: PCR measures every
    # set (4 methods x 2 domains) on every prompt, the bulk of the time
    settings = QRNCAStudySettings(model="tiny-llama", relations=("P36", "P37"), queries=2, n_templates=1,
                                  max_prompts=2, steps=2, top_v=5, letters=LETTERS)
    return qrnca_study(tiny_llama, settings, facts=_facts())


@pytest.fixture(scope="module")
def twostage(tiny_llama):
    settings = TwoStageStudySettings(model="tiny-llama", relations=("P36", "P37"), facts=3, max_prompts=2,
                                     noise_samples=2, k=5, steps=2, n_random=2)
    return two_stage_study(tiny_llama, settings, facts=_facts())


# ----------------------------------------------------------------------------------------------- QRNCA

def test_qrnca_counts_queries_and_accuracy(qrnca):
    s, t, n = qrnca.settings, qrnca.tables, qrnca.numbers
    counts = t["counts"].set_index("relation")
    assert counts["read"].tolist() == counts["known"].tolist() == [6, 6]  # the given facts replace the filter
    assert counts["queries"].tolist() == [s.queries] * 2
    assert counts["objects (options drawn from)"].tolist() == [6, 6]
    assert n["queries"] == counts["queries"].sum() and n["mc prompts"] == n["queries"] * s.n_templates
    acc = t["mc_accuracy"]
    assert len(acc) == n["mc prompts"] and set(acc["template"]) == set(range(s.n_templates))
    assert acc["p_answer"].between(0.0, 1.0).all() and n["mc accuracy"] == pytest.approx(acc["correct"].mean())
    assert acc["query"].nunique() == n["queries"]
    assert set(acc["chosen"]) <= set(s.letters) and (acc["correct"] == (acc["chosen"] == acc["answer"])).all()


def test_qrnca_sets_neurons_and_regions(qrnca):
    s, t = qrnca.settings, qrnca.tables
    sets = t["sets"].set_index("domain")
    assert sets.index.tolist() == list(s.relations)
    assert (sets["QRNCA neurons"] == s.top_v).all() and (sets["KN neurons"] == s.top_v).all()
    assert sets["shared"].between(0, s.top_v).all()
    neurons = t["neurons"]
    assert neurons.groupby("query").size().le(s.top_v).all() and neurons["query"].nunique() == qrnca.numbers["queries"]
    common = set(t["common"]["neuron"])
    assert len(common) == qrnca.numbers["common neurons"]
    assert not common & {f"L{r.layer}.N{r.neuron}" for r in neurons.itertuples()}  # common neurons never kept
    assert set(qrnca.density) == set(s.relations)
    for rel, d in qrnca.density.items():  # each domain's region holds its queries' neurons, each counted once
        mine = neurons[neurons["query"].str.startswith(f"{rel}-")]
        assert int(d.sum()) == len(set(zip(mine.layer, mine.neuron)))


def test_qrnca_pcr_tables(qrnca):
    s, t = qrnca.settings, qrnca.tables
    methods = {"QRNCA", "KN", "random", "random (matched)"}
    pooled, by_domain = t["pcr"], t["pcr_by_domain"]
    assert qrnca.to_frame() is pooled
    assert set(zip(pooled.method, pooled.action)) == {(m, a) for m in methods for a in ("boost", "suppress")}
    assert len(by_domain) == len(methods) * len(s.relations) * 2
    prompts = qrnca.numbers["mc prompts"] / len(s.relations)  # the same number of queries in each domain
    assert (by_domain["n_related"] == prompts).all() and (by_domain["n_unrelated"] == prompts).all()
    for table in (pooled, by_domain):
        assert table["pcr"].tolist() == pytest.approx((table.related_dp.abs() / table.unrelated_dp.abs()).tolist())
    assert pooled.set_index(["method", "action"]).loc[("QRNCA", "suppress"), "paper (Llama-2-7B-chat)"] == 5.6
    engines = t["engines"].set_index("engine").rows  # every row of boost / suppress ran on an engine, recorded
    assert engines.sum() == by_domain.n_related.sum() + by_domain.n_unrelated.sum()
    overlap = t["overlap"].set_index("domain")
    assert [overlap.loc[d, d] for d in s.relations] == [s.top_v] * 2 and overlap.loc["P36", "P37"] == overlap.loc["P37", "P36"]


def test_qrnca_page_and_round_trip(qrnca, tmp_path):
    page = qrnca_page.render_markdown(qrnca)
    assert page.startswith("# QRNCA: query-relevant neurons by NA-ICA")
    for section in ("## Headline", "## Facts surviving each filter", "## PCR (pooled over the relations) beside the paper",
                    "## PCR per domain", "## The domain sets", "## Localised regions", "## Multiple-choice accuracy",
                    "## The papers' claims", "## Limitations", "## Timings (s)", "- P36: lower / middle / upper"):
        assert section in page
    assert f"{int(qrnca.numbers['queries'])} known facts (queries) over 2 relations" in page
    back = QRNCAStudy.load(qrnca.save(tmp_path / "qrnca"))
    assert back == qrnca and back.settings.letters == LETTERS
    pd.testing.assert_frame_equal(back.tables["pcr"], qrnca.tables["pcr"])


# --------------------------------------------------------------------------------------------- two-stage

def test_two_stage_counts_and_facts(twostage, tiny_llama):
    s, t, n = twostage.settings, twostage.tables, twostage.numbers
    counts = t["counts"].set_index("relation")
    assert counts["read"].tolist() == counts["known"].tolist() == [6, 6]
    assert (counts["single-token object"] <= counts["known"]).all()
    assert counts["single-token object"].tolist() == [6, 6]  # every object is one word of the tiny vocabulary
    assert counts["studied"].tolist() == [2, 1]  # round robin over the relations, up to s.facts
    facts = t["facts"]
    assert len(facts) == n["facts"] == counts["studied"].sum()
    assert n["compared"] + n["empty"] == n["facts"] and (facts["error"] != "").sum() == n["empty"]
    ok = facts[facts["error"] == ""]
    assert len(ok) == n["compared"] > 0
    assert ok["k"].between(1, s.k).all() and (ok["k"] <= ok["stage 2"]).all() and (ok["stage 2"] <= ok["stage 1"]).all()
    assert (ok["shared"] >= 0).all() and (ok["shared"] <= ok["k"]).all() and ok["jaccard"].between(0.0, 1.0).all()
    assert (ok["stage-1 ∩ IG top-k"] >= ok["shared"]).all() and (ok["stage-1 ∩ IG top-k"] <= s.k).all()
    assert ok["two-stage per neuron"].tolist() == pytest.approx((ok["two-stage suppress"] / ok["k"]).tolist())
    assert (ok["prompts"] <= s.max_prompts).all()
    assert (ok["IG cells"] == ok["prompts"] * tiny_llama.cfg.n_layers * s.steps).all()
    assert ok[["two-stage suppress", "IG suppress"]].ge(-1.0).all().all()  # a relative change of a probability


def test_two_stage_comparison_page_and_round_trip(twostage, tmp_path):
    t = twostage.tables
    ok = t["facts"][t["facts"]["error"] == ""]
    comparison = twostage.to_frame().set_index("quantity")
    for q in ("stage 1", "stage 2", "shared", "jaccard", "two-stage suppress", "IG suppress"):
        assert comparison.loc[q, "mean"] == pytest.approx(ok[q].mean())
        assert comparison.loc[q, "facts"] == len(ok)
    page = two_stage_page.render_markdown(twostage)
    assert page.startswith("# The two-stage filter against integrated gradients")
    for section in ("## Headline", "## Facts surviving each filter", "## Comparison (over facts)", "## Per fact",
                    "## The claims", "## Limitations", "## Timings (s)"):
        assert section in page
    assert f"{int(twostage.numbers['compared'])} of {int(twostage.numbers['facts'])} facts compared" in page
    back = TwoStageStudy.load(twostage.save(tmp_path / "twostage"))
    assert back == twostage
    pd.testing.assert_frame_equal(back.tables["facts"], t["facts"])
