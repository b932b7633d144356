"""Turn prompts and targets into padded token batches with one row per (prompt, target token).

BOS is handled as TransformerLens does (``model.to_tokens``). A single-token target gives one row per
prompt. A multi-token target is teacher-forced: row ``j`` is the prompt followed by the first ``j`` gold
target tokens, read at its last position, with target token ``j``. Rows of different lengths are
right-padded with an attention mask, so every row is read at its own position. For a masked LM the
prompt gets a ``[MASK]`` at its end when it has none, and the row is read there.

>>> from knlens import load_model
>>> model = load_model("tiny-gpt2")
>>> q = encode(model, ["the capital of france is", "france has the capital"], " paris")
>>> q.tokens.shape, q.position.tolist()
(torch.Size([2, 6]), [5, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from knlens.core.errors import PromptError, TargetError
from knlens.core.models import is_masked_lm

__all__ = ["Queries", "encode", "encode_texts", "stack", "row_groups", "target_tokens", "single_token"]

MultiToken = Literal["error", "teacher_forcing"]


@dataclass(frozen=True)
class Queries:
    """A right-padded batch of model inputs, each read at one position for one target token."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position: Int[Tensor, "batch"]  # where the target is predicted (last prompt token, or [MASK])
    target: Int[Tensor, "batch"]  # the target token id
    prompt_index: Int[Tensor, "batch"]  # which prompt the row comes from
    token_index: Int[Tensor, "batch"]  # which target token the row predicts (0 for single tokens)
    prompts: tuple[str, ...]
    target_str: str

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def row(self, i: int) -> Queries:
        """Row ``i`` alone, trimmed of its padding."""
        n = int(self.attention_mask[i].sum())
        return Queries(self.tokens[i:i + 1, :n], self.attention_mask[i:i + 1, :n], self.position[i:i + 1],
                       self.target[i:i + 1], self.prompt_index[i:i + 1], self.token_index[i:i + 1],
                       self.prompts, self.target_str)

    def select(self, rows: Tensor | Sequence[int]) -> Queries:
        """The rows ``rows`` (indices or boolean mask), padding trimmed to the longest kept row."""
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            idx = idx.nonzero()[:, 0]
        n = int(self.attention_mask[idx].sum(1).max()) if len(idx) else 0
        return Queries(self.tokens[idx, :n], self.attention_mask[idx, :n], self.position[idx],
                       self.target[idx], self.prompt_index[idx], self.token_index[idx], self.prompts,
                       self.target_str)

    def to(self, device: torch.device | str) -> Queries:
        return Queries(self.tokens.to(device), self.attention_mask.to(device), self.position.to(device),
                       self.target.to(device), self.prompt_index.to(device), self.token_index.to(device),
                       self.prompts, self.target_str)


def target_tokens(model: Any, target: str) -> list[int]:
    """The token ids of ``target`` as it follows a prompt (no BOS). Raises :class:`TargetError`."""
    if not isinstance(target, str) or not target.strip():
        raise TargetError(f"the target must be a non-empty string, got {target!r}")
    tok = model.tokenizer
    text = target.strip() if is_masked_lm(model) else target
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TargetError(f"the target {target!r} tokenizes to nothing")
    unk = tok.unk_token_id
    if unk is not None and unk in ids:
        raise TargetError(f"the target {target!r} is not in the model's vocabulary (it tokenizes to "
                          f"{tok.convert_ids_to_tokens(ids)} with the unknown token {tok.unk_token!r})")
    return list(ids)


def single_token(model: Any, target: str) -> int:
    """The id of a single-token target; a multi-token target raises :class:`TargetError`."""
    ids = target_tokens(model, target)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise TargetError(f"the target {target!r} is {len(ids)} tokens {pieces}, but a single token is required "
                          f"here; pass multi_token='teacher_forcing' or choose a single-token target")
    return ids[0]


def _prompt_tokens(model: Any, prompt: str) -> list[int]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"empty prompt {prompt!r}: every prompt needs some text before the target")
    if is_masked_lm(model):
        mask = model.tokenizer.mask_token
        if mask is None:
            raise PromptError("this masked LM's tokenizer has no mask token")
        if mask not in prompt:
            prompt = f"{prompt.rstrip()} {mask}"
    ids = model.to_tokens(prompt)[0].tolist()
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and len(ids) > n_ctx:
        raise PromptError(f"prompt of {len(ids)} tokens is longer than the model's context of {n_ctx}")
    return ids


