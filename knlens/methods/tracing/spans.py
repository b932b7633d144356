"""Where the subject, the relation and Meng et al.'s token groups sit in a tokenized prompt, and which
layers a causal-tracing cell restores.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> span = subject_token_span(model, "the capital of france is", "france")
>>> span, relation_positions(model, "the capital of france is", span)
((4, 5), [1, 2, 3])
"""

from __future__ import annotations

from typing import Any

from knlens.core.errors import NeuronIndexError, PromptError, TracingSettingError

__all__ = ["window_layers", "subject_token_span", "relation_positions", "token_groups"]


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a cell at ``layer``: ``[layer − window//2, layer + ⌈window/2⌉)`` clamped.

    >>> window_layers(0, 10, 30), window_layers(12, 10, 30)[:2], window_layers(29, 10, 30)
    ([0, 1, 2, 3, 4], [7, 8], [24, 25, 26, 27, 28, 29])
    """
    if window < 1:
        raise TracingSettingError(f"window must be at least 1, got {window}")
    if not 0 <= layer < n_layers:
        raise NeuronIndexError(f"layer {layer} outside the model's {n_layers} layers")
    return list(range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)))


def prefix_tokens(model: Any, prompt: str) -> tuple[list[int], int]:
    """The prompt's model tokens (BOS included as TransformerLens adds it) and how many lead specials."""
    full = model.to_tokens(prompt)[0].tolist()
    bare = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = len(full) - len(bare)
    if n < 0 or full[n:n + len(bare)] != bare:
        raise PromptError(f"cannot align the tokens of {prompt!r} with the tokenizer's own tokens")
    return full, n


def _char_span(prompt: str, subject: str) -> tuple[int, int]:
    i = prompt.find(subject)
    if i < 0:
        i = prompt.lower().find(subject.lower())
    if i < 0:
        raise PromptError(f"the subject {subject!r} does not occur in the prompt {prompt!r}; pass the subject "
                          f"as written in the prompt, or an explicit token span")
    return i, i + len(subject)


def subject_token_span(model: Any, prompt: str, subject: str | None = None, *,
                       char_span: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``[start, end)`` positions of ``subject`` in ``model.to_tokens(prompt)`` (BOS counted).

    Uses the tokenizer's character offsets; falls back to tokenizing the prompt's prefixes when the
    tokenizer gives none. Every token overlapping the subject's characters belongs to the span.

    >>> from knlens import load_model
    >>> subject_token_span(load_model("tiny-gpt2"), "the capital of france is", "france")
    (4, 5)
    """
    if char_span is None:
        if subject is None:
            raise PromptError("give the subject (a substring of the prompt) or its character span")
        char_span = _char_span(prompt, subject)
    cs, ce = char_span
    if not 0 <= cs < ce <= len(prompt):
        raise PromptError(f"character span {char_span} is outside the prompt {prompt!r}")
    full, n = prefix_tokens(model, prompt)
    try:
        enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
    except (NotImplementedError, KeyError, TypeError):
        hits = []
    if hits:
        return n + hits[0], n + hits[-1] + 1
    # fallback: the number of tokens of the text before / up to the end of the subject
    before = len(model.tokenizer(prompt[:cs], add_special_tokens=False)["input_ids"]) if cs else 0
    upto = len(model.tokenizer(prompt[:ce], add_special_tokens=False)["input_ids"])
    if upto <= before:
        raise PromptError(f"the characters {char_span} of {prompt!r} map to no token")
    return n + before, n + upto


def relation_positions(model: Any, prompt: str, subject_span: tuple[int, int]) -> list[int]:
    """Positions of the relation tokens: neither BOS (lead specials), the subject, nor the last token."""
    full, n = prefix_tokens(model, prompt)
    s, e = subject_span
    pos = [p for p in range(n, len(full) - 1) if not s <= p < e]
    if not pos:
        raise PromptError(f"the prompt {prompt!r} has no token outside the subject and the last token")
    return pos


def token_groups(n_tokens: int, subject_span: tuple[int, int], n_prefix: int = 1) -> list[str]:
    """Meng et al.'s token groups of every position: ``"first subject"``, ``"middle subject"``,
    ``"last subject"``, ``"further"`` (after the subject, before the last), ``"last"``, and ``"before"``
    (prompt tokens before the subject) / ``"bos"``. A one-token subject is ``"last subject"``.

    >>> token_groups(7, (2, 5))
    ['bos', 'before', 'first subject', 'middle subject', 'last subject', 'further', 'last']
    """
    s, e = subject_span
    out = []
    for p in range(n_tokens):
        if p == n_tokens - 1:
            out.append("last")
        elif p < n_prefix:
            out.append("bos")
        elif p < s:
            out.append("before")
        elif p == e - 1:
            out.append("last subject")
        elif p == s:
            out.append("first subject")
        elif s < p < e - 1:
            out.append("middle subject")
        else:
            out.append("further")
    return out

