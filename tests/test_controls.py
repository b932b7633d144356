"""Controls that can fail: magnitude-matched random sets, held-out prompts, other relations' facts, p-value
floors, the enhance rule, multi-token P(target), selection presets, and the engine locate records."""

from __future__ import annotations

import html
import warnings

import pandas as pd
import pytest
import torch
from scipy import stats

import knlens
from knlens import Fact, NeuronSet
from knlens.run import staircase
from knlens.cli.locate import format_result
from knlens.stats.tests import empirical_floor, floor_note, wilcoxon_floor
from knlens.methods.controls import magnitude_bins, matched_control, matched_widening, random_control
from knlens.run.engine import activations_at, target_probs
from knlens.core.errors import ControlError, SelectionError
from knlens.methods.heldout import held_out
from knlens.run.hooks import hook_name, neuron_hooks, set_value, zero_ablate
from knlens.methods.interventions import intervene, measure, per_prompt
from knlens.studies.knowledge_neurons import locate
from knlens.core.tokens import encode
from knlens.results.contract import same
from knlens.viz.report import render_html
from knlens.methods.selection import (PRESETS, SelectionPreset, min_prompts, refine_by_relation, refine_facts,
                                      refinement, refined_neurons)
from knlens.methods.specificity import other_relation_facts, specificity

PROMPTS4 = ["the capital of france is", "the capital city of france is", "france capital city is",
            "the city of paris is the capital of"]
FACT4 = Fact(PROMPTS4, " paris", relation="capital", name="tiny-capital")


# ---------------------------------------------------------------- magnitude-matched control
def test_magnitude_bins_are_equal_count_quantile_bins():
    torch.manual_seed(0)
    m = torch.rand(3, 40)
    bins = magnitude_bins(m, n_bins=10)
    for layer in range(3):
        assert torch.bincount(bins[layer], minlength=10).tolist() == [4] * 10
        order = m[layer].argsort()  # bins rise with magnitude
        assert (bins[layer, order].diff() >= 0).all()
    with pytest.raises(ControlError, match="n_bins"):
        magnitude_bins(m, n_bins=41)


def test_matched_draws_stay_in_the_knowledge_neurons_bins_and_uniform_ones_do_not():
    torch.manual_seed(1)
    m = torch.rand(2, 100)
    kn = NeuronSet([(0, int(m[0].argmax())), (1, int(m[1].argmax())), (1, int(m[1].argmin()))])
    bins = magnitude_bins(m, 10)
    same_bin_uniform = 0
    for seed in range(30):
        drawn = matched_control(kn, m, n_bins=10, seed=seed)
        assert drawn.layer_counts() == kn.layer_counts() and not (drawn & kn)
        for layer, idx in kn.by_layer().items():  # one drawn neuron per knowledge neuron, bin for bin
            assert sorted(int(bins[layer, i]) for i in drawn.by_layer()[layer]) == \
                sorted(int(bins[layer, i]) for i in idx)
        uni = random_control(kn, d_mlp=100, seed=seed)
        same_bin_uniform += sum(int(bins[n.layer, n.index]) in (0, 9) for n in uni)
    assert same_bin_uniform < 0.5 * 30 * len(kn)  # the uniform draw ignores magnitude (expected ~20 %)
    assert matched_control(kn, m, seed=3) == matched_control(kn, m, seed=3) != matched_control(kn, m, seed=4)
    assert matched_widening(kn, m) == 0


def test_matched_draw_widens_to_the_nearest_bin_when_its_own_is_full():
    m = torch.arange(10.0).reshape(1, 10)  # 5 bins of 2 neurons: {0,1} {2,3} ... {8,9}
    kn = NeuronSet([(0, 8), (0, 9), (0, 7)])  # bin 4 holds only knowledge neurons
    assert matched_widening(kn, m, n_bins=5) == 2
    for seed in range(10):
        drawn = [n.index for n in matched_control(kn, m, n_bins=5, seed=seed)]
        assert not set(drawn) & {7, 8, 9} and all(i >= 4 for i in drawn)  # bins 2-3 only, never further


