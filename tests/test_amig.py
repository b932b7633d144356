"""AMIG (docs/methods.md, AMIG): the engines agree with a slow reference written from the definition, both
scalings are what they say, the textbook form is complete against its own Δ, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from knlens import load_model
from knlens.core.errors import PromptError, SettingsError
from knlens.core.facts import Fact
from knlens.core.tokens import encode
from knlens.methods.attribution.amig import attribute_amig, attribute_amig_facts, neutral_token
from knlens.methods.attribution.grids import quadrature
from knlens.run.engine import forward
from knlens.run.hooks import hook_name, set_value

KINDS = ("tiny-llama", "tiny-gpt2", "tiny-bert")
PROMPTS = ["the capital of france is", "the official language of the country called france is"]


@pytest.fixture(scope="module")
def models():
    return {k: load_model(k) for k in KINDS}


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def slow_amig(model, prompt, target, steps, grid):
    """AMIG from its definition, one (token, layer) path at a time: plain forwards, no engine, no cache.
    Returns the clean activations a, baselines a'_j and gradient integrals G_j ``[token, layer, d]``, and
    f(a'_j) with layer l alone set to the baseline (``[token, layer]``), and f(a)."""
    q = encode(model, [prompt], target, multi_token="error")
    tokens, pos, tgt = q.tokens, int(q.position[0]), int(q.target[0])
    names = [hook_name(l) for l in range(model.cfg.n_layers)]
    tok = model.tokenizer
    special = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.cls_token_id,
                           tok.sep_token_id, tok.mask_token_id) if i is not None}
    neutral = tok.mask_token_id if model.cfg.attention_dir == "bidirectional" else tok.eos_token_id
    last = tokens.shape[1] - 1 if model.cfg.attention_dir == "bidirectional" else pos
    js = [j for j in range(last + 1) if int(tokens[0, j]) not in special]
    _, cache = model.run_with_cache(tokens)
    a = torch.stack([cache[n][0, pos] for n in names]).float()
    alphas, weights = quadrature(grid, steps)

    def f(name, x):  # P(target) with `name` at the target position set to each row of x
        logits = forward(model, tokens.expand(len(x), -1), [(name, set_value(x, position=pos))])
        return logits[:, pos].float().softmax(-1)[:, tgt]

    base, grads, f_base = [], [], []
    for j in js:
        replaced = tokens.clone()
        replaced[0, j] = neutral
        _, cache_j = model.run_with_cache(replaced)
        b = torch.stack([cache_j[n][0, pos] for n in names]).float()
        g_j, f_j = [], []
        for l, name in enumerate(names):
            x = (b[l] + alphas[:, None].float() * (a[l] - b[l])).requires_grad_(True)
            (g,) = torch.autograd.grad(f(name, x).sum(), x)
            g_j.append((weights[:, None].float() * g).sum(0))
            with torch.no_grad():
                f_j.append(float(f(name, b[l][None])[0]))
        base.append(b)
        grads.append(torch.stack(g_j))
        f_base.append(f_j)
    with torch.no_grad():
        clean = float(forward(model, tokens)[0, pos].float().softmax(-1)[tgt])
    return a, torch.stack(base), torch.stack(grads), torch.tensor(f_base), clean


