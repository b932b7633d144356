"""locate(): the tables it returns agree with each other and with direct computations (tiny models)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import knlens
from knlens import Fact, NeuronSet
from knlens.run.engine import target_probs
from knlens.run.hooks import hooked, neuron_hooks, scale
from knlens.studies.knowledge_neurons_result import LocateResult
from knlens.studies.knowledge_neurons import locate
from knlens.methods.activations import token_activations
from knlens.core.tokens import encode
from knlens.results.contract import same
from knlens.viz.html import remote_sources
from knlens.viz.report import render_html, write_html
from knlens.methods.selection import SelectionPreset

FACT = Fact(["the capital of france is", "the capital city of france is", "france capital city is"], " paris",
            name="tiny-capital")
# selection presets that force a non-empty / an empty refined set on any model
EVERY_PROMPTS_BEST = SelectionPreset(threshold=0.5, strict_threshold=False, p=0.0, min_count=1,
                                     strict_count=False, adaptive=False)
NOTHING = SelectionPreset(threshold=1.5, strict_threshold=True, p=1.0, min_count=99, strict_count=False,
                          adaptive=False)


@pytest.fixture(scope="module")
def results(tiny):
    """locate() on each tiny model (llama, gpt2, bert), once with a non-empty and once with an empty set."""
    kw = dict(steps=4, n_random=5, progress=False, specificity=False)
    return tiny, locate(tiny, FACT, preset=EVERY_PROMPTS_BEST, **kw), locate(tiny, FACT, preset=NOTHING, **kw)


def test_neuron_table_matches_the_attributions(results):
    model, res, _ = results
    n_prompts = len(FACT.prompts)
    assert len(res.attributions) == n_prompts and len(res.neurons) > 0 and res.tested == res.neurons
    table = res.to_frame()
    assert list(table.columns) == ["layer", "neuron", "mean_score", "n_coarse", "refined", "tested",
                                   "mean_activation"]
    assert not table.duplicated(["layer", "neuron"]).any()
    # every refined neuron is in the table and flagged; flagged rows are exactly the refined neurons
    flagged = NeuronSet(zip(table.loc[table.refined, "layer"], table.loc[table.refined, "neuron"]))
    assert set(flagged) == set(res.neurons)
    mean = torch.stack([a.scores for a in res.attributions]).mean(0)
    for row in table.itertuples():
        assert row.mean_score == pytest.approx(float(mean[row.layer, row.neuron]), rel=1e-5, abs=1e-9)
        assert 0 <= row.n_coarse <= n_prompts
        if row.refined:  # this preset refines the neurons coarse in ≥ 1 prompt
            assert row.n_coarse >= 1
    # the top-k by mean score are all there
    top = mean.flatten().topk(res.settings.top_k).indices
    d = mean.shape[1]
    assert {(int(i) // d, int(i) % d) for i in top} <= set(zip(table.layer, table.neuron))


def test_completeness_table_matches_the_attributions_and_the_model(results):
    model, res, _ = results
    comp = res.completeness
    assert comp["prompt"].tolist() == list(FACT.prompts)
    for a, row in zip(res.attributions, comp.itertuples()):
        assert row.abs_error == pytest.approx(float(a.completeness_error.sum()), rel=1e-6)
        assert row.relative_error == pytest.approx(a.relative_completeness_error, rel=1e-6)
        assert row.ig_sum == pytest.approx(float(a.scores.sum()), rel=1e-5, abs=1e-9)
    p = target_probs(model, encode(model, list(FACT.prompts), FACT.target))
    assert comp["p_target"].to_numpy() == pytest.approx(p.numpy(), rel=1e-4)
    assert res.p_target == pytest.approx(float(p.mean()), rel=1e-4)


def test_interventions_are_the_tested_neurons_scaled_at_the_target_position(results):
    model, res, _ = results
    frame = res.interventions.frame
    n_prompts, n_random = len(FACT.prompts), res.settings.n_random
    assert len(frame) == 2 * n_prompts * (1 + 2 * n_random)  # knowledge, uniform and matched draws
    assert set(frame["n_neurons"]) == {len(res.tested)}
    q = encode(model, list(FACT.prompts), FACT.target)
    for action, factor in (("suppress", 0.0), ("enhance", 2.0)):
        hooks = neuron_hooks(res.tested, lambda idx: scale(factor, idx, position=q.position))
        with hooked(model, []):  # nothing left attached by locate
            pass
        direct = target_probs(model, q, hooks)
        kn = frame[(frame.action == action) & (frame.neurons == "knowledge")]
        assert kn["p_after"].to_numpy() == pytest.approx(direct.numpy(), rel=1e-4, abs=1e-7)
    eff = res.effects()
    assert eff[["action", "neurons", "control"]].values.tolist() == [
        ["suppress", "knowledge", ""], ["suppress", "random", "uniform"], ["suppress", "random", "matched"],
        ["enhance", "knowledge", ""], ["enhance", "random", "uniform"], ["enhance", "random", "matched"]]
    assert eff["p_before"].to_numpy() == pytest.approx(res.p_target, rel=1e-4)
    tests = res.tests()
    emp = tests[tests.test.str.startswith("p_empirical")]
    assert len(emp) == 4 and ((emp.p > 0) & (emp.p <= 1) & (emp.p >= emp.p_floor - 1e-12)).all()
    assert (emp.p_floor == 1 / (1 + n_random)).all()
    wil = tests[tests.test.str.startswith("p_wilcoxon")]  # 3 prompts: never below 0.25, and it says so
    assert (wil.p_floor == 0.25).all() and wil.note.str.startswith("cannot reach p < 0.05 with 3 prompts").all()


def test_token_activations_agree_with_the_attribution_activations(results):
    model, res, _ = results
    assert len(res.activations) == len(FACT.prompts)
    for ta, a in zip(res.activations, res.attributions):
        assert ta.prompt == a.prompt and ta.neurons == res.tested
        assert ta.values.shape == (len(ta.tokens), len(res.tested))
        assert ta.tokens == tuple(model.to_str_tokens(encode(model, ta.prompt, FACT.target).tokens[0]))
        at_target = torch.tensor([float(a.activations[n.layer, n.index]) for n in res.tested])
        assert ta.values[ta.target_position] == pytest.approx(at_target, rel=1e-4, abs=1e-5)
        frame = ta.to_frame()
        assert list(frame.columns) == ["position", "token", *[str(n) for n in res.tested]]


def test_empty_refined_set_is_reported_and_the_best_neurons_are_tested(results):
    model, _, res = results
    assert res.refined_empty and len(res.neurons) == 0
    assert len(res.tested) == res.settings.fallback_k
    mean = res.mean_scores
    best = mean.flatten().topk(res.settings.fallback_k).indices
    d = mean.shape[1]
    assert set(res.tested) == {(int(i) // d, int(i) % d) for i in best}
    assert not res.table["refined"].any() and res.table["tested"].sum() == res.settings.fallback_k
    assert "no refined neurons" in res.tested_label
    assert "No refined knowledge neuron" in render_html(res)
    from knlens.cli.locate import format_result

    assert "No refined knowledge neuron" in format_result(res)


def test_save_load_round_trip_without_pickle(results, tmp_path):
    _, res, _ = results
    d = res.save(tmp_path / "out")  # 3 prompts and no specificity: no heldout.csv / specificity.csv
    assert {p.name for p in d.iterdir()} == {"result.json", "tensors.safetensors", "neurons.csv",
                                             "interventions.csv", "completeness.csv"}

    def no_nan(constant: str) -> None:
        raise AssertionError(f"result.json holds {constant}: not strict JSON")
    doc = json.loads((d / "result.json").read_text(), parse_constant=no_nan)
    fields = doc["result"]["fields"]
    assert doc["type"] == "knlens.studies.knowledge_neurons_result:LocateResult" and doc["key"] == res.key
    assert fields["fact"]["fields"]["target"] == " paris" and fields["settings"]["fields"]["steps"] == 4
    assert fields["neurons"] == {"__neurons__": [list(n) for n in res.neurons]}
    assert pd.read_csv(d / "neurons.csv")[["layer", "neuron"]].values.tolist() == \
        res.table[["layer", "neuron"]].values.tolist()
    back = LocateResult.load(d)
    assert same(back, res) and back == res
    assert back.fact == res.fact and back.neurons == res.neurons and back.settings == res.settings
    pd.testing.assert_frame_equal(back.table, res.table, check_exact=True)
    pd.testing.assert_frame_equal(back.effects(), res.effects(), check_exact=True)
    assert torch.equal(back.mean_scores, res.mean_scores)
    assert all(torch.equal(x.values, y.values) for x, y in zip(back.activations, res.activations))


def test_report_is_self_contained(results, tmp_path):
    _, res, _ = results
    page = write_html(res, tmp_path / "r" / "report.html").read_text()
    assert remote_sources(page) == []
    assert "unpkg.com" not in page and "esm.js" not in page  # circuitsvis CDN import not used
    assert page.count("data:image/png;base64,") >= 3  # heatmap, per-prompt scores, interventions
    assert "ColoredTokensMulti" in page  # circuitsvis token view, inline bundle
    for n in res.tested:
        assert str(n) in page
    assert res.settings.hook_point in page and res.settings.grid in page


def test_remote_sources_detects_remote_scripts_and_styles():
    assert remote_sources('<script src="https://unpkg.com/x.js"></script>') == ["https://unpkg.com/x.js"]
    assert remote_sources("<link rel=stylesheet href='//cdn.example.org/a.css'>") == ["//cdn.example.org/a.css"]
    assert remote_sources("<style>@import url(https://fonts.example/a.css);</style>") == ["https://fonts.example/a.css"]
    assert remote_sources('<script type="module">import { render } from "https://unpkg.com/c/esm.js";</script>')
    assert remote_sources('<img src="data:image/png;base64,AAAA"><a href="https://example.org">x</a>') == []


def test_precomputed_attributions_and_hook_point(tiny_llama):
    attrs = knlens.attribute(tiny_llama, FACT, steps=4, hook_point="hook_pre")
    with pytest.warns(UserWarning, match="not monotone"):  # enhance x2 of a SiLU input
        res = locate(tiny_llama, FACT, attributions=attrs, preset=EVERY_PROMPTS_BEST, n_random=2, progress=False,
                     specificity=False)
    assert any("not monotone" in n for n in res.notes)
    assert res.settings.hook_point == "hook_pre" and res.settings.steps == 4 and "attribute_s" not in res.timings
    assert all(x is y for x, y in zip(res.attributions, attrs))
    assert res.interventions.settings.hook_point == "hook_pre"
    for ta, a in zip(res.activations, attrs):  # activations read at the same hook point
        at_target = torch.tensor([float(a.activations[n.layer, n.index]) for n in res.tested])
        assert ta.values[ta.target_position] == pytest.approx(at_target, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="do not belong"):
        locate(tiny_llama, Fact(FACT.prompts[:2], FACT.target), attributions=attrs, progress=False,
               specificity=False)
    with pytest.raises(ValueError, match="unknown selection preset"):
        locate(tiny_llama, FACT, attributions=attrs, preset="nope", progress=False, specificity=False)


def test_token_activations_of_a_masked_lm_include_the_mask(tiny_bert):
    acts = token_activations(tiny_bert, FACT, NeuronSet([(0, 1), (1, 2)]))
    assert all(a.tokens[a.target_position] == "[MASK]" for a in acts)
    assert all(a.values.shape == (len(a.tokens), 2) and math.isfinite(float(a.values.sum())) for a in acts)