def test_measure_uses_the_fact_s_own_activation_magnitudes(tiny_llama):
    fact = Fact(PROMPTS4[:2], " paris")
    q = encode(tiny_llama, list(fact.prompts), fact.target)
    acts = activations_at(tiny_llama, q, [hook_name(l) for l in range(2)])
    mag = torch.stack([acts[hook_name(l)].abs().mean(0) for l in range(2)])
    kn = NeuronSet([(1, int(mag[1].argmax())), (0, int(mag[0].argmax()))])
    res = measure(tiny_llama, [fact], [kn], n_random=6, actions={"suppress": 0.0})
    f = res.frame
    matched = f[f.control == "matched"].groupby("draw")["p_after"].first()
    # the frame's matched draws are exactly matched_control on the fact's |activation| (mean over prompts)
    direct = intervene(tiny_llama, q, [matched_control(kn, mag, seed=500 + d) for d in range(6)], 0.0)
    assert matched.to_numpy() == pytest.approx(direct[:, 0].numpy(), rel=1e-5)


# ---------------------------------------------------------------- floors and notes
@pytest.mark.parametrize("n", range(2, 11))
def test_wilcoxon_floor_is_the_exact_all_one_sign_probability(n):
    assert wilcoxon_floor(n) == pytest.approx(2 / 2 ** n)
    assert wilcoxon_floor(n, alternative="greater") == pytest.approx(1 / 2 ** n)


def test_floors_and_notes():
    assert wilcoxon_floor(4) == 0.125 and wilcoxon_floor(1) != wilcoxon_floor(1)  # NaN below 2 pairs
    assert empirical_floor(50) == pytest.approx(1 / 51)
    assert floor_note(0.125, 0.125, 4, "prompts").startswith("cannot reach p < 0.05 with 4 prompts")
    assert floor_note(0.3, 1 / 51, 50, "random draws") == ""
    assert floor_note(1 / 51, 1 / 51, 50, "random draws").startswith("at its floor")


def test_p_values_never_go_below_their_floors(tiny_gpt2):
    facts = [Fact(PROMPTS4, " paris", name="a"), Fact(["the capital of germany is", "the capital city of germany is"], " berlin", name="b")]
    res = measure(tiny_gpt2, facts, [NeuronSet([(1, 2), (1, 5)]), NeuronSet([(0, 1)])], n_random=7)
    t = res.tests()
    assert (t.p_empirical >= t.p_empirical_floor - 1e-12).all()
    assert (t.p_empirical_matched >= t.p_empirical_floor - 1e-12).all()
    assert (t.p_empirical_floor == 1 / 8).all() and (t.p_wilcoxon_floor == 0.5).all()  # 2 facts
    assert (res.tests(by="prompt").p_wilcoxon_floor == wilcoxon_floor(6)).all()  # 4 + 2 prompts
    with pytest.raises(ControlError, match="one set per fact"):
        measure(tiny_gpt2, facts, [NeuronSet()], n_random=1)
    with pytest.raises(ControlError, match="unknown control"):
        measure(tiny_gpt2, facts[:1], [NeuronSet()], controls=("shuffled",))


def test_p_empirical_counts_the_draws_at_least_as_extreme(tiny_llama):
    fact = Fact(PROMPTS4[:2], " paris")
    n_random = 9
    everything = NeuronSet((l, i) for l in range(2) for i in range(24))  # half of every layer
    res = measure(tiny_llama, [fact], [everything], n_random=n_random, controls=("uniform",))
    t = res.tests().set_index("action")
    sign = {"suppress": -1, "enhance": 1}
    for action in ("suppress", "enhance"):
        kn, rnd = t.loc[action, "knowledge_relative"], res.frame
        draws = rnd[(rnd.action == action) & (rnd.neurons == "random")].groupby("draw")["relative"].mean()
        k = int((sign[action] * draws >= sign[action] * kn).sum())
        assert t.loc[action, "p_empirical"] == pytest.approx((1 + k) / (1 + n_random))


