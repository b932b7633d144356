"""Causal tracing: exact recovery, windows, batched == loop, spans, corruptions, hook hygiene."""

from __future__ import annotations

import pytest
import torch

import knlens
from knlens.errors import KnlensError, PromptError
from knlens.patching import (Corruption, Trace, group_effects, relation_positions, restore, subject_token_span,
                             token_groups, trace, window_layers)

PROMPT, TARGET, SUBJECT = "the capital of france is", " paris", "france"
N_TOK = 6  # [BOS] the capital of france is


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    # three layers so that windows and partial restorations are not trivially everything
    return knlens.tiny_model(request.param, n_layers=3)


def test_window_layers_clamped():
    assert window_layers(0, 10, 30) == [0, 1, 2, 3, 4]
    assert window_layers(15, 10, 30) == list(range(10, 20))
    assert window_layers(29, 10, 30) == list(range(24, 30))
    assert window_layers(5, 1, 30) == [5]
    assert window_layers(1, 3, 3) == [0, 1, 2]
    assert window_layers(2, 4, 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        window_layers(0, 0, 3)
    with pytest.raises(KnlensError):
        window_layers(3, 2, 3)


def test_subject_span_and_relation(model):
    assert subject_token_span(model, PROMPT, SUBJECT) == (4, 5)
    assert subject_token_span(model, PROMPT, "capital of") == (2, 4)
    assert subject_token_span(model, PROMPT, "France") == (4, 5)  # case-insensitive fallback
    assert relation_positions(model, PROMPT, (4, 5)) == [1, 2, 3]
    with pytest.raises(PromptError):
        subject_token_span(model, PROMPT, "germany")


def test_token_groups():
    assert token_groups(7, (2, 5)) == ["bos", "before", "first subject", "middle subject", "last subject",
                                       "further", "last"]
    assert token_groups(4, (1, 2)) == ["bos", "last subject", "further", "last"]


def test_restore_everything_and_nothing(model):
    n_layers = model.cfg.n_layers
    everything = torch.ones(n_layers, N_TOK, dtype=torch.bool)
    q = knlens.encode(model, [PROMPT], TARGET)
    p_clean = float(knlens.target_probs(model, q)[0])
    corruption = Corruption("noise", samples=2, seed=3)
    p_corr = restore(model, PROMPT, TARGET, subject=SUBJECT, corruption=corruption)
    assert abs(p_corr - p_clean) > 1e-6  # the corruption does something
    # every layer of the residual stream at every token: exactly clean
    p = restore(model, PROMPT, TARGET, subject=SUBJECT, corruption=corruption, restored={"resid": everything})
    assert p == pytest.approx(p_clean, abs=1e-6, rel=0)
    # every MLP and attention output at every token: exactly clean at the (uncorrupted) last token
    p = restore(model, PROMPT, TARGET, subject=SUBJECT, corruption=corruption,
                restored={"mlp": everything, "attn": everything})
    assert p == pytest.approx(p_clean, abs=1e-6, rel=0)
    # nothing restored (empty masks): the corrupted probability
    p = restore(model, PROMPT, TARGET, subject=SUBJECT, corruption=corruption,
                restored={"mlp": ~everything})
    assert p == pytest.approx(p_corr, abs=1e-7, rel=0)


@pytest.mark.parametrize("engine", ["fast", "batched"])
@pytest.mark.parametrize("method", ["noise", "replace", "substitute"])
def test_trace_engines_equal_loop(model, method, engine):
    kinds = ("resid", "mlp", "attn") if method == "noise" else ("attn",)
    kw = dict(subject=SUBJECT, corruption=method, window=2, positions=[0, 3, 4, 5], kinds=kinds, skip_prefix=False)
    if method == "noise":
        kw["samples"] = 2
    if method == "substitute":
        kw["other"] = "germany"
    batched = trace(model, PROMPT, TARGET, engine=engine, batch_size=3, **kw)
    assert batched.settings["engine"] == engine  # no silent fallback
    loop = trace(model, PROMPT, TARGET, engine="loop", **kw)
    assert batched.p_corrupted == pytest.approx(loop.p_corrupted, abs=1e-7)
    for kind in kinds:
        torch.testing.assert_close(batched.effects[kind], loop.effects[kind], atol=1e-6, rtol=0)
        # before the corrupted token nothing differs from the corrupted run
        assert batched.effects[kind][:, :4].abs().max() < 1e-7
    if method == "noise":  # resid at the last layer, last token = the total effect
        assert batched.effects["resid"][-1, -1] == pytest.approx(batched.total_effect, abs=1e-6)
        skipped = trace(model, PROMPT, TARGET, engine=engine, **{**kw, "skip_prefix": True})
        assert torch.all(skipped.effects["resid"][:, 3] == 0)  # not run: exactly zero by causality
        torch.testing.assert_close(skipped.effects["resid"][:, 4:], batched.effects["resid"][:, 4:],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("corrupt", ["subject", "relation"])
def test_fast_trace_default_windows_relation_and_multi_token(model, corrupt):
    """The default engine (fast) equals the loop with the default windows (wider than the model), relation
    corruption, a multi-token target (traced on its first token) and any batch size."""
    kw = dict(subject=SUBJECT, samples=3, corrupt=corrupt)
    loop = trace(model, PROMPT, " paris is", engine="loop", **kw)
    for batch_size in (1, 1000):
        fast = trace(model, PROMPT, " paris is", batch_size=batch_size, **kw)
        assert fast.settings["engine"] == "fast"
        for kind in loop.kinds:
            torch.testing.assert_close(fast.effects[kind], loop.effects[kind], atol=1e-6, rtol=0)


def test_fast_trace_falls_back_when_blocks_cannot_be_driven(model, monkeypatch):
    import knlens.staircase as staircase
    ref = trace(model, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp",), engine="batched")
    monkeypatch.setattr(staircase, "model_tail", lambda model: None)
    fast = trace(model, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp",))
    assert fast.settings["engine"] == "batched"
    torch.testing.assert_close(fast.effects["mlp"], ref.effects["mlp"], atol=0, rtol=0)


def test_trace_matches_restore_of_window(model):
    """A cell of the trace is the restoration of its window of layers at its token."""
    t = trace(model, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp",), window=2, samples=1, positions=[4])
    for layer in range(model.cfg.n_layers):
        m = torch.zeros(model.cfg.n_layers, N_TOK, dtype=torch.bool)
        m[window_layers(layer, 2, model.cfg.n_layers), 4] = True
        p = restore(model, PROMPT, TARGET, subject=SUBJECT, restored={"mlp": m})
        assert t.effects["mlp"][layer, 4] + t.p_corrupted == pytest.approx(p, abs=1e-6)


def test_trace_fact_relation_and_result(tmp_path, tiny_llama):
    fact = knlens.Fact([PROMPT, "the capital city of france is"], TARGET, subject=SUBJECT)
    t = trace(tiny_llama, fact, prompt_index=1, kinds=("resid", "attn"), corrupt="relation")
    assert isinstance(t, Trace) and t.prompt == "the capital city of france is"
    assert t.corrupted == (1, 2, 3, 4) and t.subject_span == (5, 6)
    assert set(t.effects) == {"resid", "attn"} and t.effects["attn"].shape == (2, 7)
    frame = t.to_frame()
    assert len(frame) == 2 * 2 * 7 and set(frame.group) >= {"bos", "last subject", "last"}
    t.save(tmp_path / "t")
    back = Trace.load(tmp_path / "t")
    assert back.tokens == t.tokens and back.corrupted == t.corrupted
    torch.testing.assert_close(back.effects["attn"], t.effects["attn"])
    fig = t.plot()
    assert len(fig.axes) >= 2
    g = group_effects([t, t])
    assert set(g.columns) == {"kind", "group", "layer", "effect", "n"}


def test_noise_scale_and_seed(tiny_gpt2):
    c = Corruption("noise", seed=1)
    std = float(tiny_gpt2.W_E.std())
    assert c.noise_scale(tiny_gpt2) == pytest.approx(3 * std)
    v1, v2 = c.values(tiny_gpt2, [1, 2]), Corruption("noise", seed=1).values(tiny_gpt2, [1, 2])
    assert torch.equal(v1, v2)
    assert not torch.equal(v1, Corruption("noise", seed=2).values(tiny_gpt2, [1, 2]))


def test_bad_inputs(tiny_llama):
    with pytest.raises(PromptError):
        trace(tiny_llama, PROMPT, TARGET)  # no subject
    with pytest.raises(PromptError):
        trace(tiny_llama, PROMPT, TARGET, subject=SUBJECT, corruption="substitute", other="the capital")
    with pytest.raises(ValueError):
        trace(tiny_llama, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp_out",))
    with pytest.raises(ValueError):
        trace(tiny_llama, PROMPT, TARGET, subject=SUBJECT, corruption="substitute")


def test_hooks_removed_after_failure(tiny_llama):
    toks = tiny_llama.to_tokens(PROMPT)
    before = tiny_llama(toks)
    with pytest.raises(ValueError):
        # the replacement vector has the wrong size: fails while hooks would be attached
        restore(tiny_llama, PROMPT, TARGET, subject=SUBJECT, corruption=Corruption("replace", value=torch.ones(3)))
    with pytest.raises(ValueError):
        restore(tiny_llama, PROMPT, TARGET, subject=SUBJECT,
                restored={"resid": torch.ones(1, 1, dtype=torch.bool)})
    after = tiny_llama(toks)
    assert torch.equal(before, after)


def test_trace_command(tmp_path, capsys):
    import argparse

    from knlens.cli_analyses import add_trace_parser

    parser = argparse.ArgumentParser()
    add_trace_parser(parser.add_subparsers())
    args = parser.parse_args(["trace", "--model", "tiny-gpt2", "--prompt", PROMPT, "--target", TARGET,
                              "--subject", SUBJECT, "--kinds", "mlp", "--samples", "1", "--window", "1",
                              "--out", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "P clean" in out and "mlp (window 1)" in out and "last subject" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"trace.json", "trace.safetensors", "trace.csv", "trace.png"}
    assert Trace.load(tmp_path / "trace").effects["mlp"].shape == (2, N_TOK)
    bad = parser.parse_args(["trace", "--model", "tiny-gpt2", "--prompt", PROMPT, "--target", TARGET])
    with pytest.raises(KnlensError):
        bad.func(bad)
