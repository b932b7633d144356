"""Causal tracing: exact recovery, windows, engines == loop, engines that check themselves, embeddings as the
model adds them, known facts only, spans, corruptions, hook hygiene, the CLI."""

from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch

import knlens
import knlens.methods.tracing.fast as tracing_fast
import knlens.methods.tracing.setup as tracing_setup
import knlens.methods.tracing.trace as patching
from breakages import cache_ignored
from knlens.core.errors import EngineFallbackWarning, KnlensError, NotKnownError, PromptError, TracingSettingError
from knlens.run.hooks import capture, hooked
from knlens.methods.tracing.corruption import Corruption
from knlens.methods.tracing.result import Trace, group_effects
from knlens.methods.tracing.spans import relation_positions, subject_token_span, token_groups, window_layers
from knlens.methods.tracing.trace import restore, trace_facts

PROMPT, TARGET, SUBJECT = "the capital of france is", " paris", "france"
N_TOK = 6  # [BOS] the capital of france is

# random tiny models know no fact: trace them all (the known-only rule has its own tests below)
trace = functools.partial(patching.trace, known_only=False)


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
    with pytest.raises(TracingSettingError):
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
    assert batched.settings.engine == engine  # no silent fallback
    loop = trace(model, PROMPT, TARGET, engine="reference", **kw)
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
    loop = trace(model, PROMPT, " paris is", engine="reference", **kw)
    for batch_size in (1, 1000):
        fast = trace(model, PROMPT, " paris is", batch_size=batch_size, **kw)
        assert fast.settings.engine == "fast"
        for kind in loop.kinds:
            torch.testing.assert_close(fast.effects[kind], loop.effects[kind], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 1000])
def test_fast_forks_and_shared_windows_equal_the_loop(kind, batch_size):
    """Six layers, window 4: windows [0, 2), [0, 3), [0, 4) share their first block (the narrower ones fork
    from the widest), [2, 6) and [3, 6) are clamped; every token, kind and sample in few staircase runs
    (batch_size 1000) or split into runs of one fork group (batch_size 1) gives the loop's numbers."""
    six = knlens.tiny_model(kind, n_layers=6)
    kw = dict(subject="capital of", samples=3, window=4, corrupt="subject")
    loop = trace(six, PROMPT, TARGET, engine="reference", **kw)
    fast = trace(six, PROMPT, TARGET, batch_size=batch_size, **kw)
    assert fast.settings.engine == "fast" and fast.settings.engine_note == ""
    for k in loop.kinds:
        torch.testing.assert_close(fast.effects[k], loop.effects[k], atol=1e-6, rtol=0)
    assert fast.effects["mlp"][:, 2:].abs().max() > 1e-4  # the restorations do something


def test_fork_groups():
    groups = tracing_fast.fork_groups("attn", [(0, 4), (0, 2), (0, 3), (2, 6), (3, 6), (3, 6)])
    assert [[(u.start, u.end, u.entry, u.parent) for u in g] for g in groups] == [
        [(0, 4, 0, -1), (0, 3, 3, 0), (0, 2, 2, 0)], [(2, 6, 2, -1)], [(3, 6, 3, -1)]]


