"""Neurons' activations over a prompt's tokens: circuitsvis' interactive view (JavaScript inline, works
offline) and a static coloured HTML version for pages without JavaScript.

>>> from knlens import load_model, Fact, NeuronSet, token_activations
>>> model = load_model("tiny-llama")
>>> acts = token_activations(model, Fact(["the capital of france is"], " paris"), NeuronSet([(1, 3)]))
>>> "<script" in str(token_view(acts))
True
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

from knlens.core.errors import PromptError
from knlens.methods.activations import TokenActivations
from knlens.studies.knowledge_neurons_result import LocateResult

__all__ = ["InlineHTML", "SEPARATOR", "token_view", "static_tokens"]

SEPARATOR = " ‖ "  # between prompts in the token view


class InlineHTML:
    """HTML that Jupyter renders as is (a circuitsvis view with its JavaScript inline: no CDN, no probe)."""

    def __init__(self, src: str) -> None:
        self.src = src

    def _repr_html_(self) -> str:
        return self.src

    def __str__(self) -> str:
        return self.src


def token_view(activations: LocateResult | Sequence[TokenActivations]) -> InlineHTML:
    """circuitsvis ``colored_tokens_multi`` of neurons' activations over the tokens of several prompts.

    Takes a :class:`LocateResult` (its tested neurons) or :func:`~knlens.studies.knowledge_neurons.token_activations`' list.
    The prompts follow each other (BOS dropped), separated by ``‖``; one button per neuron picks the
    colouring, hovering a token lists every neuron's value. The JavaScript is inlined (``local_src``).
    """
    from circuitsvis.tokens import colored_tokens_multi

    acts = list(activations.activations if isinstance(activations, LocateResult) else activations)
    if not acts:
        raise PromptError("token_view needs the activations of at least one prompt")
    neurons = acts[0].neurons
    tokens: list[str] = []
    rows: list[torch.Tensor] = []
    k = len(neurons)
    bos = {"<|endoftext|>", "<s>", "[BOS]", "[CLS]", "<bos>", "<|im_start|>"}
    for i, ta in enumerate(acts):
        if i:
            tokens.append(SEPARATOR)
            rows.append(torch.zeros(1, k))
        keep = [j for j, tok in enumerate(ta.tokens) if not (j == 0 and tok in bos)]
        tokens += [ta.tokens[j] for j in keep]
        rows.append(ta.values[keep].float())
    values = torch.cat(rows) if rows else torch.zeros(0, k)
    labels = [str(n) for n in neurons]
    return InlineHTML(colored_tokens_multi(tokens, values, labels).local_src)


def static_tokens(result: LocateResult) -> str:
    """The same activations as coloured HTML (no JavaScript): one line per prompt and tested neuron."""
    vmax = max((float(a.values.abs().max()) for a in result.activations if a.values.numel()), default=1.0) or 1.0
    out = []
    for ta in result.activations:
        out.append(f'<p class="note"><b>{html.escape(ta.prompt)}</b> (target read at token {ta.target_position})</p>')
        rows = []
        for j, n in enumerate(ta.neurons):
            spans = []
            for t, tok in enumerate(ta.tokens):
                v = float(ta.values[t, j])
                a = min(1.0, abs(v) / vmax)
                color = f"rgba(214,39,40,{a:.2f})" if v >= 0 else f"rgba(31,119,180,{a:.2f})"
                border = ";outline:1px solid #333" if t == ta.target_position else ""
                spans.append(f'<span class="tok" style="background:{color}{border}" title="{v:.4g}">'
                             f"{html.escape(tok)}</span>")
            rows.append(f'<tr><td class="l"><code>{n}</code></td><td class="l">{"".join(spans)}</td></tr>')
        out.append(f"<table>{''.join(rows)}</table>")
    return "\n".join(out)