# ---------------------------------------------------------------- the enhance rule along the path
def test_path_rule_with_a_baseline(tiny_llama):
    q = encode(tiny_llama, PROMPTS4[:3], " paris")
    kn = NeuronSet([(0, 3), (1, 7), (1, 9)])
    clean = target_probs(tiny_llama, q)
    q0 = q.select([0])
    acts = activations_at(tiny_llama, q0, [hook_name(0), hook_name(1)])
    base = torch.randn(2, 48)
    # suppress with baseline b sets the neurons to b
    manual = target_probs(tiny_llama, q, lambda s: [
        (hook_name(l), set_value(base[l].expand(len(s), 48), idx, s.position))
        for l, idx in kn.by_layer().items()])
    torch.testing.assert_close(intervene(tiny_llama, q, [kn], 0.0, baseline=base)[0], manual)
    # a baseline equal to the clean activation leaves every factor without effect (one prompt: its own acts)
    own = torch.stack([acts[hook_name(0)][0], acts[hook_name(1)][0]])
    torch.testing.assert_close(intervene(tiny_llama, q0, [kn], 2.0, baseline=own)[0], clean[:1])
    # zero baseline: enhance is x2, suppress is zero-ablation
    zero = target_probs(tiny_llama, q, lambda s: neuron_hooks(kn, lambda idx: zero_ablate(idx, s.position)))
    torch.testing.assert_close(intervene(tiny_llama, q, [kn], 0.0)[0], zero)
    assert not torch.allclose(intervene(tiny_llama, q, [kn], 2.0, baseline=base)[0],
                              intervene(tiny_llama, q, [kn], 2.0)[0])
    with pytest.raises(knlens.HookShapeError, match="baseline has shape"):
        intervene(tiny_llama, q, [kn], 2.0, baseline=torch.zeros(3, 48))


def test_enhance_at_the_pre_activation_warns_and_says_how_many_are_negative(tiny_gpt2, tiny_llama):
    fact = Fact(PROMPTS4[:2], " paris")
    kn = NeuronSet([(0, 1), (1, 2), (1, 5)])
    with pytest.warns(UserWarning, match="not monotone") as rec:
        res = measure(tiny_gpt2, [fact], [kn], n_random=1, hook_point="hook_pre")
    q = encode(tiny_gpt2, list(fact.prompts), fact.target)
    pre = activations_at(tiny_gpt2, q, [hook_name(0, "hook_pre"), hook_name(1, "hook_pre")])
    negative = sum(int(pre[hook_name(n.layer, "hook_pre")][:, n.index].mean() < 0) for n in kn)
    assert f"{negative} of the 3 neurons" in str(rec[0].message) and res.settings.non_monotone_note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure(tiny_gpt2, [fact], [kn], n_random=1, hook_point="hook_pre", actions={"suppress": 0.0})
        measure(tiny_gpt2, [fact], [kn], n_random=1)  # hook_post
        measure(tiny_llama, [fact], [kn], n_random=1, hook_point="hook_pre_linear")  # up: linear in the output


# ---------------------------------------------------------------- multi-token targets
def test_multi_token_p_target_is_the_product_of_teacher_forced_probabilities(tiny_llama):
    fact = Fact(PROMPTS4[:2], " paris is")  # two tokens
    res = locate(tiny_llama, fact, steps=2, n_random=1, progress=False, specificity=False)
    manual = []
    for prompt in fact.prompts:
        ids = tiny_llama.to_tokens(prompt + " paris is")[0]
        logp = tiny_llama(ids[None])[0].log_softmax(-1)
        n = len(ids)
        manual.append(float((logp[n - 3, ids[n - 2]] + logp[n - 2, ids[n - 1]]).exp()))
    assert res.completeness["p_target"].to_numpy() == pytest.approx(manual, rel=1e-4)
    # the quantity IG integrates is the mean per-token probability, a different number, shown as ig_value
    assert not res.completeness["ig_value"].to_numpy() == pytest.approx(manual, rel=1e-2)
    assert res.p_target == pytest.approx(sum(manual) / 2, rel=1e-4)
    kn = res.interventions.frame.query("neurons == 'knowledge'")
    assert kn.groupby("prompt", sort=False)["p_before"].first().to_numpy() == pytest.approx(manual, rel=1e-4)
    assert "product of its teacher-forced per-token probabilities" in format_result(res)
    q = encode(tiny_llama, list(fact.prompts), fact.target)
    assert per_prompt(target_probs(tiny_llama, q), q).numpy() == pytest.approx(manual, rel=1e-4)