def test_fast_trace_falls_back_when_blocks_cannot_be_driven(model, monkeypatch):
    import knlens.run.staircase as staircase
    ref = trace(model, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp",), engine="batched")
    monkeypatch.setattr(staircase, "model_tail", lambda model: None)
    with pytest.warns(EngineFallbackWarning, match="staircase cannot be built"):
        fast = trace(model, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp",))
    assert fast.settings.engine == "batched" and fast.settings.engine_requested == "fast"
    torch.testing.assert_close(fast.effects["mlp"], ref.effects["mlp"], atol=0, rtol=0)


def test_trace_matches_restore_of_window(model):
    """A cell of the trace is the restoration of its window of layers at its token."""
    t = trace(model, PROMPT, TARGET, subject=SUBJECT, kinds=("mlp",), window=2, samples=1, positions=[4])
    for layer in range(model.cfg.n_layers):
        m = torch.zeros(model.cfg.n_layers, N_TOK, dtype=torch.bool)
        m[window_layers(layer, 2, model.cfg.n_layers), 4] = True
        p = restore(model, PROMPT, TARGET, subject=SUBJECT, restored={"mlp": m}, corruption=Corruption(samples=1))
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
    assert set(g.frame.columns) == {"kind", "group", "layer", "effect", "n"}


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


CLI = ["trace", "--model", "tiny-gpt2", "--prompt", PROMPT, "--target", TARGET, "--subject", SUBJECT, "--quiet"]


def test_trace_command(tmp_path, capsys):
    from knlens.cli import main

    assert main([*CLI, "--kinds", "mlp", "--samples", "1", "--window", "1", "--allow-unknown",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "P clean" in out and "mlp (window 1)" in out and "last subject" in out
    assert "engine fast   noise samples 1" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"result.json", "tensors.safetensors", "trace.csv", "trace.png"}
    assert Trace.load(tmp_path).effects["mlp"].shape == (2, N_TOK)


@pytest.mark.parametrize("misuse", [
    ["--window", "0"], ["--window", "-3"], ["--samples", "0"], ["--batch-size", "0"], ["--noise-factor", "0"],
    ["--subject", "germany"], ["--subject-span", "3", "9"], ["--corruption", "substitute", "--other", "the capital"],
    ["--target", " ugh"], [],  # [] : a random model does not know the fact, and --allow-unknown is not given
    ["--out", "FILE/sub"]])
def test_trace_command_misuse_is_one_error_line(misuse, tmp_path, capsys):
    from knlens.cli import main

    (tmp_path / "FILE").write_text("a file, not a folder")
    misuse = [str(tmp_path / m) if m == "FILE/sub" else m for m in misuse]
    assert main([*CLI, "--kinds", "mlp", "--samples", "1", *misuse]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


# ------------------------------------------------------------------- engines that check themselves

def _break_prefix(monkeypatch):
    """Wrong keys and values in the corrupted prefix cache. The staircase recorded on that cache reproduces
    the cached forward it was recorded from (its own check passes); only a plain forward can tell."""
    original = tracing_fast.corrupted_prefix

    def wrong(model, tokens, hooks):
        cache = original(model, tokens, hooks)
        for layer in cache.layers:
            layer.keys.mul_(-1.0)
            layer.values.mul_(0.0)
        return cache
    monkeypatch.setattr(tracing_fast, "corrupted_prefix", wrong)


@contextlib.contextmanager
def _no_keyword_fix(model):
    yield


@pytest.mark.parametrize("breakage", ["wrong prefix", "cache ignored"])
def test_broken_cache_falls_back_to_numbers_equal_to_the_loop(model, breakage, monkeypatch, tmp_path):
    kw = dict(subject=SUBJECT, samples=2, window=2)
    loop = trace(model, PROMPT, TARGET, engine="reference", **kw)
    if breakage == "wrong prefix":
        _break_prefix(monkeypatch)
    else:
        monkeypatch.setattr(patching, "cache_keyword_fix", _no_keyword_fix)  # as if compat missed a renamed keyword
    why = "P_corrupted through the cached prefix" if breakage == "wrong prefix" else "staircase cannot be built"
    with cache_ignored(model) if breakage == "cache ignored" else contextlib.nullcontext():
        with pytest.warns(EngineFallbackWarning, match=why):
            t = trace(model, PROMPT, TARGET, **kw)
    assert t.settings.engine == "batched" and t.settings.engine_requested == "fast"
    assert t.settings.engine_note.startswith("fast -> batched: ")
    assert t.p_clean == loop.p_clean and t.p_corrupted == loop.p_corrupted
    for kind in loop.kinds:
        torch.testing.assert_close(t.effects[kind], loop.effects[kind], atol=1e-6, rtol=0)
    t.save(tmp_path / "t")
    assert Trace.load(tmp_path / "t").settings.engine == "batched"


def test_broken_prefix_is_reported_by_the_command(monkeypatch, capsys):
    from knlens.cli import main

    _break_prefix(monkeypatch)
    with pytest.warns(EngineFallbackWarning):
        assert main([*CLI, "--kinds", "mlp", "--samples", "2", "--allow-unknown"]) == 0
    assert "engine batched (fast -> batched: P_corrupted through the cached prefix" in capsys.readouterr().out


def test_broken_cache_and_batching_fall_back_to_the_loop(model, monkeypatch):
    kw = dict(subject=SUBJECT, samples=2, window=2, kinds=("mlp", "attn"))
    loop = trace(model, PROMPT, TARGET, engine="reference", **kw)
    _break_prefix(monkeypatch)
    original = tracing_setup.restore_hooks

    def shifted(clean, masks, n_layers):  # each batch row gets its neighbour's restoration
        return original(clean, {k: m.roll(1, 0) for k, m in masks.items()}, n_layers)
    monkeypatch.setattr(tracing_setup, "restore_hooks", shifted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trace(model, PROMPT, TARGET, **kw)
    notes = [str(w.message) for w in caught if issubclass(w.category, EngineFallbackWarning)]
    assert len(notes) == 2 and "'fast'" in notes[0] and "'batched'" in notes[1] and "rows of one batch" in notes[1]
    assert t.settings.engine == "reference"
    for kind in loop.kinds:
        torch.testing.assert_close(t.effects[kind], loop.effects[kind], atol=0, rtol=0)


def test_sound_engines_do_not_warn(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        for engine in ("fast", "batched"):
            t = trace(model, PROMPT, TARGET, subject=SUBJECT, samples=2, kinds=("mlp",), engine=engine)
            assert t.settings.engine == engine and t.settings.engine_note == ""


# ------------------------------------------------------------ the embeddings as the model adds them

@pytest.fixture(scope="module")
def tiny_gemma3():
    """A random Gemma-3: its embedding layer multiplies W_E's rows by √d_model = 8 inside hook_embed."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(knlens.core.models.TINY_VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=2,
        eos_token_id=3, pad_token_id=0, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        initializer_range=0.25, architectures=["Gemma3ForCausalLM"])
    return knlens.core.models.random_model(config)


def test_noise_and_replacements_come_from_hook_embed(tiny_gemma3):
    model = tiny_gemma3
    seen = []  # the embeddings as an ordinary forward adds them, over the whole vocabulary
    with hooked(model, [("hook_embed", capture(seen))]):
        model(torch.arange(model.cfg.d_vocab)[None])
    added = seen[0][0]
    assert float(added.std()) == pytest.approx(8 * float(model.W_E.std()), rel=1e-4)  # what W_E would miss
    assert Corruption().noise_scale(model) == pytest.approx(3 * float(added.std()), rel=1e-4)
    torch.testing.assert_close(Corruption("replace").values(model, [4, 5]), added.mean(0).expand(1, 2, -1),
                               atol=1e-5, rtol=0)
    # the subject substituted by itself: no corruption at all
    same = trace(model, PROMPT, TARGET, subject=SUBJECT, corruption="substitute", other=SUBJECT, kinds=("mlp",))
    assert same.p_corrupted == pytest.approx(same.p_clean, abs=1e-6, rel=0)
    t = trace(model, PROMPT, TARGET, subject=SUBJECT, samples=2, window=1)
    assert t.settings.corruption["scale"] == pytest.approx(3 * float(added.std()), rel=1e-4)
    loop = trace(model, PROMPT, TARGET, subject=SUBJECT, samples=2, window=1, engine="reference")
    assert t.settings.engine == "fast"
    for kind in loop.kinds:
        torch.testing.assert_close(t.effects[kind], loop.effects[kind], atol=1e-6, rtol=0)


def test_default_noise_is_meng_et_al(tiny_gpt2):
    t = trace(tiny_gpt2, PROMPT, TARGET, subject=SUBJECT, kinds=("resid",))
    assert t.settings.samples == t.settings.corruption["samples"] == 10
    assert t.settings.corruption["statistics_from"] == "hook_embed"


# ------------------------------------------------------------------------------ known facts only

def _top_word(model, prompt):
    return " " + model.tokenizer.decode([int(model(model.to_tokens(prompt))[0, -1].argmax())]).strip()


def test_only_known_facts_are_traced(tiny_llama):
    with pytest.raises(NotKnownError, match="known_only=False"):
        patching.trace(tiny_llama, PROMPT, TARGET, subject=SUBJECT, samples=1)
    known = _top_word(tiny_llama, PROMPT)
    t = patching.trace(tiny_llama, PROMPT, known, subject=SUBJECT, samples=1, kinds=("resid",))
    assert t.settings.known and t.settings.clean_top_token == t.settings.target_token
    facts = [knlens.Fact([PROMPT], TARGET, subject=SUBJECT, name="not-known"),
             knlens.Fact([PROMPT], known, subject=SUBJECT, name="known")]
    with pytest.warns(UserWarning, match="skipped 1 of 2 facts the model does not know .*not-known"):
        traces = trace_facts(tiny_llama, facts, samples=1, kinds=("resid",))
    assert [t.target for t in traces] == [known]
    everything = trace_facts(tiny_llama, facts, known_only=False, samples=1, kinds=("resid",))
    assert [t.settings.known for t in everything] == [False, True]
