"""Query localization: consistency scores, Otsu, Welch, attention scaling, patching, mapping, selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import knlens
from knlens.analyses.query_localization import (ConsistencyStudy, FactConsistency, attention_patch,
                                                attended_positions, compare_selections, consistency_aware_neurons,
                                                consistency_aware_scores, entity_vs_relation, fact_consistency,
                                                jaccard_consistency, mapping_summary, niu_similarity,
                                                otsu_threshold, query_kn_mapping, scale_attention,
                                                synapse_scaling, welch_test)
from knlens.hooks import hook_name, hooked
from knlens.neurons import NeuronSet
from knlens.patching import Corruption

PROMPTS = ["the capital of france is", "the capital city of france is", "france has the capital"]
FACT = knlens.Fact(PROMPTS, " paris", subject="france", name="capital-france")
OTHER = knlens.Fact(["the capital of germany is", "the capital city of germany is"], " berlin", subject="germany")


def test_jaccard_consistency():
    a = NeuronSet([(0, 1), (1, 2)])
    assert jaccard_consistency([a, a, a]) == 1.0
    assert jaccard_consistency([NeuronSet([(0, 1)]), NeuronSet([(0, 2)]), NeuronSet([(1, 1)])]) == 0.0
    assert jaccard_consistency([a, NeuronSet([(0, 1)])]) == 0.5
    with pytest.raises(ValueError):
        jaccard_consistency([a])


def test_niu_similarity():
    row = torch.randn(1, 50)
    assert niu_similarity(row.repeat(5, 1)) == pytest.approx(1.0, abs=1e-9)
    assert niu_similarity(row.repeat(3, 1) * torch.tensor([[1.0], [2.0], [7.0]])) == pytest.approx(1.0, abs=1e-9)
    assert niu_similarity(torch.eye(4, 12)) == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(6, 2, 40)  # [n, layer, neuron] accepted too
    assert 0.0 <= niu_similarity(x) <= 1.0
    with pytest.raises(ValueError):
        niu_similarity(torch.ones(1, 3))


def test_otsu_splits_bimodal_sample():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.15, 0.04, 60), rng.normal(0.75, 0.05, 40)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < t < high.min()
    assert otsu_threshold([0.0, 0.1, 1.0, 1.1]) == pytest.approx(0.55)
    assert otsu_threshold([0.4, 0.4, 0.4]) == 0.4
    with pytest.raises(ValueError):
        otsu_threshold([1.0])


def test_welch():
    w = welch_test([0.9, 0.8, 0.85, 0.95], [0.1, 0.2, 0.15, 0.05])
    assert w["p"] < 0.001 and w["t"] > 0
    assert np.isnan(welch_test([1.0], [0.1, 0.2])["p"])


def test_scale_attention_alpha_one_is_identity(tiny_llama):
    toks = tiny_llama.to_tokens(PROMPTS[0])
    base = tiny_llama(toks)
    pat = torch.rand(2, 4, 6, 6).softmax(-1)
    assert torch.equal(scale_attention(1.0, [1, 2])(pat, None), pat)
    names = [hook_name(l, "attn.hook_pattern") for l in range(tiny_llama.cfg.n_layers)]
    with hooked(tiny_llama, [(n, scale_attention(1.0, [2, 3])) for n in names]):
        same = tiny_llama(toks)
    assert torch.equal(same, base)
    with hooked(tiny_llama, [(n, scale_attention(3.0, [2, 3])) for n in names]):
        changed = tiny_llama(toks)
    assert (changed - base).abs().max() > 1e-4
    # renormalised: the query row still sums to its original sum
    out = scale_attention(torch.tensor([0.0, 2.0]), [1])(pat, None)
    torch.testing.assert_close(out[:, :, -1].sum(-1), pat[:, :, -1].sum(-1))
    assert torch.all(out[0, :, -1, 1] == 0)
    torch.testing.assert_close(out[:, :, :-1], pat[:, :, :-1])  # other query rows untouched


def test_synapse_scaling(tiny_gpt2):
    top, low = attended_positions(tiny_gpt2, PROMPTS[0], k=1)
    assert len(top) == len(low) == 1 and top != low and 0 not in top + low
    res = synapse_scaling(tiny_gpt2, PROMPTS[0], " paris", NeuronSet([(1, 3), (1, 5)]), alphas=(0.0, 1.0, 3.0))
    assert set(res.group) == {"synapse", "control"} and len(res) == 6
    one = res[res.alpha == 1.0]
    assert np.allclose(one.relative_p, 0.0, atol=1e-6) and np.allclose(one.activation_relative, 0.0, atol=1e-6)
    assert res[res.alpha != 1.0].relative_p.abs().max() > 1e-5


def test_attention_patch(tiny_llama):
    kn = NeuronSet([(1, 3), (1, 7)])
    r = attention_patch(tiny_llama, PROMPTS[0], " paris", kn, source=PROMPTS[1])
    assert list(r.probs.patched) == ["0", "1", "all"]
    assert len(r.frame) == 3 * 2
    # patching from the prompt itself changes nothing
    same = attention_patch(tiny_llama, PROMPTS[0], " paris", kn, source=PROMPTS[0])
    assert np.allclose(same.frame.change, 0.0, atol=1e-6)
    assert np.allclose(same.probs.p_patched, same.probs.p_clean, atol=1e-7)
    # a corrupted source, single heads through hook_z
    c = attention_patch(tiny_llama, PROMPTS[0], " paris", kn, source=Corruption("noise", samples=2),
                        subject="france", point="attn.hook_z", heads=[0, 1])
    assert c.explained().shape[0] == 3
    # layer 1 attention is upstream of layer-1 neurons: patching it from another prompt moves them
    assert r.frame[r.frame.patched == "all"].change.abs().max() > 0
    assert r.plot() is not None


@pytest.fixture(scope="module")
def consistency(tiny_llama):
    return fact_consistency(tiny_llama, FACT, steps=4)


def test_fact_consistency_and_study(consistency, tmp_path):
    fc = consistency
    assert len(fc.sets) == 3 and 0.0 <= fc.jaccard <= 1.0 and 0.0 <= fc.niu <= 1.0 + 1e-9
    assert fc.jaccard == pytest.approx(jaccard_consistency(fc.sets))
    # a synthetic study with known scores
    facts = tuple(FactConsistency(f"f{i}", ("a", "b"), " x", (NeuronSet(), NeuronSet()), j, n, (0.5, 0.5))
                  for i, (j, n) in enumerate([(0.05, 0.2), (0.1, 0.25), (0.12, 0.3), (0.7, 0.8), (0.8, 0.9)]))
    study = ConsistencyStudy(facts)
    th = study.thresholds()
    assert 0.12 < th[("jaccard", "otsu")] < 0.7
    s = study.summary().set_index(["score", "threshold"])
    assert s.loc[("jaccard", "otsu"), "n_inconsistent"] == 3
    assert s.loc[("jaccard", "static"), "share_inconsistent"] == pytest.approx(0.6)
    assert s.loc[("niu", "static"), "n_inconsistent"] == 2
    study.save(tmp_path / "s.json")
    back = ConsistencyStudy.load(tmp_path / "s.json")
    assert back.to_frame().equals(study.to_frame())
    assert study.plot() is not None


def test_query_kn_mapping(tiny_llama):
    sets = [NeuronSet([(1, 3), (0, 4)]), NeuronSet([(1, 3)]), NeuronSet([(0, 9)])]
    frame = query_kn_mapping(tiny_llama, FACT, sets)
    assert len(frame) == 3 + 2 * 6
    own = frame[frame.relation == "own"].set_index("query")
    # the query's own set, suppressed, equals a direct intervention
    q = knlens.encode(tiny_llama, [PROMPTS[0]], " paris")
    p = knlens.intervene(tiny_llama, q, [sets[0]], 0.0)
    assert own.loc[0, "p_after"] == pytest.approx(float(p[0, 0]), abs=1e-6)
    inter = frame[(frame.relation == "intersection") & (frame["query"] == 1) & (frame.source == 2)]
    assert inter.n_neurons.item() == 0 and inter.change.item() == pytest.approx(0.0, abs=1e-7)
    summ = mapping_summary(frame)
    assert list(summ.relation) == ["own", "paraphrase", "intersection"]


def test_consistency_aware_selection(tiny_llama, consistency):
    v = torch.zeros(3, 2, 5)
    v[:, 0, 1] = torch.tensor([1.0, 1.0, 1.0])  # high and stable
    v[:, 1, 2] = torch.tensor([1.0, 0.0, 0.0])  # high once
    v[:, 1, 4] = torch.tensor([0.5, 0.5, 0.5])  # stable, lower
    s = consistency_aware_scores(v, beta1=1.0, beta2=1.0)
    assert s[0, 1] == pytest.approx(1.0) and s[1, 2] < s[1, 4]
    assert list(consistency_aware_neurons(v, 2)) == [(0, 1), (1, 4)]
    ca = consistency_aware_neurons(consistency.vectors, 3)
    sets = {"query": consistency.sets[0], "union": NeuronSet.union(consistency.sets),
            "intersection": NeuronSet.intersection(consistency.sets), "consistency-aware": ca}
    res = compare_selections(tiny_llama, FACT, sets, query=0, others=[OTHER])
    assert list(res.set) == list(sets)
    assert set(res.columns) >= {"reliability", "generality", "locality"}
    assert res.locality.notna().all()


def test_entity_vs_relation(tiny_gpt2):
    er = entity_vs_relation(tiny_gpt2, FACT, samples=1, window=1)
    frame = er.to_frame()
    assert set(frame.corrupted) == {"subject", "relation"} and set(frame.kind) == {"mlp", "attn"}
    assert er.subject.corrupted == (4,) and er.relation.corrupted == (1, 2, 3)


def test_hooks_removed_after_failing_run(tiny_llama):
    toks = tiny_llama.to_tokens(PROMPTS[0])
    before = tiny_llama(toks)
    bad = NeuronSet([(1, 3)])

    def boom(act, hook):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with hooked(tiny_llama, [(hook_name(0, "attn.hook_pattern"), scale_attention(2.0, [1])),
                                 (hook_name(1, "hook_post"), boom)]):
            tiny_llama(toks)
    with pytest.raises(knlens.KnlensError):
        attention_patch(tiny_llama, PROMPTS[0], " paris", NeuronSet(), source=PROMPTS[1])
    with pytest.raises(knlens.PromptError):
        attention_patch(tiny_llama, PROMPTS[0], " paris", bad, source=Corruption("noise"))
    assert torch.equal(tiny_llama(toks), before)


def test_consistency_command(tmp_path, capsys):
    import argparse

    from knlens.cli_analyses import add_consistency_parser

    parser = argparse.ArgumentParser()
    add_consistency_parser(parser.add_subparsers())
    argv = ["consistency", "--model", "tiny-llama", "--target", " paris", "--all-facts", "--steps", "2",
            "--mapping", "--out", str(tmp_path), "--quiet"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "jaccard" in out and "share_inconsistent" in out and "intersection" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"consistency.json", "facts.csv", "summary.csv", "mapping.csv"}
    assert len(ConsistencyStudy.load(tmp_path / "consistency.json").facts) == 1
