"""Causal tracing (Meng et al., 2022; methods.md §9) as compositions of hooks, batched over cells.

Three runs of one prompt:

* **clean** — the prompt as is; its residual stream, MLP outputs and attention outputs are cached;
* **corrupted** — the subject tokens' embeddings (at ``hook_embed``, the token embeddings; GPT-2's
  positional embeddings are separate and untouched) get Gaussian noise ν·N(0, I) with ν = 3 × the std of
  the embedding matrix (seeded, the same noise for every restoration), or are replaced by a fixed vector,
  or by another subject's token embeddings;
* **restored** — the corrupted run with one (token, layer) state copied back from the clean cache: the
  residual stream (``blocks.{l}.hook_resid_post``), the MLP output (``hook_mlp_out``) or the attention
  output (``hook_attn_out``); for MLP and attention a window of layers around ``l`` (10, as Meng et al.).

Indirect effect of a cell = P_restored − P_corrupted; total effect = P_clean − P_corrupted. Engines (same
numbers up to float rounding):

* ``"fast"`` (default) — cells are rows of a :mod:`~knlens.staircase`: a cell restoring layers ``[a, b)`` at
  token ``t`` equals the corrupted run below block ``a`` and, by causal attention, at every token before
  ``t``; so it starts at block ``a`` with the corrupted run's input there and runs tokens ``t..`` only,
  reading the corrupted keys/values of earlier tokens. Falls back to ``"batched"`` for a model whose
  blocks it cannot drive (checked on every run).
* ``"batched"`` — every cell is one batch row of whole-model forwards carrying its own restoration;
* ``"loop"`` — one forward per cell (Meng et al.'s schedule), the reference the tests compare with.

The corruption can target the subject (default), the relation tokens (``corrupt="relation"``: the prompt
tokens that are neither the subject, BOS nor the final token) or explicit positions.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> t = trace(model, "the capital of france is", " paris", subject="france", samples=2)
>>> t.effects["mlp"].shape, t.subject_span            # [layer, token]; tokens 4..5 are "france"
(torch.Size([2, 6]), (4, 5))
>>> list(t.to_frame().columns)[:4]
['kind', 'layer', 'position', 'token']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from .engine import chunks, read_quantity
from .errors import KnlensError, PromptError
from .hooks import Hook, HookFn, capture, hook_name, hooked, replace_rows
from .models import is_masked_lm
from .prompts import encode
from .staircase import Stairs, build_stairs, cache_layers, recording

__all__ = [
    "Kind", "KINDS", "KIND_POINTS", "DEFAULT_WINDOWS", "EMBED_HOOK", "Corruption", "Trace",
    "trace", "restore", "window_layers", "subject_token_span", "relation_positions", "token_groups",
    "group_effects", "embedding_std", "corruption_hook", "restore_hooks",
]

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
KIND_POINTS: dict[str, str] = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
DEFAULT_WINDOWS: dict[str, int] = {"resid": 1, "mlp": 10, "attn": 10}
EMBED_HOOK = "hook_embed"  # token embeddings on every TransformerBridge decoder (alias of embed.hook_out)
Engine = Literal["fast", "batched", "loop"]
ENGINES: tuple[str, ...] = ("fast", "batched", "loop")
Quantity = Literal["prob", "logprob", "logit"]


# ----------------------------------------------------------------------------------------------- spans

def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a cell at ``layer``: ``[layer − window//2, layer + ⌈window/2⌉)`` clamped.

    >>> window_layers(0, 10, 30), window_layers(12, 10, 30)[:2], window_layers(29, 10, 30)
    ([0, 1, 2, 3, 4], [7, 8], [24, 25, 26, 27, 28, 29])
    """
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    if not 0 <= layer < n_layers:
        raise KnlensError(f"layer {layer} outside the model's {n_layers} layers")
    return list(range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)))


def _n_prefix(model: Any, prompt: str) -> tuple[list[int], int]:
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
    full, n = _n_prefix(model, prompt)
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
    full, n = _n_prefix(model, prompt)
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


# ---------------------------------------------------------------------------------------- corruption

def embedding_std(model: Any) -> float:
    """Standard deviation of all entries of the token-embedding matrix ``W_E``."""
    return float(model.W_E.detach().float().std())


