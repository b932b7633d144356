"""Keep the multilingual facts a model knows in every language, counting what each language loses.

A fact's version in one language is *known* when the model's greedy continuation of its prompts is the
target (:func:`~knlens.methods.known.answers_many`: a multi-token target is teacher-forced, every gold token
must be the argmax). The facts of all languages run in one batched pass.

>>> from knlens import load_model, Fact
>>> from knlens.data.multilingual import MultilingualFact, MultilingualFacts
>>> import pandas as pd
>>> m = MultilingualFact("P36", "Q142", "Q90", {"en": Fact(["the capital of france is"], " paris"),
...                                             "de": Fact(["the capital city of france is"], " paris")})
>>> facts = MultilingualFacts((m,), ("en", "de"), pd.DataFrame({"language": ["en", "de"]}))
>>> kept = known_in_all(load_model("tiny-llama"), facts)
>>> list(kept.counts.columns)
['language', 'known', 'not_known', 'multi_token_targets', 'known_in_all']
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from knlens.core.errors import SettingsError
from knlens.data.multilingual import MultilingualFact, MultilingualFacts
from knlens.core.tokens import target_tokens
from knlens.methods.known import answers_many

__all__ = ["known_in_all"]


def known_in_all(model: Any, facts: MultilingualFacts, *, keep_prompts: str = "correct", min_prompts: int = 1,
                 batch_size: int = 64) -> MultilingualFacts:
    """The facts known in every language of ``facts``, with ``counts`` extended by, per language, ``known``
    (facts known there), ``not_known`` (skipped for this language: the fact is dropped everywhere),
    ``multi_token_targets`` (facts whose target is more than one token there: teacher-forced) and
    ``known_in_all`` (facts kept).

    ``keep_prompts="correct"`` (default) keeps, in each language, the prompts the model answers, and counts a
    fact as known there with at least ``min_prompts`` of them; ``"all"`` needs every prompt answered and keeps
    them all.
    """
    if keep_prompts not in ("all", "correct"):
        raise SettingsError(f"keep_prompts must be 'all' or 'correct', got {keep_prompts!r}")
    if min_prompts < 1:
        raise SettingsError(f"min_prompts must be at least 1, got {min_prompts}")
    langs = facts.languages
    flat = [m[l] for l in langs for m in facts]
    ok = answers_many(model, flat, batch_size=batch_size)
    n = len(facts)
    known = {l: [bool(ok[i * n + j].all()) if keep_prompts == "all" else int(ok[i * n + j].sum()) >= min_prompts
                 for j in range(n)] for i, l in enumerate(langs)}
    kept = []
    for j, m in enumerate(facts):
        if all(known[l][j] for l in langs):
            versions = {l: m[l] if keep_prompts == "all" else
                        replace(m[l], prompts=tuple(p for p, o in zip(m[l].prompts, ok[i * n + j]) if o))
                        for i, l in enumerate(langs)}
            kept.append(MultilingualFact(m.relation, m.subject_uri, m.object_uri, versions))
    counts = facts.counts.copy()
    by_lang = {l: (sum(known[l]), n - sum(known[l]), sum(len(target_tokens(model, m[l].target)) > 1 for m in facts))
               for l in langs}
    counts["known"] = counts["language"].map(lambda l: by_lang[l][0])
    counts["not_known"] = counts["language"].map(lambda l: by_lang[l][1])
    counts["multi_token_targets"] = counts["language"].map(lambda l: by_lang[l][2])
    counts["known_in_all"] = len(kept)
    return MultilingualFacts(tuple(kept), langs, counts)