# ---------------------------------------------------------------- selection presets
def test_niu_preset_and_min_prompts():
    niu = PRESETS["niu"]
    assert (niu.threshold, niu.p, niu.p_step, niu.max_rounds, niu.target, niu.min_count) == (0.2, 0.7, 0.05, 20,
                                                                                              (2, 5), 0)
    assert min_prompts(4, 0.7, min_count=3) == 3 and min_prompts(10, 0.7, min_count=3) == 7
    assert min_prompts(2, 0.7, min_count=3) == 3 and min_prompts(4, 0.5, min_count=0, strict=True) == 3
    # a 20-prompt pool where neurons 0-3 are coarse in 5 prompts only: niu lowers p for 9 rounds, to 0.25
    pool = [torch.zeros(1, 8) for _ in range(20)]
    for s in pool[:5]:
        s[0, :4] = 1.0
    r = refinement([pool], "niu")
    assert len(r.sets[0]) == 4 and r.rounds == 9 and r.p == pytest.approx(0.25)
    assert r.min_prompts[0] == min_prompts(20, r.p, min_count=0)
    assert not 2 <= len(refinement([pool], "dai").sets[0]) <= 5
    with pytest.raises(SelectionError, match="unknown selection preset"):
        refined_neurons(pool, "nope")


def test_per_relation_adaptation_shares_p_within_a_relation():
    def fact(n_coarse):  # 10 prompts; neurons 0..9 coarse in prompts 0..count-1
        prompts = []
        for i in range(10):
            s = torch.zeros(1, 10)
            s[0, [k for k in range(10) if i < n_coarse[k]]] = 1.0
            prompts.append(s)
        return prompts
    wide = fact([10] * 8 + [0, 0])  # 8 neurons coarse everywhere: p rises but cannot drop below 8
    narrow = fact([10, 10, 9, 8, 7, 6, 0, 0, 0, 0])
    alone = refine_facts([narrow], "dai")[0]  # p adapted for this fact alone: 0.7 keeps 5 neurons
    shared = refine_by_relation([wide, narrow], ["r", "r"], "dai")[1]  # p shared with `wide`: raised
    assert len(alone) == 5 and len(shared) < len(alone)
    separate = refine_by_relation([wide, narrow], ["r", "s"], "dai")
    assert separate[1] == alone and separate[0] == refine_facts([wide], "dai")[0]
    with pytest.raises(SelectionError, match="one relation per fact"):
        refine_by_relation([wide], ["r", "s"])


# ---------------------------------------------------------------- held-out prompts
def test_held_out_selects_without_the_measured_prompt(tiny_llama):
    attrs = knlens.attribute(tiny_llama, FACT4, steps=2)
    loose = SelectionPreset(threshold=0.3, strict_threshold=False, p=0.0, min_count=1, strict_count=False,
                            adaptive=False)  # coarse in any selection prompt: never empty
    ho = held_out(tiny_llama, FACT4, attrs, loose, n_random=2)
    assert not ho.folds["fallback"].any()
    for k, row in ho.folds.iterrows():
        expected = refinement([attrs[:k] + attrs[k + 1:]], loose).sets[0]
        assert row["neurons"] == " ".join(map(str, expected)) and row["held_out"] == PROMPTS4[k]
        measured = ho.interventions.frame.query(f"fact == 'fold{k}'")["prompt"].unique().tolist()
        assert measured == [PROMPTS4[k]]
    assert ho.folds["n_selection"].eq(3).all()
    # a fold's set differs from the all-prompt set (otherwise held-out would add nothing here)
    full = refinement([attrs], loose).sets[0]
    assert any(row["neurons"] != " ".join(map(str, full)) for _, row in ho.folds.iterrows())