def encode(model: Any, prompts: str | Sequence[str], target: str, *,
           multi_token: MultiToken = "teacher_forcing") -> Queries:
    """Tokenize ``prompts`` and ``target`` into :class:`Queries` (one row per prompt and target token).

    ``multi_token="error"`` raises :class:`TargetError` for a target of more than one token.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise PromptError("no prompts given")
    tgt = [single_token(model, target)] if multi_token == "error" else target_tokens(model, target)
    masked = is_masked_lm(model)
    if masked and len(tgt) > 1:
        raise TargetError(f"the target {target!r} is {len(tgt)} tokens; a masked LM predicts one token at its "
                          f"[MASK], so choose a single-token target")
    rows: list[tuple[list[int], int, int, int, int]] = []
    for p_idx, prompt in enumerate(prompts):
        ids = _prompt_tokens(model, prompt)
        if masked:
            pos = ids.index(model.tokenizer.mask_token_id)
            rows.append((ids, pos, tgt[0], p_idx, 0))
            continue
        for j, tok_id in enumerate(tgt):
            seq = ids + tgt[:j]
            rows.append((seq, len(seq) - 1, tok_id, p_idx, j))
    width = max(len(r[0]) for r in rows)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, *_rest) in enumerate(rows):
        tokens[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    col = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.long)  # noqa: E731
    device = getattr(model.cfg, "device", None) or "cpu"
    return Queries(tokens, mask, col(1), col(2), col(3), col(4), tuple(prompts), target).to(device)


def stack(qs: Sequence[Queries]) -> Queries:
    """One right-padded batch of several :class:`Queries` (e.g. of several facts): rows in order, each keeping
    its own target and position; ``prompt_index`` numbers the prompts of all of them in order.

    >>> from knlens import load_model
    >>> model = load_model("tiny-gpt2")
    >>> q = stack([encode(model, ["the capital of france is"], " paris"), encode(model, ["paris is in"], " france")])
    >>> q.tokens.shape, q.prompt_index.tolist(), q.prompts
    (torch.Size([2, 6]), [0, 1], ('the capital of france is', 'paris is in'))
    """
    width = max(q.tokens.shape[1] for q in qs)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    offsets = [sum(len(q.prompts) for q in qs[:i]) for i in range(len(qs))]
    return Queries(torch.cat([pad(q.tokens) for q in qs]), torch.cat([pad(q.attention_mask) for q in qs]),
                   torch.cat([q.position for q in qs]), torch.cat([q.target for q in qs]),
                   torch.cat([q.prompt_index + off for q, off in zip(qs, offsets)]),
                   torch.cat([q.token_index for q in qs]), tuple(p for q in qs for p in q.prompts),
                   qs[0].target_str if len({q.target_str for q in qs}) == 1 else "")


def row_groups(q: Queries, size: int | None = None) -> list[Int[Tensor, "rows"]]:
    """The rows of ``q`` grouped by length and target position (rows that can share one clean pass and one
    staircase run), each group in row order and cut into pieces of at most ``size`` rows; groups in the order
    of their first row.

    >>> from knlens import load_model
    >>> q = encode(load_model("tiny-llama"), ["the capital of france is", "paris is in", "the capital of spain is"],
    ...            " paris")
    >>> [g.tolist() for g in row_groups(q)]                     # two prompts of 6 tokens share a group
    [[0, 2], [1]]
    """
    lengths, positions = q.attention_mask.sum(1).tolist(), q.position.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(lengths, positions)):
        groups.setdefault(key, []).append(i)
    size = size or len(q)
    return [torch.tensor(g[s:s + size]) for g in groups.values() for s in range(0, len(g), size)]


def encode_texts(model: Any, texts: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded tokens of whole ``texts`` (BOS as TransformerLens adds it) and their attention mask.

    >>> from knlens import load_model
    >>> tokens, mask = encode_texts(load_model("tiny-gpt2"), ["the dog", "the capital of france"])
    >>> tokens.shape, mask.sum(1).tolist()
    (torch.Size([2, 5]), [3, 5])
    """
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise PromptError("every text must be a non-empty string")
    rows = [model.to_tokens(t)[0].tolist() for t in texts]
    width = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    tokens = torch.full((len(rows), width), 0 if pad is None else pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    device = getattr(model.cfg, "device", None) or "cpu"
    return tokens.to(device), mask.to(device)
