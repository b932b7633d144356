"""The two-stage neuron filter, text version of Sato and Takagi's multimodal method (docs/methods.md, Two-stage filter).

For a fact's prompts and its answer y*, at the answer position on ``hook_post``:

1. **activation difference** — ``Δ(n) = a_clean(n) − a_corrupted(n)``, the corrupted prompt having its subject
   removed from the text (``"remove"``), replaced by a neutral entity (``"replace"``), or noised at the embeddings as
   in causal tracing (``"noise"``, :class:`~knlens.methods.tracing.corruption.Corruption`, samples averaged); stage 1
   keeps ``Δ > tau_a · max Δ`` (or the ``top_k`` largest Δ);
2. **gradient × activation** — ``g(n) = a(n) · ∂log P(y*)/∂a(n)`` on the clean run; of the stage-1 neurons, those
   with ``g > tau_g`` are kept, ranked by g.

Δ and g are averaged over the prompts. Cost: one clean forward and one backward for all prompts, and one corrupted
forward per prompt (and noise sample). The multimodal original corrupts an image by inpainting: that path needs a
vision-language model that TransformerLens can wrap, and :func:`two_stage` says so when given an image.

>>> from knlens import load_model, Fact
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france")
>>> r = two_stage(model, fact, TwoStageSettings(corruption="remove", tau_a=0.3))
>>> r.delta.shape, len(r.stage1) >= len(r.neurons), r.cost["backward"]
(torch.Size([2, 48]), True, 1.0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import EmptyStageError, ModalityError, PromptError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries, encode
from knlens.methods.structure.qrnca import top_neurons
from knlens.methods.tracing.corruption import EMBED_HOOK, Corruption, corruption_hook
from knlens.methods.tracing.spans import subject_token_span
from knlens.results.contract import Result
from knlens.run.engine import activations_at, forward, read_quantity
from knlens.run.hooks import hook_name

__all__ = ["TwoStageSettings", "TwoStage", "two_stage", "corrupted_prompt", "grad_x_activation"]


@dataclass(frozen=True)
class TwoStageSettings:
    """How the filter corrupts (``corruption``, the ``neutral`` entity of ``"replace"``, ``noise_samples`` and
    ``noise_factor`` of ``"noise"``) and its thresholds: ``tau_a`` (fraction of max Δ) or ``top_k`` (the k largest
    Δ, when set) for stage 1, ``tau_g`` (absolute, on g) for stage 2."""

    corruption: Literal["remove", "replace", "noise"] = "noise"
    neutral: str = "something"
    noise_samples: int = 10
    noise_factor: float = 3.0
    tau_a: float = 0.2
    top_k: int | None = None
    tau_g: float = 0.0
    hook_point: str = "hook_post"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.corruption not in ("remove", "replace", "noise"):
            raise SettingsError(f"unknown corruption {self.corruption!r}; use 'remove', 'replace' or 'noise'")
        if not 0.0 <= self.tau_a < 1.0:
            raise SettingsError(f"tau_a is a fraction of the largest activation difference in [0, 1), got {self.tau_a}")
        if self.top_k is not None and self.top_k < 1:
            raise SettingsError(f"top_k must be at least 1 (or None to use tau_a), got {self.top_k}")
        if self.noise_samples < 1:
            raise SettingsError(f"noise_samples must be at least 1, got {self.noise_samples}")


@dataclass(frozen=True, eq=False)
class TwoStage(Result):
    """The filter's result on one fact: ``delta`` and ``grad_x_act`` ``[layer, neuron]`` (means over prompts),
    ``stage1`` (kept by Δ) and ``neurons`` (then kept by g, best first), and the ``cost`` (passes and seconds)."""

    study = "two_stage"

    fact: Fact
    delta: Float[Tensor, "layer neuron"]
    grad_x_act: Float[Tensor, "layer neuron"]
    stage1: NeuronSet
    neurons: NeuronSet
    cost: dict[str, float]
    settings: TwoStageSettings = TwoStageSettings()
    p_clean: float = float("nan")
    corrupted: tuple[str, ...] = field(default=())

    def to_frame(self) -> pd.DataFrame:
        """One row per stage-1 neuron: ``layer, neuron, delta, grad_x_act, kept`` (by stage 2), best g first."""
        rows = [{"layer": n.layer, "neuron": n.index, "delta": float(self.delta[n.layer, n.index]),
                 "grad_x_act": float(self.grad_x_act[n.layer, n.index]), "kept": n in self.neurons}
                for n in self.stage1]
        return pd.DataFrame(rows).sort_values("grad_x_act", ascending=False, kind="stable").reset_index(drop=True)

    def plot(self, ax: Any = None) -> Any:
        """Δ against g of every neuron, the stage-1 and final neurons marked."""
        import matplotlib.pyplot as plt

        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 4))
        ax.scatter(self.delta.flatten(), self.grad_x_act.flatten(), s=3, c="0.7", label="all neurons")
        for ns, colour, label in ((self.stage1, "#39c", "stage 1 (Δ)"), (self.neurons, "#c33", "stage 2 (g)")):
            if len(ns):
                ax.scatter([float(self.delta[n]) for n in ns], [float(self.grad_x_act[n]) for n in ns], s=12,
                           c=colour, label=label)
        ax.set_xlabel("Δ activation (clean − corrupted)")
        ax.set_ylabel("g = a · ∂log P/∂a")
        ax.legend(fontsize=7)
        return fig


def corrupted_prompt(prompt: str, subject: str, how: str, neutral: str = "something") -> str:
    """``prompt`` with its subject removed (``"remove"``) or replaced by ``neutral`` (``"replace"``).

    >>> corrupted_prompt("The capital of France is", "France", "remove"), corrupted_prompt("France is in", "France", "replace")
    ('The capital of is', 'something is in')
    """
    if subject not in prompt:
        raise PromptError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    out = " ".join(prompt.replace(subject, "" if how == "remove" else neutral, 1).split())
    if not out:
        raise PromptError(f"removing the subject {subject!r} leaves the prompt {prompt!r} empty")
    return out


def grad_x_activation(model: Any, q: Queries, hook_point: str = "hook_post"
                      ) -> tuple[Float[Tensor, "row layer d"], Float[Tensor, "row layer d"], Float[Tensor, "row"]]:
    """Clean activations ``a``, ``a · ∂log P(target)/∂a`` at each row's target position on every layer, and
    P(target): one forward and one backward for all rows."""
    leaves: list[Tensor] = []
    rows = torch.arange(len(q))

    def swap(act: Tensor, hook: Any = None) -> Tensor:
        leaf = act[rows.to(act.device), q.position.to(act.device)].detach().float().requires_grad_(True)
        leaves.append(leaf)
        out = act.clone()
        out[rows.to(act.device), q.position.to(act.device)] = leaf.to(act.dtype)
        return out

    names = [hook_name(l, hook_point) for l in range(model.cfg.n_layers)]
    with torch.enable_grad():
        logits = forward(model, q.tokens, [(n, swap) for n in names], attention_mask=q.attention_mask)
        logp = read_quantity(logits[rows.to(logits.device), q.position], q.target, "logprob")
        grads = torch.autograd.grad(logp.sum(), leaves)
    acts = torch.stack([a.detach().cpu() for a in leaves], 1)
    return acts, acts * torch.stack([g.cpu() for g in grads], 1), logp.detach().exp().cpu()


def _noised_activations(model: Any, q: Queries, fact: Fact, s: TwoStageSettings, names: list[str]
                        ) -> Float[Tensor, "row layer d"]:
    """Activations at the target with the subject's embeddings noised, averaged over the samples, per prompt."""
    c = Corruption("noise", factor=s.noise_factor, seed=s.seed, samples=s.noise_samples)
    out = []
    for i, prompt in enumerate(fact.prompts):
        span = subject_token_span(model, prompt, fact.subject)
        positions = list(range(*span))
        row = q.row(i)
        batch = row.select([0] * s.noise_samples)
        hook = corruption_hook(c, c.values(model, positions, row.tokens), positions, torch.arange(s.noise_samples))
        acts = activations_at(model, batch, names, [(EMBED_HOOK, hook)])
        out.append(torch.stack([acts[n].float().cpu() for n in names], 1).mean(0))
    return torch.stack(out)


