"""Spelling-out (Hiraoka & Inui; docs/methods.md, spelling-out): which tokens can be spelled, few-shot prompts that
make the model spell them, and one forward per word that reads everything the probes, the accuracy table and
the attention table need.

The data is the tokenizer's vocabulary: a token is *spellable* when it decodes to a leading space followed by at
least ``min_chars`` lowercase ASCII letters (one vocabulary entry, word-initial). The prompt is a few shots of
``word : w o r d`` lines and then the word to spell; the step *emitting* character ``k`` (0-based) is the
position whose next token is that character (``:`` for ``k = 0``, character ``k − 1`` after).

>>> spellable(" house"), spellable(" cat"), spellable("house"), spellable(" House")
(True, False, False, False)
>>> print(spelling_text("house", shots=("apple",), upto=2))
 apple : a p p l e
 house : h o
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from knlens.core.errors import SettingsError, SpellingError
from knlens.core.facts import Fact
from knlens.methods.tracing.corruption import EMBED_HOOK
from knlens.run.engine import forward
from knlens.run.hooks import hook_name

__all__ = ["LETTERS", "DEFAULT_SHOTS", "MIN_CHARS", "spellable", "spellable_tokens", "check_word", "spelling_text",
           "Layout", "layout", "SpellingReads", "read_spelling", "character_facts"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEFAULT_SHOTS: tuple[str, ...] = ("apple", "garden", "window")  # the few-shot examples (left out of the data)
MIN_CHARS = 5  # Hiraoka & Inui's tokens have at least 5 characters


def spellable(text: str, min_chars: int = MIN_CHARS) -> bool:
    """A decoded token that is word-initial (one leading space) and ``min_chars`` or more lowercase a–z."""
    word = text[1:]
    return text[:1] == " " and len(word) >= min_chars and all(c in LETTERS for c in word)


def spellable_tokens(tokenizer: Any, *, min_chars: int = MIN_CHARS, exclude: Sequence[str] = DEFAULT_SHOTS
                     ) -> list[str]:
    """The spellable vocabulary entries of ``tokenizer`` (as words without the space), in id order; ``exclude``
    (the shots) is left out.

    >>> from knlens import load_model
    >>> spellable_tokens(load_model("tiny-llama").tokenizer)     # a word-level tokenizer decodes no space
    []
    """
    if min_chars < 1:
        raise SettingsError(f"min_chars must be at least 1, got {min_chars}")
    ids = sorted(tokenizer.get_vocab().values())
    texts = tokenizer.batch_decode([[i] for i in ids])
    skip = set(exclude)
    return [t[1:] for t in texts if spellable(t, min_chars) and t[1:] not in skip]


def check_word(word: str, min_chars: int = MIN_CHARS) -> str:
    """``word`` if it can be spelled (``min_chars`` or more lowercase a–z), else :class:`SpellingError`.

    >>> check_word("cat")
    Traceback (most recent call last):
    ...
    knlens.core.errors.SpellingError: the token 'cat' has 3 characters; spelling-out needs tokens of at least 5 lowercase letters a-z
    """
    if len(word) < min_chars or not all(c in LETTERS for c in word):
        raise SpellingError(f"the token {word!r} has {len(word)} characters; spelling-out needs tokens of at least "
                            f"{min_chars} lowercase letters a-z")
    return word


def spelling_text(word: str, *, shots: Sequence[str] = DEFAULT_SHOTS, upto: int | None = None,
                  min_chars: int = MIN_CHARS) -> str:
    """The few-shot prompt spelling ``word``: its first ``upto`` characters spelled (all when None)."""
    check_word(word, min_chars)
    spelled = word if upto is None else word[:upto]
    lines = [f" {s} : {' '.join(s)}" for s in shots] + [f" {word} :" + "".join(f" {c}" for c in spelled)]
    return "\n".join(lines)


@dataclass(frozen=True)
class Layout:
    """Where things sit in the tokens of a word's fully spelled prompt: the source token, the step emitting each
    character (``emit[k]`` predicts character ``k``) and each character's token id."""

    word: str
    tokens: Tensor  # [1, pos]
    source: int
    emit: tuple[int, ...]
    targets: tuple[int, ...]


