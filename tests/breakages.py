"""Breakages the engines' self-checks must catch, shared by the IG and tracing tests."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def cache_ignored(model):
    """What transformers 5.24 did to TransformerLens 4.3's attention: it never sees the key/value cache."""
    def drop(module, args, kwargs):
        return args, {**kwargs, **{k: None for k in ("past_key_values", "cache") if k in kwargs}}
    handles = [block.attn.register_forward_pre_hook(drop, with_kwargs=True) for block in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
