"""Neuron structure (docs/methods.md, degenerate knowledge neurons): structural distance, persistence clustering,
the functional filter, robustness and fact checking, on hand-made matrices and the tiny random Llama."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from knlens import Fact, NeuronSet
from knlens.cli import main
from knlens.core.errors import InsufficientDataError, TooFewNeuronsError
from knlens.core.tokens import encode
from knlens.methods.structure.clustering import baseline_clusters, persistence_clusters
from knlens.methods.structure.degenerate_components import degenerate_components, functional_filter
from knlens.methods.structure.fact_check import choose_threshold, fact_check, flag_metrics, frequent_neurons
from knlens.methods.structure.robustness import perturbations, robustness
from knlens.methods.structure.topology import adjacent_weights, neuron_distances, structural_distance
from knlens.run.engine import forward, target_probs
from knlens.run.hooks import add, capture, neuron_hooks, patch_from, zero_ablate

FACT = Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france")


def _chain_weights(layers, rng):
    n = len(layers)
    return rng.uniform(0.5, 2.0, (n, n)) * rng.choice([-1, 1], (n, n))


def test_distance_rules_on_a_hand_made_chain():
    layers = [0, 0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    w = _chain_weights(layers, rng)
    d = structural_distance(w, layers)
    assert np.array_equal(d, d.T)
    assert np.isinf(np.diag(d)).all() and np.isinf(d[0, 1])                     # within one layer
    assert np.isinf(d[0, 5]) and np.isinf(d[1, 5])                              # span 4 > 3
    assert d[0, 2] == pytest.approx(abs(1 / w[0, 2]))                           # adjacent: |1/w|
    assert d[0, 3] == pytest.approx(abs(1 / w[0, 2]) + abs(1 / w[2, 3]))       # gap 2: through layer 1
    assert d[0, 4] == pytest.approx(d[0, 3] + abs(1 / w[3, 4]))                 # gap 3
    assert np.isfinite(d[2, 5])                                                 # layers 1 -> 4: span 3


def test_gap_two_takes_the_shortest_chain_and_none_is_infinite():
    layers = [0, 1, 1, 2, 5]
    w = np.zeros((5, 5))
    w[0, 1], w[1, 3] = 1.0, 1.0          # 0 -> 1 -> 3: 1 + 1
    w[0, 2], w[2, 3] = 0.25, 4.0         # 0 -> 2 -> 3: 4 + 0.25
    d = structural_distance(w, layers)
    assert d[0, 3] == pytest.approx(2.0)
    assert np.isinf(d[3, 4]) and np.isinf(d[0, 4])                              # no chain / too far
    w[0, 1] = 0.0                                                               # zero weight: no edge
    assert structural_distance(w, layers)[0, 1] == np.inf


def test_weight_only_distance_reads_w_out_into_the_input_columns(tiny_llama):
    ns = NeuronSet([(0, 3), (0, 7), (1, 5)])
    w = adjacent_weights(tiny_llama, ns, mode="up")
    gain = tiny_llama.blocks[1].ln2.original_component.weight.detach()
    want = (tiny_llama.blocks[0].mlp.W_out[3] * gain) @ tiny_llama.blocks[1].mlp.W_in[:, 5]
    assert w[0, 2] == pytest.approx(float(want), rel=1e-5)
    assert w[2, 0] == 0 and w[0, 1] == 0
    gate = adjacent_weights(tiny_llama, ns, mode="gate")
    assert gate[0, 2] != pytest.approx(w[0, 2])
    d = neuron_distances(tiny_llama, ns, mode="up")
    assert np.array_equal(d, d.T) and np.isinf(d[0, 1])


def test_sensitivity_is_the_derivative_of_the_real_forward(tiny_llama):
    """A's activation nudged at the target position (layer 1's attention frozen): B's output moves by w·δ."""
    q = encode(tiny_llama, ["the capital of france is"], " paris")
    ns = NeuronSet([(0, 3), (0, 7), (1, 5), (1, 11)])
    w = adjacent_weights(tiny_llama, ns, mode="sensitivity", q=q)
    attn = []
    forward(tiny_llama, q.tokens, [("blocks.1.hook_attn_out", capture(attn))])
    for row, a in enumerate((3, 7)):
        outs = []
        for step in (1e-3, -1e-3):
            got = []
            forward(tiny_llama, q.tokens, [("blocks.0.mlp.hook_post", add(step, neurons=[a], position=q.position)),
                                           ("blocks.1.hook_attn_out", patch_from(attn[0])),
                                           ("blocks.1.mlp.hook_post", capture(got, q.position))])
            outs.append(got[0][0])
        fd = ((outs[0] - outs[1]) / 2e-3)[[5, 11]].double().numpy()
        assert w[row, 2:] == pytest.approx(fd, rel=1e-2, abs=1e-5)


