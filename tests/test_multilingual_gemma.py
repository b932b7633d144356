"""The multilingual instruments on the embedded Gemma-3-270M: targets never a BOS, AMIG's fast engine equals its
reference, and the known-in-every-language filter's counts add up on real mParaRel facts."""

from __future__ import annotations

import pytest

import knlens
from knlens.core.tokens import encode
from knlens.data.multilingual import load_multilingual
from knlens.data.pararel import default_data_dir
from knlens.methods.attribution.amig import attribute_amig
from knlens.methods.multilingual.known import known_in_all

pytestmark = pytest.mark.integration


def test_targets_are_never_bos(gemma):
    tok = gemma.tokenizer
    for prompt, target in [("The capital of France is", " Paris"), ("フランスの首都は", "パリ")]:
        q = encode(gemma, [prompt], target)
        assert tok.bos_token_id not in q.target.tolist()
        assert q.tokens[0, 0] == tok.bos_token_id          # the prompt keeps its BOS
        assert tok.decode(q.target[:1]).strip() and tok.decode(q.target).strip() == target.strip()


def test_amig_fast_equals_reference(gemma):
    fact = knlens.Fact(["The official language of France is"], " French")
    kw = dict(steps=2, grid="gauss-legendre", layers=[0, 17], scaling="textbook")
    fast = attribute_amig(gemma, fact, engine="fast", **kw)[0]
    ref = attribute_amig(gemma, fact, engine="reference", **kw)[0]
    assert fast.settings.engine == "fast" and not fast.settings.engine_note
    assert float((fast.scores - ref.scores).abs().max()) < 1e-4 * float(ref.scores.abs().max())


@pytest.mark.skipif(not (default_data_dir() / "mpararel").is_dir(), reason="no mParaRel data folder")
def test_known_counts_add_up(gemma):
    facts = load_multilingual("P36", ["en", "fr", "ja"], max_facts=6)
    kept = known_in_all(gemma, facts)
    c = kept.counts
    assert ((c["known"] + c["not_known"]) == 6).all()
    assert (c["known"] >= len(kept)).all() and set(c["known_in_all"]) == {len(kept)}
    for m in kept:
        assert all(len(m[l].prompts) >= 1 for l in kept.languages)
