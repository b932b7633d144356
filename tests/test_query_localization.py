"""Query localization: statistics (with known answers), consistency, attention scaling, patching, mapping,
selection."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import knlens
from knlens.studies.consistency import ConsistencyStudy, FactConsistency, fact_consistency
from knlens.core.errors import InsufficientDataError
from knlens.stats.sets import abs_cosine, jaccard_consistency, niu_similarity
from knlens.methods.attention import attended_positions, attention_patch, scale_attention, synapse_scaling
from knlens.stats.thresholds import bimodality, otsu_threshold
from knlens.studies.query_localization import (compare_selections, entity_vs_relation, mapping_summary,
                                               mapping_tests, query_kn_mapping)
from knlens.methods.consistent_selection import (consistency_aware_neurons, consistency_aware_scores,
                                                 equal_size_selections)
from knlens.stats.tests import paired_permutation_test
from knlens.run.hooks import hook_name, hooked
from knlens.core.neurons import NeuronSet
from knlens.methods.tracing.corruption import Corruption

PROMPTS = ["the capital of france is", "the capital city of france is", "france has the capital"]
FACT = knlens.Fact(PROMPTS, " paris", subject="france", name="capital-france")
OTHER = knlens.Fact(["the capital of germany is", "the capital city of germany is"], " berlin", subject="germany")


def test_jaccard_consistency():
    a = NeuronSet([(0, 1), (1, 2)])
    assert jaccard_consistency([a, a, a]) == 1.0
    assert jaccard_consistency([NeuronSet([(0, 1)]), NeuronSet([(0, 2)]), NeuronSet([(1, 1)])]) == 0.0
    assert jaccard_consistency([a, NeuronSet([(0, 1)])]) == 0.5
    with pytest.raises(InsufficientDataError):
        jaccard_consistency([a])


def test_niu_similarity_and_pairwise_cosine():
    row = torch.randn(1, 50)
    assert niu_similarity(row.repeat(5, 1)) == pytest.approx(1.0, abs=1e-9)
    assert niu_similarity(row.repeat(3, 1) * torch.tensor([[1.0], [2.0], [7.0]])) == pytest.approx(1.0, abs=1e-9)
    assert niu_similarity(torch.eye(4, 12)) == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(6, 2, 40)  # [n, layer, neuron] accepted too
    assert 0.0 <= niu_similarity(x) <= 1.0
    cos = abs_cosine(x)
    for i, j in [(0, 1), (2, 5), (3, 4)]:  # for two vectors Niu's similarity is their |cos|
        assert float(cos[i, j]) == pytest.approx(niu_similarity(x[[i, j]]), abs=1e-9)
    with pytest.raises(InsufficientDataError):
        niu_similarity(torch.ones(1, 3))


def test_otsu_splits_bimodal_sample():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.15, 0.04, 60), rng.normal(0.75, 0.05, 40)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < t < high.min()
    assert otsu_threshold([0.0, 0.1, 1.0, 1.1]) == pytest.approx(0.55)
    assert otsu_threshold([0.4, 0.4, 0.4]) == 0.4
    with pytest.raises(InsufficientDataError):
        otsu_threshold([1.0])
    with pytest.raises(InsufficientDataError):
        otsu_threshold([0.1, float("nan")])


def test_paired_permutation_test_known_answers():
    # all positive, n = 6: only the observed signs and their mirror are as extreme -> 2 / 64, exactly
    r = paired_permutation_test([0.3, 0.2, 0.4, 0.1, 0.3, 0.25])
    assert r["exact"] and r["p"] == pytest.approx(2 / 64) and r["p_floor"] == pytest.approx(2 / 64)
    assert r["share_positive"] == 1.0 and r["mean"] == pytest.approx(0.2583333, abs=1e-6)
    # perfectly balanced differences: p = 1
    assert paired_permutation_test([1.0, -1.0, 2.0, -2.0])["p"] == 1.0
    # one difference cannot be significant
    assert paired_permutation_test([5.0])["p"] == 1.0
    # Monte Carlo agrees with the exact enumeration
    d = np.random.default_rng(1).normal(0.3, 1.0, 12)
    exact = paired_permutation_test(d, n_permutations=10000)
    mc = paired_permutation_test(d, n_permutations=2000, seed=3)
    assert exact["exact"] and not mc["exact"] and mc["p"] == pytest.approx(exact["p"], abs=0.03)
    # a clear shift is found, pure noise is not
    rng = np.random.default_rng(2)
    assert paired_permutation_test(rng.normal(1.0, 1.0, 30))["p"] < 0.001
    assert paired_permutation_test(rng.normal(0.0, 1.0, 30))["p"] > 0.05
    with pytest.raises(InsufficientDataError):
        paired_permutation_test([])
    with pytest.raises(InsufficientDataError):
        paired_permutation_test([1.0, float("inf")])


def test_bimodality_known_answers():
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(0.2, 0.05, 25), rng.normal(0.7, 0.05, 25)])
    r = bimodality(two)
    assert r["p"] < 0.01 and r["n"] == 50
    # one mode: normal, skewed (exponential) and bounded (beta) samples are not called bimodal
    for sample in (rng.normal(0.3, 0.1, 40), rng.exponential(0.1, 40), rng.beta(2, 5, 40)):
        assert bimodality(sample)["p"] > 0.05
    with pytest.raises(InsufficientDataError):
        bimodality([0.3, 0.3, 0.3, 0.3])
    with pytest.raises(InsufficientDataError):
        bimodality([0.1, 0.9])


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
    top, controls = attended_positions(tiny_gpt2, PROMPTS[0], k=1, n_controls=3)
    assert len(top) == 1 and len(controls) == 3 and 0 not in top
    assert all(len(c) == 1 and not set(c) & set(top) and 0 not in c for c in controls)
    # the control is drawn uniformly from every non-top position, not from the least-attended one
    drawn = {c[0] for seed in range(40) for c in attended_positions(tiny_gpt2, PROMPTS[0], seed=seed)[1]}
    n_tokens = tiny_gpt2.to_tokens(PROMPTS[0]).shape[1]
    assert drawn == set(range(1, n_tokens - 1)) - set(top)
    res = synapse_scaling(tiny_gpt2, PROMPTS[0], " paris", NeuronSet([(1, 3), (1, 5)]), alphas=(0.0, 1.0, 3.0),
                          n_controls=2).frame
    assert res.groupby("group").size().to_dict() == {"control": 6, "synapse": 3}
    one = res[res.alpha == 1.0]
    assert np.allclose(one.relative_p, 0.0, atol=1e-6) and np.allclose(one.activation_relative, 0.0, atol=1e-6)
    assert res[res.alpha != 1.0].relative_p.abs().max() > 1e-5
    # the attention mass of the synapse is the largest of all candidate positions
    assert res[res.group == "synapse"].mass.iloc[0] >= res[res.group == "control"].mass.max()
    assert (res.mass > 0).all()


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
                        subject="france", hook_point="attn.hook_z", heads=[0, 1])
    assert c.explained().shape[0] == 3
    # layer 1 attention is upstream of layer-1 neurons: patching it from another prompt moves them
    assert r.frame[r.frame.patched == "all"].change.abs().max() > 0
    assert r.plot() is not None


@pytest.fixture(scope="module")
def consistency(tiny_llama):
    return fact_consistency(tiny_llama, FACT, steps=4)


def _fc(name, relation, sets, templates, score=0.5):
    return FactConsistency(name, tuple(t.replace("[X]", name) for t in templates), " x", tuple(sets), score, score,
                           (0.5,) * len(sets), relation, tuple(templates), (0.01,) * len(sets))


def test_fact_consistency_and_study(consistency, tmp_path):
    fc = consistency
    assert len(fc.sets) == 3 and 0.0 <= fc.jaccard <= 1.0 and 0.0 <= fc.niu <= 1.0 + 1e-9
    assert fc.jaccard == pytest.approx(jaccard_consistency(fc.sets))
    assert fc.templates == tuple(p.replace("france", "[X]") for p in PROMPTS) and len(fc.completeness) == 3
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
    assert not any("welch" in c or "cross" in c for c in s.columns)
    back = ConsistencyStudy.load(study.save(tmp_path / "s"))
    assert back.to_frame().equals(study.to_frame()) and back == study
    assert study.plot() is not None
    with pytest.raises(knlens.KnlensError):
        back.pairs("niu")  # these facts have no attribution vectors


TEMPLATES = ("[X] is a", "[X] was a", "[X] became a")


def test_within_between_finds_fact_specific_neurons():
    # each fact has its own neuron (0, i) on every paraphrase, plus one neuron per template (1, t)
    facts = tuple(_fc(f"f{i}", "R", [NeuronSet([(0, i), (1, t)]) for t in range(3)], TEMPLATES) for i in range(6))
    study = ConsistencyStudy(facts)
    wb = study.within_between("jaccard")
    assert np.allclose(wb.within, 1 / 3) and np.allclose(wb.between, 0.0) and np.allclose(wb.same_template, 1 / 3)
    kinds = study.pairs().kind.value_counts().to_dict()
    assert kinds == {"within": 6 * 3, "same_template": 15 * 3, "between": 15 * 6}
    t = study.within_between_test("jaccard")
    assert t["mean"] == pytest.approx(1 / 3) and t["share_positive"] == 1.0 and t["p"] == pytest.approx(2 / 64)


def test_within_between_can_fail():
    # neurons that depend on the template only: paraphrases of one fact are no more alike than other facts
    facts = tuple(_fc(f"f{i}", "R", [NeuronSet([(1, t)]) for t in range(3)], TEMPLATES) for i in range(6))
    t = ConsistencyStudy(facts).within_between_test("jaccard")
    assert t["within"] == t["between"] == 0.0 and t["same_template"] == 1.0 and t["p"] == 1.0
    # two relations are never paired with each other; a fact alone in its relation has no between pairs
    lone = _fc("g0", "S", [NeuronSet([(0, 0)])] * 3, TEMPLATES)
    wb = ConsistencyStudy((*facts, lone)).within_between()
    assert np.isnan(wb.set_index("fact").loc["g0", "between"])
    with pytest.raises(InsufficientDataError):
        ConsistencyStudy((lone,)).within_between_test()


def test_within_between_niu_uses_vectors(consistency):
    other = FactConsistency("other", consistency.prompts, " x", consistency.sets, 0.5, 0.5, (0.5,) * 3,
                            None, consistency.templates, (0.0,) * 3, consistency.vectors.flip(0))
    study = ConsistencyStudy((consistency, other))
    p = study.pairs("niu")
    cos = abs_cosine(torch.cat([consistency.vectors, other.vectors]))
    row = p[(p.fact_a == consistency.name) & (p.prompt_a == 0) & (p.fact_b == "other") & (p.prompt_b == 1)]
    assert row.similarity.item() == pytest.approx(float(cos[0, 4]))
    assert set(p.kind) == {"within", "between", "same_template"}


def test_bimodality_of_study():
    scores = [0.1, 0.12, 0.15, 0.11, 0.13, 0.8, 0.82, 0.85, 0.79, 0.81]
    facts = tuple(FactConsistency(f"f{i}", ("a", "b"), " x", (NeuronSet(), NeuronSet()), v, v, (0.5, 0.5))
                  for i, v in enumerate(scores))
    assert ConsistencyStudy(facts).bimodality("jaccard")["p"] < 0.05


def test_query_kn_mapping(tiny_llama):
    sets = [NeuronSet([(1, 3), (0, 4)]), NeuronSet([(1, 3)]), NeuronSet([(0, 9)])]
    mapping = query_kn_mapping(tiny_llama, FACT, sets, n_random=2)
    frame = mapping.frame
    assert frame.relation.value_counts().to_dict() == {"own": 3, "paraphrase": 6, "intersection": 6,
                                                        "own-random": 6, "paraphrase-random": 12}
    own = frame[frame.relation == "own"].set_index("query")
    # the query's own set, suppressed, equals a direct intervention
    q = knlens.encode(tiny_llama, [PROMPTS[0]], " paris")
    p = knlens.intervene(tiny_llama, q, [sets[0]], 0.0)
    assert own.loc[0, "p_after"] == pytest.approx(float(p[0, 0]), abs=1e-6)
    inter = frame[(frame.relation == "intersection") & (frame["query"] == 1) & (frame.source == 2)]
    assert inter.n_neurons.item() == 0 and inter.change.item() == pytest.approx(0.0, abs=1e-7)
    # random sets match the size of their source set
    rnd = frame[frame.relation.str.endswith("random")]
    assert (rnd.n_neurons == rnd.source.map(lambda j: len(sets[j]))).all()
    summ = mapping_summary(frame)
    assert list(summ.relation) == ["own", "own-random", "paraphrase", "paraphrase-random", "intersection"]
    assert summ.equals(mapping.summary()) and mapping.tests().equals(mapping_tests(frame))
    # excluded (generic) neurons leave every set first
    ex = query_kn_mapping(tiny_llama, FACT, sets, exclude=NeuronSet([(1, 3)])).frame
    assert ex[ex.relation == "own"].n_neurons.tolist() == [1, 0, 1]
    with pytest.raises(knlens.KnlensError):
        query_kn_mapping(tiny_llama, FACT, sets[:2])


def test_mapping_tests_known_answers():
    rows = []
    for f in range(5):
        for rel, value in [("own", -0.9), ("paraphrase", -0.2 - 0.01 * f), ("own-random", -0.1),
                           ("paraphrase-random", -0.2 - 0.01 * f), ("intersection", -0.5)]:
            rows.append({"fact": f"f{f}", "relation": rel, "n_neurons": 3, "relative": value, "change": value})
    rows.append({"fact": "f0", "relation": "own", "n_neurons": 0, "relative": 0.0, "change": 0.0})  # empty: left out
    t = mapping_tests(pd.DataFrame(rows)).set_index("comparison")
    own = t.loc["own − paraphrase"]
    assert own.n_facts == 5 and own.difference == pytest.approx(-0.7 + 0.02) and own.share_a_above_b == 0.0
    assert own.p == pytest.approx(2 / 32) == own.p_floor
    assert t.loc["paraphrase − paraphrase-random"].p == 1.0  # no better than random: the test fails


def test_consistency_aware_selection(tiny_llama, consistency):
    v = torch.zeros(3, 2, 5)
    v[:, 0, 1] = torch.tensor([1.0, 1.0, 1.0])  # high and stable
    v[:, 1, 2] = torch.tensor([1.0, 0.0, 0.0])  # high once
    v[:, 1, 4] = torch.tensor([0.5, 0.5, 0.5])  # stable, lower
    s = consistency_aware_scores(v, beta1=1.0, beta2=1.0)
    assert s[0, 1] == pytest.approx(1.0) and s[1, 2] < s[1, 4]
    assert list(consistency_aware_neurons(v, 2)) == [(0, 1), (1, 4)]
    assert list(consistency_aware_neurons(v, 2, exclude=NeuronSet([(0, 1)]))) == [(1, 4)]
    eq = equal_size_selections(v, 2)
    assert list(eq["consistency-aware"]) == [(0, 1), (1, 4)] and list(eq["mean"]) == [(0, 1), (1, 4)]
    assert set(eq["query"]) == {(0, 1), (1, 2)}
    with pytest.raises(InsufficientDataError):
        equal_size_selections(v, 3)  # (1, 2) has a negative consistency-aware score: two neurons only
    k = 4
    sets = equal_size_selections(consistency.vectors[:2], k)
    assert {len(s) for s in sets.values()} == {k}
    res = compare_selections(tiny_llama, FACT, sets, query=0, held_out=[2], others=[OTHER]).frame
    assert list(res.set) == list(sets)
    assert set(res.columns) >= {"reliability", "generality", "held_out", "locality"}
    assert res[["generality", "held_out", "locality"]].notna().all().all()
    with pytest.raises(knlens.KnlensError):
        compare_selections(tiny_llama, FACT, sets, query=0, held_out=[0])


def test_entity_vs_relation(tiny_gpt2):
    er = entity_vs_relation(tiny_gpt2, FACT, samples=1, window=1, known_only=False)  # a random model knows nothing
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
    from knlens.cli import main

    argv = ["consistency", "--model", "tiny-llama", "--target", " paris", "--all-facts", "--steps", "2",
            "--mapping", "--out", str(tmp_path), "--quiet"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "jaccard" in out and "share_inconsistent" in out and "intersection" in out and "welch" not in out
    assert {p.name for p in tmp_path.iterdir()} >= {"result.json", "facts.csv", "summary.csv", "mapping.csv"}
    assert len(ConsistencyStudy.load(tmp_path).facts) == 1
