"""Spelling-out (knlens/methods/spelling.py, knlens/methods/probes.py): the token filter, the prompt layout, what
one forward reads (checked against plain forwards), probes on a planted linear signal against their control task,
the breakthrough rule, and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knlens.core.errors import InsufficientDataError, SettingsError, SpellingError
from knlens.core.models import mark_in_memory, wrap_hf_model
from knlens.methods.attribution.ig import attribute_facts
from knlens.methods.probes import breakthrough, probe, probe_table
from knlens.methods.spelling import (LETTERS, character_facts, check_word, layout, read_spelling, spellable,
                                     spellable_tokens, spelling_text)
from knlens.run.engine import forward

WORDS = ["house", "plant", "river", "stone", "water", "apple", "garden", "window", "cat"]


@pytest.fixture(scope="module")
def speller():
    """A random 2-block Llama whose word-level vocabulary holds the 26 letters, ':' and a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", ":", *LETTERS, *WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                  unk_token="[UNK]")
    mark_in_memory(tok, "tiny-speller")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2,
                         eos_token_id=3, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.25)
    return wrap_hf_model("tiny-speller", LlamaForCausalLM(config).eval(), tok)


def test_token_filter():
    assert [spellable(t) for t in (" house", " houses", " hous", "house", " House", " ho-se", " naïve")] == \
        [True, True, False, False, False, False, False]
    assert spellable(" hous", min_chars=4)

    class Vocab:  # a tokenizer whose tokens decode to themselves
        def get_vocab(self):
            return {" house": 0, "house": 1, " cat": 2, " Paris": 3, " apple": 4, " gardens": 5}

        def batch_decode(self, ids):
            inverse = {v: k for k, v in self.get_vocab().items()}
            return [inverse[i[0]] for i in ids]
    assert spellable_tokens(Vocab()) == ["house", "gardens"]  # " apple" is a shot, left out
    with pytest.raises(SettingsError):
        spellable_tokens(Vocab(), min_chars=0)


def test_too_short_or_not_letters():
    for bad in ("cat", "Paris", "h0use", ""):
        with pytest.raises(SpellingError, match="at least 5 lowercase letters"):
            spelling_text(bad)
    assert check_word("cat", min_chars=3) == "cat"


def test_layout_and_reads_agree_with_plain_forwards(speller):
    lay = layout(speller, "house", shots=("apple",))
    toks = speller.tokenizer.convert_ids_to_tokens(lay.tokens[0].tolist())
    assert toks[lay.source] == "house" and [toks[p] for p in lay.emit] == [":", "h", "o", "u", "s"]
    assert speller.tokenizer.convert_ids_to_tokens(list(lay.targets)) == list("house")
    reads = read_spelling(speller, ["house", "plant", "cat", "zebra", "garden"], shots=("apple",))
    assert reads.words == ("house", "plant", "garden")
    assert set(reads.skipped) == {"cat", "zebra"}  # too short; not one token
    assert "at least 5" in reads.skipped["cat"] and "not one vocabulary entry" in reads.skipped["zebra"]
    assert reads.features.shape == (3, 3, 32) and reads.attention.shape == (3, 2, 5)
    for i, word in enumerate(reads.words):  # each word alone, plain forwards
        lay = layout(speller, word, shots=("apple",))
        seen = {}
        hooks = [("hook_embed", lambda a, hook: seen.__setitem__("e", a[0, lay.source].clone())),
                 ("blocks.1.hook_resid_post", lambda a, hook: seen.__setitem__("r", a[0, lay.source].clone())),
                 ("blocks.1.attn.hook_pattern", lambda a, hook: seen.__setitem__("a", a[0].mean(0).clone()))]
        logits = forward(speller, lay.tokens, hooks)[0]
        assert torch.allclose(reads.features[i, 0], seen["e"], atol=1e-5)
        assert torch.allclose(reads.features[i, 2], seen["r"], atol=1e-5)
        emit = list(lay.emit[:5])
        assert torch.allclose(reads.attention[i, 1], seen["a"][emit, lay.source], atol=1e-5)
        top = logits[emit].argmax(-1)
        assert torch.equal(reads.correct[i], top == torch.tensor(lay.targets[:5]))
        p = logits[emit].softmax(-1)[torch.arange(5), torch.tensor(lay.targets[:5])]
        assert torch.allclose(reads.p_char[i], p, atol=1e-5)
    with pytest.raises(SettingsError, match="distinct"):
        read_spelling(speller, ["house", "house"])


