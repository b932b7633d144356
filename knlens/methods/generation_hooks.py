"""Greedy generation with hooks active at every generated step, and neuron-scaling hooks for every position.

:func:`generate` attaches its hooks once (:func:`knlens.run.hooks.hooked`) around the whole loop, so every step's
forward runs with them, and removes them when the loop ends, stops early or raises. Each step is a plain
whole-sequence forward (no key/value cache): a step's activations are those of a fresh forward over the text so
far, the reference every other knlens number is checked against.

>>> from knlens import load_model, NeuronSet
>>> model = load_model("tiny-llama")
>>> g = generate(model, "the capital of france is", 3, hooks=scaling_hooks(NeuronSet([(1, 3)]), 2.0))
>>> len(g.new_tokens), model.hook_dict["blocks.1.mlp.hook_post"].fwd_hooks
(3, [])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knlens.core.errors import SettingsError
from knlens.core.neurons import NeuronSet
from knlens.run.hooks import Hook, hooked, neuron_hooks, scale

__all__ = ["Generation", "generate", "scaling_hooks", "stop_at_punctuation"]


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced: the prompt's token ids, the new ones and their text."""

    prompt_tokens: tuple[int, ...]
    new_tokens: tuple[int, ...]
    text: str


def scaling_hooks(neurons: NeuronSet, factor: float, hook_point: str = "hook_post") -> list[Hook]:
    """Hooks that multiply ``neurons`` by ``factor`` at every position (×0 suppresses, ×2 enhances): over a
    prompt, and at each generated step, the new position included.

    >>> [name for name, _ in scaling_hooks(NeuronSet([(0, 1), (1, 2)]), 0.0)]
    ['blocks.0.mlp.hook_post', 'blocks.1.mlp.hook_post']
    """
    return neuron_hooks(neurons, lambda idx: scale(float(factor), idx), hook_point)


def stop_at_punctuation(text: str) -> bool:
    """The default stop rule: the generated text holds a sentence or clause end (``. , ; \\n``) after a word.

    >>> stop_at_punctuation(" Paris"), stop_at_punctuation(" Paris."), stop_at_punctuation(".")
    (False, True, False)
    """
    head = text.lstrip()
    return any(c in head[1:] for c in ".,;\n")


@torch.no_grad()
def generate(model: Any, prompt: str, max_new_tokens: int, *, hooks: Sequence[Hook] = (),
             stop: Callable[[str], bool] | None = stop_at_punctuation) -> Generation:
    """Greedy continuation of ``prompt`` by at most ``max_new_tokens`` tokens with ``hooks`` active at every step
    (attached once, removed on every exit, errors included). ``stop(text_so_far)`` ends it early; ``None``
    never stops early. The EOS token ends it too."""
    if max_new_tokens < 1:
        raise SettingsError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = getattr(model.cfg, "device", None) or "cpu"
    tokens = model.to_tokens(prompt).to(device)
    start = tokens.shape[1]
    eos = getattr(model.tokenizer, "eos_token_id", None)
    with hooked(model, list(hooks)):
        for _ in range(max_new_tokens):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            text = model.tokenizer.decode(tokens[0, start:].tolist())
            if int(nxt) == eos or (stop is not None and stop(text)):
                break
    new = tokens[0, start:].tolist()
    return Generation(tuple(tokens[0, :start].tolist()), tuple(new), model.tokenizer.decode(new))
