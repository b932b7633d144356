"""The second moment of an MLP layer's keys, ``C = E[k kᵀ]`` over the tokens of a text sample: the metric in
which a rank-one edit changes ``W_out`` least (docs/methods.md, rank-one edit).

A key ``k`` is the input of the output projection at one token, ``blocks.{l}.mlp.hook_post`` (the neuron
activations). Every non-padding token of every sentence counts, except a leading BOS (an outlier that is the
same in every sentence). Sentences default to :func:`knlens.data.text.text_sample` (part 0; evaluation
takes its perplexity sample from part 1). ``C`` is accumulated in float64 over blocks ``0..l`` only, and
cached on disk under a hash of the model's weights, the layer and the sentences.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> key_covariance(model, 1, ["the capital of france is paris", "the dog"], cache_dir=False).shape
torch.Size([48, 48])
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from knlens.core.errors import NeuronIndexError, OutputError, SettingsError
from knlens.core.tokens import encode_texts
from knlens.data.text import text_sample
from knlens.methods.editing.edit import fingerprint
from knlens.run.engine import chunks, forward
from knlens.run.hooks import capture, hook_name

__all__ = ["key_covariance", "covariance_cache_dir", "CACHE_ENV"]

CACHE_ENV = "KNLENS_CACHE"
DEFAULT_TEXTS = 1000


def covariance_cache_dir() -> Path:
    """Where key statistics are cached: ``$KNLENS_CACHE/covariance``, else ``~/.cache/knlens/covariance``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "knlens") / "covariance"


@torch.no_grad()
def _second_moment(model: Any, layer: int, texts: Sequence[str], batch_size: int) -> tuple[Tensor, int]:
    d = model.cfg.d_mlp
    total = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    bos = model.tokenizer.bos_token_id
    for s in chunks(len(texts), batch_size):
        tokens, mask = encode_texts(model, texts[s])
        counted = mask.bool()
        if bos is not None:
            counted[:, 0] &= tokens[:, 0] != bos  # a leading BOS is attended to but not counted
        seen: list[Tensor] = []
        forward(model, tokens, [(hook_name(layer), capture(seen))], attention_mask=mask, stop_at_layer=layer + 1)
        keys = seen[0][counted].double().cpu()  # [tokens, d_mlp]
        total += keys.T @ keys
        count += keys.shape[0]
    return total, count


def key_covariance(model: Any, layer: int, texts: Sequence[str] | None = None, *, n_texts: int = DEFAULT_TEXTS,
                   seed: int = 0, batch_size: int = 32,
                   cache_dir: str | os.PathLike[str] | None | Literal[False] = None) -> Float[Tensor, "d_mlp d_mlp"]:
    """``E[k kᵀ]`` of layer ``layer``'s keys over ``texts`` (default: ``n_texts`` sentences of part 0 of
    :func:`~knlens.data.text.text_sample` drawn with ``seed``), float32.

    ``cache_dir``: a folder for the cache, ``None`` for :func:`covariance_cache_dir`, ``False`` for no cache.
    """
    if not 0 <= layer < model.cfg.n_layers:
        raise NeuronIndexError(f"layer {layer} outside the model's {model.cfg.n_layers} layers")
    texts = list(text_sample(n_texts, part=0, seed=seed) if texts is None else texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise SettingsError("key statistics need non-empty sentences")
    h = hashlib.sha256(f"{fingerprint(model)}|{layer}|hook_post|".encode())
    h.update("\n".join(texts).encode())
    path = None if cache_dir is False else Path(cache_dir or covariance_cache_dir()) / f"keys-{h.hexdigest()[:24]}.safetensors"
    if path is not None and path.is_file():
        return load_file(str(path))["second_moment"]
    total, count = _second_moment(model, layer, texts, batch_size)
    if count == 0:
        raise SettingsError("the sentences hold no token to take key statistics from")
    moment = (total / count).float()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"second_moment": moment}, str(tmp), metadata={"tokens": str(count), "layer": str(layer)})
            tmp.replace(path)
        except OSError as err:
            raise OutputError(f"cannot cache key statistics in {str(path.parent)!r}: {err.strerror or err}") from err
    return moment