def test_held_out_says_what_dai_demands_of_few_prompts(tiny_llama):
    attrs = knlens.attribute(tiny_llama, FACT4, steps=2)
    ho = held_out(tiny_llama, FACT4, attrs, "dai", n_random=1)
    assert "coarse in >= 3 of 3" in ho.note and "adapting p cannot relax it" in ho.note
    two = Fact(PROMPTS4[:3], " paris")
    ho3 = held_out(tiny_llama, two, knlens.attribute(tiny_llama, two, steps=2), "dai", n_random=1)
    assert "no neuron can be refined" in ho3.note and ho3.folds["fallback"].all()
    with pytest.raises(ControlError, match="at least 2 prompts"):
        held_out(tiny_llama, Fact(PROMPTS4[:1], " paris"), attrs[:1], "dai")


def test_locate_runs_held_out_by_default_from_four_prompts(tiny_llama):
    four = locate(tiny_llama, FACT4, steps=2, n_random=2, progress=False, specificity=False)
    three = locate(tiny_llama, Fact(PROMPTS4[:3], " paris"), steps=2, n_random=2, progress=False,
                   specificity=False)
    assert four.heldout is not None and len(four.heldout.folds) == 4 and four.settings.held_out
    assert three.heldout is None and any("held-out evaluation off" in n for n in three.notes)
    assert "held-out" in set(four.tests().evaluation) and "held-out" not in set(three.tests().evaluation)
    text = format_result(four)
    assert "Held-out paraphrases: leave one prompt out" in text and "held-out prompts" in text
    assert "cannot reach p < 0.05 with 4 prompts" in text


# ---------------------------------------------------------------- specificity
def test_specificity_fails_for_neurons_that_move_every_fact_alike(tiny_llama):
    kn = NeuronSet([(1, i) for i in range(20)])
    copies = [Fact(FACT4.prompts, FACT4.target, relation=f"r{i}", name=f"copy{i}") for i in range(5)]
    spec = specificity(tiny_llama, FACT4, kn, others=copies)
    s = spec.summary().set_index("action")
    assert (s["p_specific"] == 1.0).all()  # every copy moves exactly as much as the fact itself
    assert s.loc["suppress", "own_delta"] == pytest.approx(s.loc["suppress", "others_delta"], rel=1e-5)
    assert (s["p_specific_floor"] == 1 / 6).all()


def test_specificity_against_other_relations_and_own_delta(tiny_llama):
    kn = NeuronSet([(1, 3), (0, 7)])
    spec = specificity(tiny_llama, FACT4, kn)
    others = spec.frame[~spec.frame.own]
    assert len(others) and "capital" not in set(others.relation) and spec.frame.own.iloc[0]
    res = measure(tiny_llama, [FACT4], [kn], n_random=0, controls=())
    own = res.delta().set_index("action")["delta"]
    s = spec.summary().set_index("action")
    # one fact's rows alone (measure) or among other facts' rows (specificity): float rounding, and Δ is a
    # difference of nearby probabilities
    assert s.loc["suppress", "own_delta"] == pytest.approx(own["suppress"], rel=1e-6, abs=1e-6)
    for action in ("suppress", "enhance"):  # p_specific counts the other facts at least as extreme
        sign = -1 if action == "suppress" else 1
        o = others[others.action == action]["delta"]
        k = int((sign * o >= sign * s.loc[action, "own_delta"]).sum())
        assert s.loc[action, "p_specific"] == pytest.approx((1 + k) / (1 + len(o)))
    facts, basis = other_relation_facts(tiny_llama, Fact(PROMPTS4, " paris"))  # no relation: by target
    assert all(f.relation not in ("capital", "landmark-city") for f in facts) and "no relation" in basis
    with pytest.raises(ControlError, match="no fact of another relation"):
        specificity(tiny_llama, FACT4, kn, others=[])