@dataclass(frozen=True)
class Corruption:
    """How the chosen token positions are corrupted at ``hook_embed``.

    ``method``: ``"noise"`` adds ν·N(0, I) with ν = ``scale`` or ``factor`` × :func:`embedding_std`
    (``samples`` independent draws, seeded; each restoration sees the same draws); ``"replace"`` writes
    ``value`` (a ``[d_model]`` vector; default the mean token embedding) at every corrupted position;
    ``"substitute"`` writes the token embeddings of ``other`` (another subject with as many tokens).
    """

    method: Literal["noise", "replace", "substitute"] = "noise"
    factor: float = 3.0
    scale: float | None = None
    seed: int = 0
    samples: int = 1
    value: Tensor | None = None
    other: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("noise", "replace", "substitute"):
            raise ValueError(f"unknown corruption {self.method!r}; use 'noise', 'replace' or 'substitute'")
        if self.samples < 1:
            raise ValueError("samples must be ≥ 1")
        if self.method == "substitute" and not self.other:
            raise ValueError("corruption 'substitute' needs other=<another subject>")
        if self.method != "noise" and self.samples != 1:
            object.__setattr__(self, "samples", 1)  # deterministic corruptions need one sample

    def describe(self, model: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "samples": self.samples, "seed": self.seed}
        if self.method == "noise":
            d["factor"] = self.factor
            d["scale"] = self.noise_scale(model)
        elif self.method == "substitute":
            d["other"] = self.other
        elif self.method == "replace":
            d["value"] = "mean token embedding" if self.value is None else "given vector"
        return d

    def noise_scale(self, model: Any) -> float:
        return float(self.scale) if self.scale is not None else self.factor * embedding_std(model)

    def values(self, model: Any, positions: Sequence[int]) -> Float[Tensor, "sample n d"]:
        """What is added (noise) or written (replace / substitute) at ``positions``, per sample."""
        n, d = len(positions), model.cfg.d_model
        w_e = model.W_E.detach()
        if self.method == "noise":
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randn(self.samples, n, d, generator=gen) * self.noise_scale(model)
        if self.method == "replace":
            v = w_e.float().mean(0) if self.value is None else torch.as_tensor(self.value, dtype=torch.float32)
            if v.shape != (d,):
                raise ValueError(f"replacement value has shape {tuple(v.shape)}, expected [{d}]")
            return v.cpu().expand(1, n, d).clone()
        ids = model.tokenizer(self.other, add_special_tokens=False)["input_ids"]
        if len(ids) != n:
            raise PromptError(f"the substitute subject {self.other!r} is {len(ids)} tokens but {n} positions are "
                              f"corrupted; choose a substitute with as many tokens (or use noise)")
        return w_e[torch.tensor(ids)].float().cpu()[None]


def corruption_hook(corruption: Corruption, values: Float[Tensor, "sample n d"], positions: Sequence[int],
                    sample_of_row: Int[Tensor, "batch"]) -> HookFn:
    """Hook for ``hook_embed``: row ``r`` gets sample ``sample_of_row[r]`` of ``values`` at ``positions``."""
    pos = torch.as_tensor(list(positions), dtype=torch.long)

    def hook(act: Float[Tensor, "batch pos d"], hook: Any = None) -> Float[Tensor, "batch pos d"]:
        v = values.to(act.device, act.dtype)[sample_of_row.to(act.device)]  # [batch, n, d]
        out = act.clone()
        p = pos.to(act.device)
        out[:, p] = out[:, p] + v if corruption.method == "noise" else v
        return out
    return hook


# ---------------------------------------------------------------------------------------- restoring

def restore_hooks(clean: Mapping[str, Float[Tensor, "layer pos d"]],
                  masks: Mapping[str, Bool[Tensor, "batch layer pos"]], n_layers: int) -> list[Hook]:
    """Hooks that copy clean states back: row ``r`` restores ``(l, p)`` where ``masks[kind][r, l, p]``.

    ``clean[kind]`` holds the clean run's activations stacked as ``[layer, pos, d]``.
    """
    hooks: list[Hook] = []
    for kind, mask in masks.items():
        for layer in range(n_layers):
            m = mask[:, layer]  # [batch, pos]
            if not bool(m.any()):
                continue
            src = clean[kind][layer]

            def hook(act: Tensor, hook: Any = None, m: Tensor = m, src: Tensor = src) -> Tensor:
                sel = m.to(act.device)[:, :, None]
                return torch.where(sel, src.to(act.device, act.dtype)[None], act)
            hooks.append((hook_name(layer, KIND_POINTS[kind]), hook))
    return hooks