def two_stage(model: Any, fact: Fact, settings: TwoStageSettings = TwoStageSettings(), *,
              image: Any = None, inpainted: Any = None) -> TwoStage:
    """Run both stages on ``fact`` (it needs a ``subject`` and a single-token target). Raises
    :class:`~knlens.core.errors.EmptyStageError` naming the thresholds when a stage keeps nothing, and
    :class:`~knlens.core.errors.ModalityError` when given an image (see the module)."""
    if image is not None or inpainted is not None:
        raise ModalityError(
            f"an image and its inpainted copy need a vision-language model that TransformerLens can wrap (the "
            f"multimodal two-stage filter reads image tokens); {getattr(model.cfg, 'model_name', 'this model')} is a "
            f"text model: corrupt the subject of a text prompt instead (corruption='remove', 'replace' or 'noise')")
    s = settings
    if fact.subject is None:
        raise PromptError(f"the two-stage filter corrupts the subject: fact {fact.name or fact.prompts[0]!r} has none")
    t0 = time.perf_counter()
    q = encode(model, list(fact.prompts), fact.target, multi_token="error")
    names = [hook_name(l, s.hook_point) for l in range(model.cfg.n_layers)]
    acts, gxa, p = grad_x_activation(model, q, s.hook_point)
    if s.corruption == "noise":
        corrupted = _noised_activations(model, q, fact, s, names)
        texts: tuple[str, ...] = ()
        n_corrupted = len(fact.prompts) * s.noise_samples
    else:
        texts = tuple(corrupted_prompt(pr, fact.subject, s.corruption, s.neutral) for pr in fact.prompts)
        got = activations_at(model, encode(model, list(texts), fact.target, multi_token="error"), names)
        corrupted = torch.stack([got[n].float().cpu() for n in names], 1)
        n_corrupted = len(texts)
    delta, g = (acts - corrupted).mean(0), gxa.mean(0)
    if s.top_k is not None:
        stage1 = top_neurons(delta, s.top_k, delta <= 0)
        rule = f"top_k={s.top_k} (of the neurons with Δ > 0)"
    else:
        stage1 = top_neurons(delta, delta.numel(), ~(delta > s.tau_a * delta.max()) | (delta <= 0))
        rule = f"tau_a={s.tau_a} (Δ > {s.tau_a} × max Δ = {float(s.tau_a * delta.max()):.4g})"
    if not len(stage1):
        raise EmptyStageError(f"stage 1 kept no neuron of {fact.name or fact.prompts[0]!r} with {rule}: no activation "
                              f"rose from the corrupted to the clean input; lower tau_a or try another corruption")
    kept = [n for n in stage1 if float(g[n]) > s.tau_g]
    if not kept:
        raise EmptyStageError(f"stage 2 kept none of the {len(stage1)} stage-1 neurons ({rule}) with tau_g={s.tau_g}: "
                              f"their largest g is {max(float(g[n]) for n in stage1):.4g}; lower tau_g")
    neurons = NeuronSet(sorted(kept, key=lambda n: -float(g[n])))
    cost = {"forward": float(len(fact.prompts) + n_corrupted), "backward": 1.0, "seconds": time.perf_counter() - t0}
    return TwoStage(fact, delta, g, stage1, neurons, cost, s, float(p.mean()), texts)