@pytest.mark.parametrize("kind", KINDS)
def test_engines_equal_the_slow_definition(models, kind):
    model = models[kind]
    a, base, grads, f_base, clean = slow_amig(model, PROMPTS[0], " paris", steps=4, grid="right")
    want = {"textbook": ((a - base) * grads).mean(0), "authors": a * grads.mean(0)}
    for scaling, expected in want.items():
        for engine in ("fast", "batched", "reference"):
            got = attribute_amig(model, PROMPTS[:1], " paris", steps=4, scaling=scaling, engine=engine)[0]
            assert got.settings.engine == engine and not got.settings.engine_note
            assert rel_err(got.scores, expected) < 1e-5, (scaling, engine, rel_err(got.scores, expected))
            torch.testing.assert_close(got.delta, (clean - f_base).mean(0), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got.activations, a, atol=1e-6, rtol=1e-5)
    # the two scalings differ by the baselines' own gradient term, mean_j a'_j · G_j
    authors = attribute_amig(model, PROMPTS[:1], " paris", steps=4)[0]
    textbook = attribute_amig(model, PROMPTS[:1], " paris", steps=4, scaling="textbook")[0]
    assert rel_err(authors.scores - textbook.scores, (base * grads).mean(0)) < 1e-5


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_fast_equals_reference_teacher_forced_and_padded(models, kind):
    model = models[kind]
    prompts, kw = ["the capital of france is", "france is"], dict(steps=3, grid="gauss-legendre", layers=[1, 0])
    fast = attribute_amig(model, prompts, " paris is", scaling="textbook", engine="fast", batch_size=7, **kw)
    ref = attribute_amig(model, prompts, " paris is", scaling="textbook", engine="reference", **kw)
    assert fast[0].settings.multi_token == "teacher_forcing/mean" and fast[0].layers == (1, 0)
    for x, y in zip(fast, ref):
        assert x.settings.engine == "fast" and y.settings.engine == "reference"
        assert rel_err(x.scores, y.scores) < 1e-5
        torch.testing.assert_close(x.delta, y.delta, atol=1e-6, rtol=1e-5)


def test_many_facts_in_one_pass_equal_one_at_a_time(models):
    model = models["tiny-llama"]
    facts = [Fact(PROMPTS, " paris"), Fact(["the capital of spain is"], " madrid")]
    together = attribute_amig_facts(model, facts, steps=3)
    for fact, attrs in zip(facts, together):
        alone = attribute_amig(model, fact, steps=3)
        assert [a.prompt for a in attrs] == list(fact.prompts)
        for x, y in zip(attrs, alone):
            assert rel_err(x.scores, y.scores) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_textbook_completeness_error_vanishes_with_steps(models, kind):
    """Σ_i AMIG_i = mean_j f(a) − f(a'_j) per layer for the textbook form (up to quadrature), not for theirs."""
    model = models[kind]
    errs = [attribute_amig(model, PROMPTS[:1], " paris", steps=m, grid="right", scaling="textbook")[0]
            .relative_completeness_error for m in (2, 8, 32)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05
    gl = attribute_amig(model, PROMPTS[:1], " paris", steps=16, grid="gauss-legendre", scaling="textbook")[0]
    assert gl.relative_completeness_error < 1e-3
    authors = attribute_amig(model, PROMPTS[:1], " paris", steps=16, grid="gauss-legendre")[0]
    assert authors.relative_completeness_error > 10 * gl.relative_completeness_error  # not a completeness axiom


def test_neutral_tokens_and_bad_input(models):
    llama, bert = models["tiny-llama"], models["tiny-bert"]
    assert neutral_token(llama) == llama.tokenizer.eos_token_id
    assert neutral_token(bert) == bert.tokenizer.mask_token_id
    assert neutral_token(llama, "[PAD]") == 0 and neutral_token(llama, 4) == 4
    a = attribute_amig(llama, PROMPTS[:1], " paris", steps=2, neutral="[PAD]")[0]
    assert a.settings.baseline == "AMIG: each of 5 prompt tokens replaced by [PAD], paths averaged"
    assert not torch.allclose(a.scores, attribute_amig(llama, PROMPTS[:1], " paris", steps=2)[0].scores)
    with pytest.raises((SettingsError, TypeError)):  # TypeError: the run-time type checker of the test suite
        attribute_amig(llama, PROMPTS[:1], " paris", scaling="a-prime")
    with pytest.raises(SettingsError, match="not one token"):
        neutral_token(llama, "zebra-token")
    with pytest.raises(SettingsError, match="outside the vocabulary"):
        neutral_token(llama, 10_000)
    with pytest.raises(PromptError, match="no token AMIG can replace"):
        attribute_amig(llama, ["[EOS]"], " paris", steps=2)