@dataclass(frozen=True)
class _Setup:
    tokens: Int[Tensor, "1 pos"]
    position: int
    target: int
    positions: tuple[int, ...]  # corrupted positions
    subject_span: tuple[int, int] | None
    values: Tensor  # [sample, n, d]
    corruption: Corruption
    n_prefix: int


def _read(model: Any, tokens: Tensor, position: int, target: int, hooks: list[Hook],
          quantity: Quantity) -> Float[Tensor, "batch"]:
    with hooked(model, hooks):
        logits = model(tokens)
    return read_quantity(logits[:, position], torch.full((logits.shape[0],), target, device=logits.device),
                         quantity).cpu()


def _run_rows(model: Any, setup: _Setup, masks: Mapping[str, Tensor], clean: Mapping[str, Tensor],
              quantity: Quantity) -> Float[Tensor, "rows"]:
    """P of each row of ``masks`` (``[rows, layer, pos]`` per kind) averaged over the noise samples."""
    rows = next(iter(masks.values())).shape[0] if masks else 1
    k = setup.corruption.samples
    rep = {kind: m.repeat_interleave(k, 0) for kind, m in masks.items()}
    sample = torch.arange(k).repeat(rows)
    hooks = [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values, setup.positions, sample)),
             *restore_hooks(clean, rep, model.cfg.n_layers)]
    p = _read(model, setup.tokens.expand(rows * k, -1), setup.position, setup.target, hooks, quantity)
    return p.view(rows, k).mean(1)


def _prepare(model: Any, prompt: str, target: str, corruption: Corruption, corrupt: str | Sequence[int],
             subject: str | None, subject_span: tuple[int, int] | None) -> _Setup:
    q = encode(model, [prompt], target)
    row = q.row(0)  # first target token (a multi-token target is traced on its first token)
    tokens, position, tgt = row.tokens, int(row.position[0]), int(row.target[0])
    _, n_prefix = _n_prefix(model, prompt)
    span = subject_span
    if span is None and subject is not None:
        span = subject_token_span(model, prompt, subject)
    if isinstance(corrupt, str):
        if span is None:
            raise PromptError("tracing needs the subject: pass subject=..., subject_span=(start, end), a Fact "
                              "with a subject, or explicit corrupt=[positions]")
        if corrupt == "subject":
            positions = list(range(*span))
        elif corrupt == "relation":
            positions = relation_positions(model, prompt, span)
        else:
            raise ValueError(f"corrupt must be 'subject', 'relation' or a list of positions, got {corrupt!r}")
    else:
        positions = sorted(int(p) for p in corrupt)
    if not positions or min(positions) < 0 or max(positions) >= tokens.shape[1]:
        raise PromptError(f"corrupted positions {positions} do not fit the {tokens.shape[1]} tokens of {prompt!r}")
    if span is not None and not (0 <= span[0] < span[1] <= tokens.shape[1]):
        raise PromptError(f"subject span {span} does not fit the {tokens.shape[1]} tokens of {prompt!r}")
    values = corruption.values(model, positions)
    return _Setup(tokens, position, tgt, tuple(positions), span, values, corruption, n_prefix)


@torch.no_grad()
def _clean_cache(model: Any, setup: _Setup, kinds: Sequence[str], quantity: Quantity
                 ) -> tuple[float, dict[str, Tensor]]:
    store: dict[str, list[Tensor]] = {k: [] for k in kinds}
    hooks = [(hook_name(layer, KIND_POINTS[kind]), capture(store[kind]))
             for kind in kinds for layer in range(model.cfg.n_layers)]
    p = _read(model, setup.tokens, setup.position, setup.target, hooks, quantity)
    return float(p[0]), {k: torch.cat(v) for k, v in store.items()}  # hooks run in layer order: [layer, pos, d]