def layout(model: Any, word: str, *, shots: Sequence[str] = DEFAULT_SHOTS, min_chars: int = MIN_CHARS) -> Layout:
    """The :class:`Layout` of ``word``; :class:`SpellingError` when the word is not one token of the model or the
    spelled characters are not one token each (the prompt would not read as a spelling)."""
    tok = model.tokenizer
    ids = tok(f" {word}", add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or tok.decode(ids).strip() != word:
        raise SpellingError(f"' {word}' is {len(ids)} tokens of this model, not one vocabulary entry")
    full = model.to_tokens(spelling_text(word, shots=shots, min_chars=min_chars))
    lengths = [model.to_tokens(spelling_text(word, shots=shots, upto=k, min_chars=min_chars)).shape[1]
               for k in range(len(word) + 1)]
    n = full.shape[1]
    if lengths != list(range(n - len(word), n + 1)):
        raise SpellingError(f"the spelled characters of {word!r} are not one token each in this model's tokenizer")
    colon = lengths[0] - 1
    source = colon - 1
    chars = tok.batch_decode([[int(t)] for t in full[0, colon + 1:]])
    if [c.strip() for c in chars] != list(word):
        raise SpellingError(f"the characters of {word!r} are not tokens of this model (they read {chars})")
    if int(full[0, source]) != ids[0]:
        raise SpellingError(f"' {word}' is not a token of its spelling prompt (the tokenizer merges it)")
    return Layout(word, full, source, tuple(range(colon, n - 1)), tuple(int(t) for t in full[0, colon + 1:]))


@dataclass(frozen=True, eq=False)
class SpellingReads:
    """What one forward per word gives, for words that could be laid out (``skipped``: the others, with why).

    ``features[w, 0]`` is the embedding (``hook_embed``) of word ``w``'s token, ``features[w, 1 + l]`` its
    ``blocks.{l}.hook_resid_post``, both at the source token of its spelling prompt; ``correct[w, k]`` whether the
    model's top token at the step emitting character ``k`` is that character (teacher forced), ``p_char`` its
    probability; ``attention[w, l, k]`` the attention weight (mean over heads) from that step to the source token.
    """

    words: tuple[str, ...]
    features: Float[Tensor, "word feature d"]
    correct: Bool[Tensor, "word k"]
    p_char: Float[Tensor, "word k"]
    attention: Float[Tensor, "word layer k"]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        """``"embedding"``, then ``"layer 0"``… for each row of ``features``' second axis."""
        return ["embedding"] + [f"layer {l}" for l in range(self.features.shape[1] - 1)]


def _read_group(model: Any, lays: Sequence[Layout], n_chars: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n_layers = model.cfg.n_layers
    tokens = torch.cat([x.tokens for x in lays]).to(model.cfg.device)
    rows = torch.arange(len(lays))
    source = torch.tensor([x.source for x in lays])
    emit = torch.tensor([x.emit[:n_chars] for x in lays])  # [word, k]
    feats: dict[int, Tensor] = {}
    attn: dict[int, Tensor] = {}

    def keep(i: int):
        def hook(act: Tensor, hook: Any = None) -> None:
            feats[i] = act[rows, source.to(act.device)].detach().float().cpu()
        return hook

    def pattern(l: int):
        def hook(act: Tensor, hook: Any = None) -> None:  # [batch, head, query, key]
            a = act.detach().float().mean(1).cpu()
            attn[l] = a[rows[:, None], emit, source[:, None]]
        return hook
    hooks = [(EMBED_HOOK, keep(0))] + [(hook_name(l, "hook_resid_post"), keep(l + 1)) for l in range(n_layers)]
    hooks += [(hook_name(l, "attn.hook_pattern"), pattern(l)) for l in range(n_layers)]
    with torch.no_grad():
        logits = forward(model, tokens, hooks).float().cpu()
    at = logits[rows[:, None], emit]  # [word, k, vocab]
    target = torch.tensor([x.targets[:n_chars] for x in lays])
    probs = at.softmax(-1).gather(-1, target[..., None])[..., 0]
    return (torch.stack([feats[i] for i in range(n_layers + 1)], 1), at.argmax(-1) == target, probs,
            torch.stack([attn[l] for l in range(n_layers)], 1))


def read_spelling(model: Any, words: Sequence[str], *, shots: Sequence[str] = DEFAULT_SHOTS, n_chars: int = MIN_CHARS,
                  min_chars: int = MIN_CHARS, batch_size: int = 32) -> SpellingReads:
    """One forward per word's spelled prompt (words of one token length batched): the :class:`SpellingReads`.
    Words that cannot be spelled (:func:`layout` fails) are skipped and counted; ``n_chars`` (at most
    ``min_chars``) characters are read per word.

    >>> from knlens import load_model
    >>> reads = read_spelling(load_model("tiny-llama"), ["paris", "france"])   # no letters in its vocabulary
    >>> reads.words, reads.skipped["paris"][:38]
    ((), "the characters of 'paris' are not toke")
    """
    if not 1 <= n_chars <= min_chars:
        raise SettingsError(f"n_chars must be between 1 and min_chars = {min_chars}, got {n_chars}")
    if len(set(words)) != len(words):
        raise SettingsError("words must be distinct (the probes' train/test splits are token-disjoint)")
    lays, skipped = [], {}
    for w in words:
        try:
            lays.append(layout(model, check_word(w, min_chars), shots=shots, min_chars=min_chars))
        except SpellingError as err:
            skipped[w] = str(err)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(lays):
        by_len.setdefault(x.tokens.shape[1], []).append(i)
    parts: dict[int, tuple[Tensor, ...]] = {}
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            for j, got in zip(chunk, zip(*(t.unbind(0) for t in _read_group(model, [lays[i] for i in chunk], n_chars)))):
                parts[j] = got
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    if not lays:
        return SpellingReads((), torch.zeros(0, n_layers + 1, d), torch.zeros(0, n_chars, dtype=torch.bool),
                             torch.zeros(0, n_chars), torch.zeros(0, n_layers, n_chars), skipped)
    f, c, p, a = (torch.stack([parts[j][i] for j in range(len(lays))]) for i in range(4))
    return SpellingReads(tuple(x.word for x in lays), f, c, p, a, skipped)


def character_facts(words: Sequence[str], k: int, *, shots: Sequence[str] = DEFAULT_SHOTS,
                    min_chars: int = MIN_CHARS) -> list[Fact]:
    """One :class:`~knlens.Fact` per word: the prompt spelled up to character ``k`` and that character as the
    target (feed them to :func:`~knlens.methods.attribution.attribute_facts` for character neurons).

    >>> character_facts(["house"], 1, shots=())[0].prompts, character_facts(["house"], 1)[0].target
    ((' house : h',), ' o')
    """
    if not 0 <= k < min_chars:
        raise SettingsError(f"character index k must be in [0, {min_chars}), got {k}")
    return [Fact([spelling_text(w, shots=shots, upto=k, min_chars=min_chars)], f" {w[k]}", name=f"{w}[{k}]")
            for w in words]