# ---------------------------------------------------------------- locate: what it records and shows
def test_locate_records_the_engine_that_ran_not_the_one_asked_for(tiny_llama, monkeypatch, tmp_path):
    real = staircase.model_tail
    monkeypatch.setattr(staircase, "model_tail", lambda model: (lambda h, tail=real(model): tail(h) + 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = locate(tiny_llama, FACT4, steps=2, n_random=2, engine="fast", progress=False, specificity=False)
    ran = res.attributions[0].settings.engine
    assert ran != "fast" and res.settings.engine == ran and res.settings.engine_requested == "fast"
    assert f"engine {ran} (asked for fast; fell back)" in format_result(res)
    assert html.escape(f"engine '{ran} (asked for fast; fell back)'") in render_html(res)
    back = knlens.LocateResult.load(res.save(tmp_path))
    assert back.settings.engine == ran and back.settings.engine_requested == "fast"


def test_locate_shows_every_control_with_numbers(tiny_llama, tmp_path):
    res = locate(tiny_llama, FACT4, steps=2, n_random=3, progress=False)
    eff = res.effects()
    assert eff[["neurons", "control"]].values.tolist()[:3] == [["knowledge", ""], ["random", "uniform"],
                                                              ["random", "matched"]]
    tests = res.tests()
    assert set(tests.evaluation) == {"in-sample", "held-out", "specificity"}
    assert tests.p.notna().sum() >= 16 and (tests.p >= tests.p_floor - 1e-12).all()
    text, page = format_result(res), render_html(res)
    for needle in ("matched", "Held-out paraphrases", "Specificity (Dai et al.)", "p_specific", "p_floor"):
        assert needle in text, needle
    for needle in ("magnitude-matched", "Held-out paraphrases", "Specificity", "p_specific", "p_floor"):
        assert needle in page, needle
    d = res.save(tmp_path)
    assert {"heldout.csv", "specificity.csv"} <= {p.name for p in d.iterdir()}
    back = knlens.LocateResult.load(tmp_path)
    assert same(back, res)
    pd.testing.assert_frame_equal(back.tests(), tests, check_exact=True)
    pd.testing.assert_frame_equal(back.heldout.folds, res.heldout.folds, check_exact=True)
    assert back.specificity.basis == res.specificity.basis and back.selection == res.selection


def test_wilcoxon_over_prompts_matches_scipy(tiny_llama):
    res = measure(tiny_llama, [FACT4], [NeuronSet([(1, 3), (0, 7)])], n_random=4, controls=("uniform",))
    f = res.frame[res.frame.action == "suppress"]
    kn = f[f.neurons == "knowledge"].groupby("prompt")["relative"].mean()
    rnd = f[f.neurons == "random"].groupby("prompt")["relative"].mean()
    p = stats.wilcoxon(kn - rnd[kn.index]).pvalue
    assert res.tests(by="prompt").set_index("action").loc["suppress", "p_wilcoxon"] == pytest.approx(p)


def test_significance_table_says_when_the_effect_goes_the_other_way():
    from knlens.methods.interventions import InterventionResult, InterventionSettings
    from knlens.methods.significance import significance_table

    rows = []
    for action, factor, kn_rel in (("suppress", 0.0, 0.3), ("enhance", 2.0, 0.4)):  # suppress raises P: wrong way
        for prompt in ("p1", "p2"):
            rows.append(dict(fact="f", prompt=prompt, action=action, factor=factor, neurons="knowledge", control="",
                             draw=-1, relative=kn_rel))
            rows += [dict(fact="f", prompt=prompt, action=action, factor=factor, neurons="random", control="uniform",
                          draw=d, relative=0.01 * d) for d in range(9)]
    iv = InterventionResult(pd.DataFrame(rows), InterventionSettings(controls=("uniform",)))
    t = significance_table(iv).set_index(["action", "test"])
    assert t.loc[("suppress", "p_empirical (one-sided)"), "note"] == "the tested set moves P(target) the other way (+30.0 %)"
    assert t.loc[("suppress", "p_empirical (one-sided)"), "p"] == 1.0
    assert t.loc[("enhance", "p_empirical (one-sided)"), "p"] == pytest.approx(0.1)  # beyond all 9 draws: floor
    assert t.loc[("enhance", "p_empirical (one-sided)"), "note"].startswith("cannot reach p < 0.05 with 9 random draws")
