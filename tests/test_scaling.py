"""Suppress / enhance on the fast engines equals the plain forwards of the published code, and checks itself.

``fast`` (prefix cache + staircase from each set's lowest layer) and ``batched`` (prefix cache, every block)
must give the ``reference`` probabilities (one plain whole-prompt forward per (set, row)) on causal and masked
tiny models, single- and multi-token targets, prompts of several lengths, empty sets and a custom baseline; a
broken fast path must fall back loudly with the reference numbers and say so in the results' settings.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import knlens
from breakages import cache_ignored
from knlens.core.errors import EngineFallbackWarning
from knlens.core.neurons import NeuronSet
from knlens.methods import scaling
from knlens.methods.interventions import measure
from knlens.methods.scaling import scaled_probs
from knlens.methods.specificity import specificity

PROMPTS = ["the capital of france is", "the capital of spain is", "paris is the capital city of"]
SETS = [NeuronSet([(1, 3), (1, 7)]), NeuronSet([(0, 5)]), NeuronSet(), NeuronSet([(0, 1), (1, 2), (1, 40)])]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("target", [" paris", " paris is"])
def test_every_engine_gives_the_reference_probabilities(kind, target):
    model = knlens.tiny_model(kind)
    if kind == "bert" and target != " paris":
        pytest.skip("a masked LM predicts one token")
    q = knlens.encode(model, PROMPTS, target)
    ref = scaled_probs(model, q, SETS, [0.0, 2.0], engine="reference")
    for engine in ("fast", "batched"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", EngineFallbackWarning)
            got = scaled_probs(model, q, SETS, [0.0, 2.0], engine=engine, batch_size=5)
        assert got.engine == engine and got.note == ""
        torch.testing.assert_close(got.after, ref.after, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got.clean, ref.clean, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ref.after[:, 2], ref.clean.expand(2, -1))  # the empty set changes nothing


def test_custom_baseline_and_other_hook_point(tiny_llama):
    base = torch.randn(2, tiny_llama.cfg.d_mlp, generator=torch.Generator().manual_seed(0))
    q = knlens.encode(tiny_llama, PROMPTS, " paris")
    for point in ("hook_post", "hook_pre_linear"):
        ref = scaled_probs(tiny_llama, q, SETS, [0.0, 2.0], baseline=base, hook_point=point, engine="reference")
        got = scaled_probs(tiny_llama, q, SETS, [0.0, 2.0], baseline=base, hook_point=point)
        torch.testing.assert_close(got.after, ref.after, rtol=1e-4, atol=1e-7)


def test_a_staircase_that_moves_the_wrong_rows_is_caught(tiny_llama, monkeypatch):
    q = knlens.encode(tiny_llama, PROMPTS, " paris")
    ref = scaled_probs(tiny_llama, q, SETS, [0.0, 2.0], engine="reference")
    hooks = scaling._staircase_hooks

    def shifted(row_masks, *args, **kwargs):  # each unit gets the next unit's neurons
        return hooks(row_masks.roll(1, dims=0), *args, **kwargs)
    monkeypatch.setattr(scaling, "_staircase_hooks", shifted)
    with pytest.warns(EngineFallbackWarning, match="P\\(target\\) of set"):
        got = scaled_probs(tiny_llama, q, SETS, [0.0, 2.0])
    assert got.engine == "reference" and got.note.startswith("fast -> reference")
    torch.testing.assert_close(got.after, ref.after)


def test_an_ignored_cache_falls_back_and_is_recorded(tiny_llama, monkeypatch):
    fact = knlens.Fact(PROMPTS, " paris", relation="capital", name="fr")
    want = measure(tiny_llama, [fact], [SETS[0]], n_random=3, engine="reference")
    monkeypatch.setattr(scaling, "cache_keyword_fix", cache_ignored)
    with pytest.warns(EngineFallbackWarning, match="cache is not honoured"):
        got = measure(tiny_llama, [fact], [SETS[0]], n_random=3)
    assert got.settings.engine == "reference" and "fast -> reference" in got.settings.engine_note
    torch.testing.assert_close(torch.tensor(got.frame.p_after.to_numpy()), torch.tensor(want.frame.p_after.to_numpy()),
                               rtol=1e-5, atol=1e-8)


def test_measure_and_specificity_record_the_engine_and_agree(tiny_llama):
    fact = knlens.Fact(PROMPTS, " paris", relation="capital", name="fr")
    fast, ref = (measure(tiny_llama, [fact], [SETS[0]], n_random=4, engine=e) for e in ("fast", "reference"))
    assert (fast.settings.engine, ref.settings.engine) == ("fast", "reference")
    for col, atol in (("p_before", 1e-8), ("p_after", 1e-8), ("relative", 1e-5)):  # relative: a − b cancels
        torch.testing.assert_close(torch.tensor(fast.frame[col].to_numpy()), torch.tensor(ref.frame[col].to_numpy()),
                                   rtol=1e-4, atol=atol)
    assert fast.frame.drop(columns=["p_before", "p_after", "change", "relative"]).equals(
        ref.frame.drop(columns=["p_before", "p_after", "change", "relative"]))
    others = [knlens.Fact(["the currency of japan is"], " yen", relation="currency", name="yen"),
              knlens.Fact(["the capital city of france is", "the official language of japan is"], " japanese",
                          relation="language", name="ja")]
    sf, sr = (specificity(tiny_llama, fact, SETS[3], others=others, engine=e) for e in ("fast", "reference"))
    assert sf.settings.engine == sr.settings.engine == "reference"  # one set, two actions: below MIN_UNITS
    torch.testing.assert_close(torch.tensor(sf.frame.delta.to_numpy()), torch.tensor(sr.frame.delta.to_numpy()),
                               rtol=1e-4, atol=1e-8)


def test_few_sets_run_on_plain_forwards(tiny_llama):
    q = knlens.encode(tiny_llama, PROMPTS, " paris")
    few = SETS[:scaling.MIN_UNITS // 2 - 1]
    got = scaled_probs(tiny_llama, q, few, [0.0, 2.0], engine="fast")
    assert got.engine == "reference" and got.note == ""
    torch.testing.assert_close(got.after, scaled_probs(tiny_llama, q, few, [0.0, 2.0], engine="reference").after)