def _resolve(fact_or_prompt: Any, target: str | None, subject: str | None, prompt_index: int
             ) -> tuple[str, str, str | None]:
    if isinstance(fact_or_prompt, str):
        if target is None:
            raise ValueError("pass a target with a prompt, or a Fact")
        return fact_or_prompt, target, subject
    prompts = getattr(fact_or_prompt, "prompts", None)
    if prompts is None:
        raise TypeError(f"expected a prompt string or a Fact, got {type(fact_or_prompt).__name__}")
    return prompts[prompt_index], target or fact_or_prompt.target, subject or getattr(fact_or_prompt, "subject", None)


def _as_corruption(c: str | Corruption, **kw: Any) -> Corruption:
    if isinstance(c, Corruption):
        return c
    return Corruption(c, **{k: v for k, v in kw.items() if v is not None})


# ------------------------------------------------------------------------------------- fast engine

def _stairs_from(model: Any, setup: _Setup, t: int) -> Stairs | None:
    """The staircase of the corrupted run over positions ``t..position`` (all noise samples as rows),
    with the corrupted keys/values of positions ``< t`` as the shared prefix; None if unavailable."""
    k = setup.corruption.samples
    samples = torch.arange(k)
    tokens = setup.tokens[:, :setup.position + 1].expand(k, -1)
    before = [i for i, p in enumerate(setup.positions) if p < t]
    after = [i for i, p in enumerate(setup.positions) if p >= t]

    def corrupt(idx: list[int], offset: int) -> list[Hook]:
        if not idx:
            return []
        return [(EMBED_HOOK, corruption_hook(setup.corruption, setup.values[:, idx],
                                             [setup.positions[i] - offset for i in idx], samples))]
    cache = None
    if t > 0:
        with hooked(model, corrupt(before, 0)):
            _, cache = model(tokens[:, :t], return_type="logits_and_cache")
    with recording(model) as calls, hooked(model, corrupt(after, t)):
        logits = model(tokens[:, t:], past_key_values=cache)[:, -1]
    prefix = cache_layers(cache, t) if cache is not None else None
    return build_stairs(model, calls, cache=cache, prefix=prefix, read_at=-1, reference=logits)


def _token_stairs(model: Any, setup: _Setup, tokens: Sequence[int]) -> dict[int, Stairs] | None:
    """One staircase per restored token (shared by every kind), or None when the model's blocks cannot be
    driven directly or a token lies after the read-out position (only with padding; rare)."""
    if max(tokens) > setup.position:
        return None
    out = {}
    for t in sorted(set(tokens)):
        stairs = _stairs_from(model, setup, t)
        if stairs is None:
            return None
        out[t] = stairs
    return out