def _planted(seed=0, n=10):
    """Two chains {0, 1, 2} and {3, 4, 5} (links ~1, their closing pairs ~1.6) among loose neurons (20-40)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(20.0, 40.0, (n, n))
    for a, b, c in ([0, 1, 2], [3, 4, 5]):
        d[a, b], d[b, c], d[a, c] = rng.uniform(1.0, 1.2), rng.uniform(1.0, 1.2), rng.uniform(1.5, 1.7)
    d = np.minimum(d, d.T)
    np.fill_diagonal(d, np.inf)
    return d


def test_persistence_finds_the_planted_clusters():
    for seed in range(5):
        res = persistence_clusters(_planted(seed))
        assert sorted(c.tolist() for c in res.clusters) == [[0, 1, 2], [3, 4, 5]]
        assert (res.table["persistence"] > 15).all()


def test_persistence_drops_short_lived_clusters():
    d = _planted(0)
    d[6, 7] = d[7, 6] = 1.3           # a pair that forms inside the cut and merges soon after (at 1.9)
    d[6, 8] = d[8, 6] = 1.9
    res = persistence_clusters(d)
    assert sorted(c.tolist() for c in res.clusters) == [[0, 1, 2], [3, 4, 5]]
    dropped = res.table[~res.table["kept"]]
    assert [m.tolist() for m in dropped["members"]] == [[6, 7]] and dropped["persistence"].iloc[0] == pytest.approx(0.6)


@pytest.mark.parametrize("method", ["average", "dbscan", "kmeans"])
def test_baselines_on_two_clusters_only(method):
    d = _planted(1, n=6)
    res = baseline_clusters(d, method, eps_quantile=0.3)
    assert sorted(c.tolist() for c in res.clusters) == [[0, 1, 2], [3, 4, 5]]


def test_too_few_neurons_names_count_and_threshold():
    with pytest.raises(TooFewNeuronsError, match="2 located neurons.*at least 3"):
        persistence_clusters(np.full((2, 2), np.inf))
    with pytest.raises(TooFewNeuronsError, match="no finite structural distance"):
        persistence_clusters(np.full((4, 4), np.inf))


def test_functional_filter_on_a_planted_effect_table():
    effects = pd.DataFrame({"component": [0, 1, 2], "drop_alone": [0.02, 0.049, 0.051]})
    assert functional_filter(effects, 0.9)["degenerate"].tolist() == [True, True, False]
    assert not functional_filter(effects, 0.49)["degenerate"].any()
    assert functional_filter(effects, 0.3, removes_min=0.25)["degenerate"].tolist() == [True, True, False]


def test_components_suppression_matches_a_plain_forward(tiny_llama):
    res = degenerate_components(tiny_llama, FACT, top=12, steps=2, union_share=1.0)
    assert len(res.located) == 12 and len(res.frame)
    q = encode(tiny_llama, list(FACT.prompts), FACT.target)
    union = NeuronSet(nr for c in res.components for nr in c)
    clean = target_probs(tiny_llama, q).mean()
    hooks = neuron_hooks(union, lambda idx: zero_ablate(idx, q.position))
    assert res.p_clean == pytest.approx(float(clean), rel=1e-4)
    assert res.drop_all == pytest.approx(1 - float(target_probs(tiny_llama, q, hooks).mean() / clean), rel=1e-3, abs=1e-6)


def test_typos_spare_the_subject_and_the_last_word():
    out = perturbations("The capital city of France is", "France", n=10)
    assert out and all(t.split()[-2:] == ["France", "is"] and t != "The capital city of France is" for t in out)
    assert perturbations("Paris is", "Paris") == []


def test_robustness_conditions(tiny_llama):
    frame = robustness(tiny_llama, FACT, NeuronSet([(1, 3), (1, 7)]), n_random=2, n_perturb=2)
    assert frame["condition"].tolist() == ["intact", "set_suppressed", "random_suppressed"]
    q = encode(tiny_llama, list(FACT.prompts), FACT.target)
    assert frame["p_original"][0] == pytest.approx(float(target_probs(tiny_llama, q).mean()), rel=1e-4)
    assert frame["p_original"][1] != pytest.approx(frame["p_original"][0])
    assert robustness(tiny_llama, FACT, NeuronSet()).empty


def test_threshold_and_metrics_on_planted_scores():
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.05, 0.3, 0.6])
    is_false = np.array([False, False, True, True, False, True, False, True])
    t = choose_threshold(scores, is_false)
    m = flag_metrics(scores, is_false, t)
    assert t == pytest.approx(0.65) and m["precision"] == 0.8 and m["recall"] == 1.0        # F1 8/9 beats 6/7 at 0.25
    with pytest.raises(InsufficientDataError):
        choose_threshold(scores, np.ones(8, dtype=bool))
    assert list(frequent_neurons([NeuronSet([(1, 2)]), NeuronSet([(1, 2), (0, 1)])])) == [(1, 2)]


def test_fact_check_runs_on_split_facts(tiny_llama):
    facts = [Fact([f"the capital of {c} is"], f" {o}", name=c) for c, o in
             (("france", "paris"), ("spain", "madrid"), ("italy", "rome"), ("germany", "berlin"))]
    sets = [NeuronSet([(1, 3), (1, 7)])] * 4
    pairs, metrics = fact_check(tiny_llama, facts, sets, steps=2)
    assert len(pairs) == 8 and pairs["is_false"].sum() == 4
    assert set(metrics["split"]) == {"calibration", "test"}
    with pytest.raises(InsufficientDataError):
        fact_check(tiny_llama, facts[:3], sets[:3])


def test_cli_degenerate_too_few_neurons_exits_2(capsys):
    rc = main(["degenerate", "--model", "tiny-llama", "--prompt", "the capital of france is", "--target", " paris",
               "--top", "2", "--steps", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "2 located neurons" in err[0] and "at least 3" in err[0]


def test_weight_only_distance_on_layer_norm_gpt2(tiny_gpt2):
    ns = NeuronSet([(0, 3), (1, 5)])
    w = adjacent_weights(tiny_gpt2, ns, mode="up")
    ln = tiny_gpt2.blocks[1].ln2.original_component
    want = (tiny_gpt2.blocks[0].mlp.W_out[3] * ln.weight.detach()) @ tiny_gpt2.blocks[1].mlp.W_in[:, 5]
    assert w[0, 1] == pytest.approx(float(want), rel=1e-4)
    q = encode(tiny_gpt2, ["the capital of france is"], " paris")
    assert np.isfinite(neuron_distances(tiny_gpt2, ns, q=q)[0, 1])