def test_character_neurons_by_ig(speller):
    facts = character_facts(["house", "plant"], 2, shots=("apple",))
    assert facts[0].target == " u" and facts[0].prompts[0].endswith("house : h o")
    attrs = attribute_facts(speller, facts, steps=4)
    assert [a[0].target for a in attrs] == [" u", " a"] and attrs[0][0].scores.shape == (2, 48)
    with pytest.raises(SettingsError):
        character_facts(["house"], 5)


def _planted(n_words: int = 600, d: int = 40, seed: int = 0):
    """Words whose character k=1 is written linearly into feature 1 (not into feature 0)."""
    rng = np.random.default_rng(seed)
    words = sorted({"".join(rng.choice(list(LETTERS[:8]), 6)) for _ in range(n_words * 2)})[:n_words]
    direction = rng.normal(size=(8, d)) * 3
    second = np.array([LETTERS.index(w[1]) for w in words])
    noise = rng.normal(size=(len(words), 2, d))
    noise[:, 1] += direction[second]
    return words, noise


def test_probe_finds_a_planted_signal_and_the_control_does_not():
    words, features = _planted()
    table = probe_table(features, words, [1], ["embedding", "layer 0"])
    planted = table.set_index("feature").loc["layer 0"]
    assert planted.accuracy > 0.9 and planted.control < 0.3 and planted.selectivity > 0.6
    absent = table.set_index("feature").loc["embedding"]
    assert absent.accuracy < 0.3, "no signal: a probe stays near chance"
    assert planted.n_test + planted.n_train == len(words) and planted.classes == 8


def test_rare_classes_are_dropped_and_counted():
    rng = np.random.default_rng(1)
    y = np.array(["a"] * 30 + ["b"] * 30 + ["z"] * 3)
    r = probe(rng.normal(size=(len(y), 5)), y)
    assert r["dropped"] == 3 and r["classes"] == 2
    with pytest.raises(InsufficientDataError, match="at least 4 examples in each of at least 2 classes"):
        probe(rng.normal(size=(33, 5)), ["a"] * 30 + ["z"] * 3)
    with pytest.raises(SettingsError, match="distinct words"):
        probe_table(np.zeros((2, 1, 3)), ["house", "house"], [0], ["embedding"])


def test_breakthrough_rule():
    words, features = _planted()
    flat = np.concatenate([features[:, :1]] * 3 + [features[:, 1:]] * 2, axis=1)
    names = ["embedding", "layer 0", "layer 1", "layer 2", "layer 3"]
    b = breakthrough(probe_table(flat, words, [1], names))
    assert b["layer"] == "layer 2" == b["largest_jump"] and b["best"] > 0.9 > 0.3 > b["embedding"]
    assert b["clear"] and 0 <= b["noise"] < 0.1
    flat = breakthrough(probe_table(np.repeat(features[:, :1], 4, axis=1), words, [1], names[:4]))
    assert not flat["clear"] and flat["rise"] < flat["noise"], "no signal anywhere: no breakthrough"


def test_study_on_given_words(speller):
    from knlens.studies.spelling_study import TABLES, SpellingSettings, spelling_study
    from knlens.viz.spelling_page import render_markdown

    settings = SpellingSettings(model="tiny-speller", given=("house", "plant", "river", "stone", "zebra"),
                                shots=("apple",), neuron_words=2, steps=2, top=5)
    r = spelling_study(speller, settings)
    assert set(r.tables) == set(TABLES)
    assert r.tables["counts"].iloc[0][["sampled", "read", "skipped"]].tolist() == [5, 4, 1]
    assert r.tables["accuracy"]["words"].tolist() == [4] * 5
    assert any("no probes" in n and "at least 4 examples" in n for n in r.notes)  # 4 words cannot train a probe
    assert r.tables["attention"].shape == (2 * 5, 3)
    page = render_markdown(r)
    assert "Spelling" in page and "no probes" in page


def test_cli_bad_input_is_one_error_line(capsys):
    from knlens.cli import main

    assert main(["study", "spelling", "--model", "tiny-llama", "--quiet", "--words", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no spellable token" in err[0]
    assert main(["study", "spelling", "--model", "tiny-llama", "--quiet", "--n-chars", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_chars" in err[0]