def _fast_cells(model: Any, setup: _Setup, kind: str, cells: Sequence[tuple[int, int]], window: int,
                clean: Mapping[str, Tensor], quantity: Quantity, batch_size: int,
                stairs_at: Mapping[int, Stairs]) -> Tensor:
    """P of each cell (averaged over the noise samples) by the staircases of :func:`_token_stairs`.

    A cell restoring ``kind`` at token ``t`` over layers ``[a, b)`` equals the corrupted run below block
    ``a`` and at positions before ``t`` (causal attention), so it enters at block ``a`` with the corrupted
    input there and runs positions ``t..`` only, reading keys/values of earlier positions from the
    corrupted run. Cells of one token share one staircase, sorted by the block they enter at.
    """
    k, n_layers = setup.corruption.samples, model.cfg.n_layers
    out = torch.empty(len(cells))
    by_token: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(cells):
        by_token.setdefault(t, []).append(i)
    for t, idx in by_token.items():
        stairs = stairs_at[t]
        span = {i: window_layers(cells[i][0], window, n_layers) for i in idx}
        idx = sorted(idx, key=lambda i: span[i][0])
        src = clean[kind][:, t]  # [layer, d]
        for s in chunks(len(idx), max(1, batch_size // k)):
            part = idx[s]
            entry = torch.tensor([span[i][0] for i in part])
            end = torch.tensor([span[i][-1] + 1 for i in part])
            hooks = []
            for layer in range(int(entry.min()), int(end.max())):
                present = int((entry <= layer).sum())  # units in the batch at this block (sorted by entry)
                restore = (end[:present] > layer).repeat_interleave(k)
                if bool(restore.any()):
                    values = src[layer].expand(int(restore.sum()), -1)
                    hooks.append((hook_name(layer, KIND_POINTS[kind]), replace_rows(values, restore, 0)))
            with hooked(model, hooks):
                logits = stairs.logits(model, entry)
            target = torch.full((logits.shape[0],), setup.target, device=logits.device)
            out[torch.tensor(part)] = read_quantity(logits, target, quantity).cpu().view(len(part), k).mean(1)
    return out


# ------------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Trace:
    """Indirect effects of restoring each (layer, token) cell, per kind, for one prompt.

    ``effects[kind][l, t]`` = P_restored − P_corrupted; ``p_clean``, ``p_corrupted`` the two reference
    runs; ``total_effect`` = P_clean − P_corrupted. ``corrupted`` lists the corrupted positions.
    """

    prompt: str
    target: str
    tokens: tuple[str, ...]
    subject_span: tuple[int, int] | None
    corrupted: tuple[int, ...]
    effects: dict[str, Float[Tensor, "layer pos"]]
    p_clean: float
    p_corrupted: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupted

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.effects)

    def p_restored(self, kind: str) -> Float[Tensor, "layer pos"]:
        return self.effects[kind] + self.p_corrupted

    def groups(self) -> list[str]:
        """The token group of each position (see :func:`token_groups`)."""
        span = self.subject_span or (self.corrupted[0], self.corrupted[-1] + 1)
        return token_groups(len(self.tokens), span, int(self.settings.get("n_prefix", 1)))

    def to_frame(self) -> pd.DataFrame:
        """One row per (kind, layer, position): token, group, p_restored, indirect_effect."""
        groups = self.groups()
        rows = []
        for kind, eff in self.effects.items():
            for l in range(eff.shape[0]):
                for t in range(eff.shape[1]):
                    e = float(eff[l, t])
                    rows.append({"kind": kind, "layer": l, "position": t, "token": self.tokens[t],
                                 "group": groups[t], "corrupted": t in self.corrupted,
                                 "p_restored": e + self.p_corrupted, "indirect_effect": e})
        return pd.DataFrame(rows)

    def plot(self, *, vmax: float | None = None) -> Any:
        """One heatmap per kind: tokens (rows, corrupted ones starred) × layers (columns)."""
        import matplotlib.pyplot as plt

        kinds = list(self.effects)
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.35 * len(self.tokens) + 1.6),
                                 squeeze=False)
        labels = [f"{tok!r}*" if i in self.corrupted else repr(tok) for i, tok in enumerate(self.tokens)]
        cmaps = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
        for ax, kind in zip(axes[0], kinds):
            im = ax.imshow(self.effects[kind].T.numpy(), aspect="auto", cmap=cmaps.get(kind, "viridis"),
                           vmin=min(0.0, float(self.effects[kind].min())), vmax=vmax)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlabel("layer")
            w = self.settings.get("windows", {}).get(kind, 1)
            ax.set_title(f"{kind} (window {w})" if w > 1 else kind, fontsize=10)
            fig.colorbar(im, ax=ax, label="P_restored − P_corrupted")
        fig.suptitle(f"{self.prompt!r} → {self.target!r}: P clean {self.p_clean:.3f}, "
                     f"corrupted {self.p_corrupted:.3f}", fontsize=10)
        fig.tight_layout()
        return fig

    def save(self, path: str | Path) -> None:
        """``path``.json (metadata) and ``path``.safetensors (effects)."""
        path = Path(path)
        meta = {k: v for k, v in asdict(self).items() if k != "effects"}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
        save_file({k: v.contiguous() for k, v in self.effects.items()}, str(path.with_suffix(".safetensors")))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        effects = load_file(str(path.with_suffix(".safetensors")))
        span = meta["subject_span"]
        return cls(meta["prompt"], meta["target"], tuple(meta["tokens"]), tuple(span) if span else None,
                   tuple(meta["corrupted"]), {k: effects[k] for k in meta["settings"]["kinds"]},
                   meta["p_clean"], meta["p_corrupted"], meta["settings"])


# ------------------------------------------------------------------------------------------ tracing

