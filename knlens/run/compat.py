"""Workarounds for the versions of the libraries knlens runs on, each with the reason it exists.

**The key/value cache keyword.** transformers 5.24 renamed the cache argument of every model and
layer from ``past_key_values`` to ``cache`` (the old name is accepted at the model's entry and renamed).
TransformerLens 4.3's attention bridges re-implement attention and read the cache only from
``past_key_values`` (or ``layer_past``), so under 5.24 they never see it: a forward with a cache
neither stores new keys/values nor reads the earlier ones, and each new token attends to itself alone.
:func:`cache_keyword_fix` gives those bridges the cache under the name they read.
It is a no-op where the layer already gets ``past_key_values`` (transformers ≤ 5.23).

Every engine that uses a cache also checks its numbers against a plain whole-prompt forward
(:func:`knlens.run.staircase.agrees`), so a future rename is caught there rather than trusted.

>>> from knlens import load_model, encode
>>> import torch
>>> model = load_model("tiny-llama")
>>> q = encode(model, ["the capital of france is"], " paris")
>>> with torch.no_grad(), cache_keyword_fix(model):
...     _, kv = model(q.tokens[:, :-1], return_type="logits_and_cache")
...     cached = model(q.tokens[:, -1:], past_key_values=kv)[:, -1]
>>> torch.allclose(cached, model(q.tokens)[:, -1], atol=1e-5)
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["cache_keyword_fix"]


def _give_cache_its_old_name(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


@contextlib.contextmanager
def cache_keyword_fix(model: Any) -> Iterator[None]:
    """Within the block, attention bridges that read ``past_key_values`` also get a cache passed as
    ``cache`` (torch pre-hooks on ``blocks[k].attn``, removed on exit, errors included)."""
    handles = []
    try:
        for block in getattr(model, "blocks", ()):
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "_update_kv_cache"):
                handles.append(attn.register_forward_pre_hook(_give_cache_its_old_name, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
