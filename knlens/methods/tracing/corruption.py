"""Corrupting prompt tokens at ``hook_embed`` for causal tracing (Meng et al., 2022; docs/methods.md, causal tracing).

Every statistic and vector here comes from the token embeddings *as the model adds them*, the outputs of
``hook_embed`` (:func:`embed_outputs`), never from the matrix ``W_E``. The two differ where the
embedding layer transforms its rows: Gemma multiplies them by √d_model inside ``hook_embed`` (×25.3 on
Gemma-3-270M), so a noise scale taken from ``W_E`` would be that much too small to corrupt anything.

The default is Meng et al.'s: Gaussian noise ν·N(0, I) on the subject tokens with ν = 3 × the standard
deviation of the embeddings, 10 seeded samples whose probabilities are averaged.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> c = Corruption()
>>> c.samples, c.values(model, [4, 5]).shape          # [sample, corrupted position, d_model]
(10, torch.Size([10, 2, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.core.errors import PromptError, TracingSettingError
from knlens.run.engine import forward_until
from knlens.run.hooks import HookFn

__all__ = ["EMBED_HOOK", "DEFAULT_SAMPLES", "embed_outputs", "embedding_stats", "embedding_std", "Corruption",
           "corruption_hook"]

EMBED_HOOK = "hook_embed"  # token embeddings on every TransformerBridge decoder (alias of embed.hook_out)
DEFAULT_SAMPLES = 10  # noise samples per trace, as Meng et al.


@torch.no_grad()
def embed_outputs(model: Any, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d"]:
    """What ``hook_embed`` gives for ``tokens`` in the model's own forward (float32, CPU); the forward
    stops there, so this costs the embedding only.

    >>> from knlens import load_model
    >>> model = load_model("tiny-gpt2")
    >>> embed_outputs(model, model.to_tokens("the capital")).shape
    torch.Size([1, 3, 32])
    """
    return forward_until(model, tokens.to(model.cfg.device), EMBED_HOOK).detach().float().cpu()


def embedding_stats(model: Any, *, chunk: int = 8192) -> tuple[float, Float[Tensor, "d"]]:
    """Standard deviation of all entries, and the mean vector, of the ``hook_embed`` outputs of every
    token of the vocabulary (each token alone, at position 0), summed chunk by chunk.

    >>> from knlens import load_model
    >>> model = load_model("tiny-gpt2")             # hook_embed is W_E's row here, so the two agree
    >>> std, mean = embedding_stats(model)
    >>> round(std, 4) == round(float(model.W_E.std()), 4), mean.shape
    (True, torch.Size([32]))
    """
    n_vocab = int(model.cfg.d_vocab)
    total = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    squares = 0.0
    for start in range(0, n_vocab, chunk):
        ids = torch.arange(start, min(n_vocab, start + chunk))[:, None]
        e = embed_outputs(model, ids)[:, 0]
        total += e.sum(0).double()  # float32 within a chunk (pairwise sums), float64 across chunks
        squares += float(e.square().sum())
    n = n_vocab * total.numel()
    s = float(total.sum())
    std = ((squares - s * s / n) / (n - 1)) ** 0.5
    return std, (total / n_vocab).float()


def embedding_std(model: Any) -> float:
    """Standard deviation of all entries of the token embeddings as ``hook_embed`` gives them (see
    :func:`embedding_stats`); Meng et al.'s noise scale is 3× this."""
    return embedding_stats(model)[0]


@dataclass(frozen=True)
class Corruption:
    """How the chosen token positions are corrupted at ``hook_embed``.

    ``method``: ``"noise"`` adds ν·N(0, I) with ν = ``scale``, or ``factor`` × :func:`embedding_std`
    (``samples`` independent draws, default 10 as Meng et al.; seeded; each restoration sees the same
    draws); ``"replace"`` writes ``value`` (a ``[d_model]`` vector in ``hook_embed``'s space; default the
    mean ``hook_embed`` output over the vocabulary) at every corrupted position; ``"substitute"`` writes the
    ``hook_embed`` outputs of ``other`` (another subject with as many tokens). Deterministic corruptions
    use one sample.
    """

    method: Literal["noise", "replace", "substitute"] = "noise"
    factor: float = 3.0
    scale: float | None = None
    seed: int = 0
    samples: int = DEFAULT_SAMPLES
    value: Tensor | None = None
    other: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("noise", "replace", "substitute"):
            raise TracingSettingError(f"unknown corruption {self.method!r}; use 'noise', 'replace' or 'substitute'")
        if self.samples < 1:
            raise TracingSettingError(f"samples must be at least 1, got {self.samples}")
        if self.method == "noise" and not (self.scale if self.scale is not None else self.factor) > 0:
            raise TracingSettingError(f"the noise scale must be positive, got factor {self.factor}, scale {self.scale}")
        if self.method == "substitute" and not self.other:
            raise TracingSettingError("corruption 'substitute' needs other=<another subject>")
        if self.method != "noise" and self.samples != 1:
            object.__setattr__(self, "samples", 1)  # deterministic corruptions need one sample

    def describe(self, model: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "samples": self.samples, "seed": self.seed,
                             "statistics_from": EMBED_HOOK}
        if self.method == "noise":
            d["factor"] = self.factor
            d["scale"] = self.noise_scale(model)
        elif self.method == "substitute":
            d["other"] = self.other
        elif self.method == "replace":
            d["value"] = f"mean {EMBED_HOOK} output" if self.value is None else "given vector"
        return d

    def noise_scale(self, model: Any) -> float:
        """ν: ``scale`` if given, else ``factor`` × the std of the ``hook_embed`` outputs."""
        return float(self.scale) if self.scale is not None else self.factor * embedding_std(model)

    def values(self, model: Any, positions: Sequence[int], tokens: Int[Tensor, "1 pos"] | None = None
               ) -> Float[Tensor, "sample n d"]:
        """What is added (noise) or written (replace / substitute) at ``positions``, per sample.

        A substitute's vectors are read in context when the prompt's ``tokens`` are given (``other``'s
        tokens written at ``positions``; this matters only where ``hook_embed`` mixes in positions, as
        BERT's embedding LayerNorm does), else from ``other``'s tokens alone.
        """
        n, d = len(positions), model.cfg.d_model
        if self.method == "noise":
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randn(self.samples, n, d, generator=gen) * self.noise_scale(model)
        if self.method == "replace":
            v = embedding_stats(model)[1] if self.value is None else torch.as_tensor(self.value, dtype=torch.float32)
            if v.shape != (d,):
                raise TracingSettingError(f"replacement value has shape {tuple(v.shape)}, expected [{d}]")
            return v.cpu().expand(1, n, d).clone()
        ids = model.tokenizer(self.other, add_special_tokens=False)["input_ids"]
        if len(ids) != n:
            raise PromptError(f"the substitute subject {self.other!r} is {len(ids)} tokens but {n} positions are "
                              f"corrupted; choose a substitute with as many tokens (or use noise)")
        if tokens is None:
            return embed_outputs(model, torch.tensor([ids]))
        swapped = tokens[:1].clone().cpu()
        swapped[0, list(positions)] = torch.tensor(ids)
        return embed_outputs(model, swapped)[:, list(positions)]


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