def _cell_masks(kind: str, cells: Sequence[tuple[int, int]], window: int, n_layers: int, n_pos: int
                ) -> Bool[Tensor, "cells layer pos"]:
    m = torch.zeros(len(cells), n_layers, n_pos, dtype=torch.bool)
    for r, (layer, pos) in enumerate(cells):
        m[r, window_layers(layer, window, n_layers), pos] = True
    return m


@torch.no_grad()
def restore(model: Any, fact_or_prompt: Any, target: str | None = None, *,
            restored: Mapping[str, Bool[Tensor, "layer pos"]] | None = None,
            corruption: str | Corruption = "noise", corrupt: str | Sequence[int] = "subject",
            subject: str | None = None, subject_span: tuple[int, int] | None = None, prompt_index: int = 0,
            quantity: Quantity = "prob") -> float:
    """P(target) of the corrupted run with an arbitrary set of clean states restored.

    ``restored[kind]`` is a boolean ``[layer, pos]`` mask of the states copied back (all at once, in one
    run). No mask gives P_corrupted; every layer of ``"resid"`` at every token gives P_clean.

    >>> from knlens import load_model
    >>> model = load_model("tiny-gpt2")
    >>> import torch
    >>> p = restore(model, "the capital of france is", " paris", subject="france",
    ...             restored={"resid": torch.ones(2, 6, dtype=torch.bool)})
    """
    prompt, target, subject = _resolve(fact_or_prompt, target, subject, prompt_index)
    corruption = _as_corruption(corruption)
    setup = _prepare(model, prompt, target, corruption, corrupt, subject, subject_span)
    restored = dict(restored or {})
    for kind, m in restored.items():
        if kind not in KIND_POINTS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        if tuple(m.shape) != (model.cfg.n_layers, setup.tokens.shape[1]):
            raise ValueError(f"restored[{kind!r}] has shape {tuple(m.shape)}, expected "
                             f"[{model.cfg.n_layers}, {setup.tokens.shape[1]}]")
    _, clean = _clean_cache(model, setup, list(restored), quantity) if restored else (None, {})
    masks = {k: m.bool()[None] for k, m in restored.items()}
    return float(_run_rows(model, setup, masks, clean, quantity)[0])


@torch.no_grad()
def trace(model: Any, fact_or_prompt: Any, target: str | None = None, *,
          kinds: Sequence[str] = KINDS, corruption: str | Corruption = "noise",
          corrupt: str | Sequence[int] = "subject", subject: str | None = None,
          subject_span: tuple[int, int] | None = None, window: int | Mapping[str, int] | None = None,
          samples: int | None = None, seed: int | None = None, noise_scale: float | None = None,
          other: str | None = None, positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
          prompt_index: int = 0, quantity: Quantity = "prob", engine: Engine = "fast",
          batch_size: int = 64, skip_prefix: bool = True) -> Trace:
    """Causal trace of one prompt: the indirect effect of restoring every (layer, token) cell per kind.

    Arguments:
        fact_or_prompt: a prompt (with ``target``) or a Fact (its ``prompts[prompt_index]`` and subject).
        kinds: among ``"resid"``, ``"mlp"``, ``"attn"``.
        corruption: ``"noise"`` (default), ``"replace"``, ``"substitute"`` (with ``other=``) or a
            :class:`Corruption`; ``samples``, ``seed``, ``noise_scale`` override its fields.
        corrupt: ``"subject"`` (default), ``"relation"`` or explicit positions.
        subject / subject_span: the subject as text in the prompt, or its ``[start, end)`` token span.
        window: layers restored around each cell (default 1 for resid, 10 for mlp/attn), int or per kind.
        positions / layers: restrict the traced cells (default all tokens and layers); others stay 0.
        engine: ``"fast"`` (default: cells as batch rows of a staircase that starts each cell at its first
            restored layer and runs only the tokens from the restored one on; falls back to ``"batched"``
            for a model whose blocks it cannot drive), ``"batched"`` (cells as rows of whole-model
            forwards) or ``"loop"`` (one forward per cell). ``batch_size`` bounds the rows (cells ×
            noise samples) of one forward, and so the memory.
        skip_prefix: do not run cells before the first corrupted token of a left-to-right model: their
            states are the same in the clean and the corrupted run, so their effect is 0 by causality.

    Returns a :class:`Trace`.
    """
    prompt, target, subject = _resolve(fact_or_prompt, target, subject, prompt_index)
    if isinstance(corruption, str) and corruption == "substitute" and other is None:
        raise ValueError("corruption='substitute' needs other=<another subject>")
    corruption = _as_corruption(corruption, other=other)
    overrides = {k: v for k, v in {"samples": samples, "seed": seed, "scale": noise_scale, "other": other}.items()
                 if v is not None}
    if overrides:
        corruption = replace(corruption, **overrides)
    for kind in kinds:
        if kind not in KIND_POINTS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    windows = {k: (window.get(k, DEFAULT_WINDOWS[k]) if isinstance(window, Mapping)
                   else DEFAULT_WINDOWS[k] if window is None else int(window)) for k in kinds}
    setup = _prepare(model, prompt, target, corruption, corrupt, subject, subject_span)
    n_layers, n_pos = model.cfg.n_layers, setup.tokens.shape[1]
    p_clean, clean = _clean_cache(model, setup, kinds, quantity)
    p_corr = float(_run_rows(model, setup, {}, clean, quantity)[0])
    pos_list = list(range(n_pos)) if positions is None else [int(p) % n_pos for p in positions]
    skip = skip_prefix and not is_masked_lm(model)
    if skip:
        pos_list = [p for p in pos_list if p >= min(setup.positions)]
    layer_list = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    cells = [(l, t) for l in layer_list for t in pos_list]
    effects = {}
    stairs_at = None
    if engine == "fast" and cells and not is_masked_lm(model):
        stairs_at = _token_stairs(model, setup, [t for _, t in cells])
    used = "fast" if stairs_at is not None else "batched" if engine == "fast" else engine
    for kind in kinds:
        if stairs_at is not None:
            p = _fast_cells(model, setup, kind, cells, windows[kind], clean, quantity, batch_size, stairs_at)
        else:
            p = torch.empty(len(cells))
            size = 1 if engine == "loop" else max(1, batch_size // corruption.samples)
            for s in chunks(len(cells), size):
                m = _cell_masks(kind, cells[s], windows[kind], n_layers, n_pos)
                p[s] = _run_rows(model, setup, {kind: m}, clean, quantity)
        eff = torch.zeros(n_layers, n_pos)
        for (l, t), v in zip(cells, p.tolist()):
            eff[l, t] = v - p_corr
        effects[kind] = eff
    from . import __version__
    tok_strs = tuple(model.tokenizer.convert_ids_to_tokens(setup.tokens[0].tolist()))
    settings = {"model": getattr(model.cfg, "model_name", "?"), "kinds": list(kinds), "windows": windows,
                "corrupt": corrupt if isinstance(corrupt, str) else "positions",
                "corruption": corruption.describe(model), "embed_hook": EMBED_HOOK,
                "hook_points": {k: KIND_POINTS[k] for k in kinds}, "quantity": quantity, "engine": used,
                "target_token": model.tokenizer.convert_ids_to_tokens([setup.target])[0],
                "position": setup.position, "n_prefix": setup.n_prefix, "skip_prefix": skip,
                "samples": corruption.samples, "knlens_version": __version__}
    return Trace(prompt, target, tok_strs, setup.subject_span, setup.positions, effects, p_clean, p_corr,
                 settings)


def group_effects(traces: Sequence[Trace]) -> pd.DataFrame:
    """Mean indirect effect per (kind, token group, layer) over ``traces`` (Meng et al.'s averages).

    Columns ``kind, group, layer, effect, n`` (n = number of traces contributing to the group).
    """
    parts = []
    for i, t in enumerate(traces):
        f = t.to_frame()
        f = f.groupby(["kind", "group", "layer"], as_index=False)["indirect_effect"].mean()
        f["trace"] = i
        parts.append(f)
    if not parts:
        return pd.DataFrame(columns=["kind", "group", "layer", "effect", "n"])
    all_ = pd.concat(parts)
    g = all_.groupby(["kind", "group", "layer"])
    out = g["indirect_effect"].mean().rename("effect").to_frame()
    out["n"] = g["trace"].nunique()
    return out.reset_index()
