"""Suppress / enhance neurons at the target position and measure the change of P(target) (methods.md §1).

A random control of the same size and layer spread (same number of neurons in each layer, drawn
from the rest of that layer) shows what an arbitrary set of neurons does. All draws of a fact run as
rows of one batch: each row carries its own neuron mask.

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
>>> res = measure(model, [fact], [NeuronSet([(1, 3), (1, 7)])], n_random=5)
>>> sorted(res.frame["neurons"].unique())
['knowledge', 'random']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

from .engine import chunks, target_probs
from .facts import Fact
from .hooks import Hook, hook_name, scale
from .neurons import NeuronSet
from .prompts import Queries, encode

__all__ = ["InterventionResult", "random_control", "intervene", "measure", "FACTORS"]

FACTORS: dict[str, float] = {"suppress": 0.0, "enhance": 2.0}


def random_control(neurons: NeuronSet, d_mlp: int, *, seed: int = 0) -> NeuronSet:
    """A random set with the same number of neurons in each layer, avoiding ``neurons`` themselves."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for layer, idx in sorted(neurons.by_layer().items()):
        allowed = torch.tensor([i for i in range(d_mlp) if i not in set(idx)])
        choice = allowed[torch.randperm(len(allowed), generator=gen)[:len(idx)]]
        picked += [(layer, int(i)) for i in choice]
    return NeuronSet(picked)


def _masks(sets: Sequence[NeuronSet], n_layers: int, d_mlp: int) -> Bool[Tensor, "set layer d"]:
    mask = torch.zeros(len(sets), n_layers, d_mlp, dtype=torch.bool)
    for i, s in enumerate(sets):
        s.check(n_layers, d_mlp)
        for n in s:
            mask[i, n.layer, n.index] = True
    return mask


def _set_hooks(masks: Bool[Tensor, "rows layer d"], factor: float, position: Tensor, point: str) -> list[Hook]:
    layers = masks.any(-1).any(0).nonzero()[:, 0].tolist()
    return [(hook_name(l, point), scale(factor, neurons=masks[:, l].to(position.device), position=position))
            for l in layers]


@torch.no_grad()
def intervene(model: Any, q: Queries, sets: Sequence[NeuronSet], factor: float, *, point: str = "hook_post",
              batch_size: int = 64) -> Float[Tensor, "set batch"]:
    """P(target) of every row of ``q`` with each neuron set scaled by ``factor`` at the target position.

    ``factor=0`` suppresses, ``factor=2`` enhances. Every (set, row) pair is one batch row.
    """
    masks = _masks(sets, model.cfg.n_layers, model.cfg.d_mlp)  # [set, layer, d]
    n_rows = len(q)
    pairs = torch.cartesian_prod(torch.arange(len(sets)), torch.arange(n_rows))  # (set, row)
    out = torch.empty(len(pairs))
    for s in chunks(len(pairs), batch_size):
        set_i, row_i = pairs[s, 0], pairs[s, 1]
        sub = q.select(row_i)
        hooks = _set_hooks(masks[set_i], factor, sub.position, point)
        out[s] = target_probs(model, sub, hooks, batch_size=None).cpu()
    return out.view(len(sets), n_rows)


def _per_prompt(p: Tensor, q: Queries) -> Tensor:
    """Combine teacher-forced rows into one probability per prompt (product over target tokens)."""
    n_prompts = len(q.prompts)
    out = torch.ones(p.shape[:-1] + (n_prompts,), dtype=p.dtype)
    for i in range(n_prompts):
        out[..., i] = p[..., (q.prompt_index == i).cpu()].prod(-1)
    return out


@dataclass(frozen=True)
class InterventionResult:
    """Per (fact, prompt, action, neuron set) probabilities before and after, and the tests.

    ``frame`` has columns ``fact, relation, prompt, action, neurons, draw, n_neurons, p_before, p_after,
    change`` (= p_after − p_before) and ``relative`` (= change / p_before). ``neurons`` is
    ``"knowledge"`` or ``"random"`` (``draw`` numbers the random sets).
    """

    frame: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def delta(self) -> pd.DataFrame:
        """Δ = mean(p_after − p_before) / mean(p_before) by action and neuron kind (methods.md §1)."""
        g = self.frame.groupby(["action", "neurons"])
        return (g["change"].mean() / g["p_before"].mean()).rename("delta").reset_index()

    def per_fact(self) -> pd.DataFrame:
        """Mean relative change per fact, action and neuron kind (random draws averaged)."""
        return (self.frame.groupby(["fact", "action", "neurons"])["relative"].mean()
                .unstack("neurons").reset_index())

    def tests(self) -> pd.DataFrame:
        """Per action: the knowledge set's effect against the random control.

        ``p_empirical``: share of random draws whose mean relative change is at least as extreme (in the
        knowledge set's direction) as the knowledge set's, pooled over facts ((1 + k) / (1 + N));
        ``p_wilcoxon``: paired Wilcoxon signed-rank test over facts of knowledge vs mean random change
        (NaN with fewer than 2 facts).
        """
        rows = []
        for action, sub in self.frame.groupby("action"):
            kn = sub[sub.neurons == "knowledge"]["relative"].mean()
            per_draw = sub[sub.neurons == "random"].groupby("draw")["relative"].mean()
            sign = -1.0 if action == "suppress" else 1.0
            extreme = int((sign * per_draw.to_numpy() >= sign * kn).sum())
            p_emp = (1 + extreme) / (1 + len(per_draw)) if len(per_draw) else float("nan")
            pf = sub.groupby(["fact", "neurons"])["relative"].mean().unstack("neurons")
            p_w = float("nan")
            if len(pf) >= 2 and "random" in pf:
                diff = (pf["knowledge"] - pf["random"]).to_numpy()
                if np.any(diff != 0):
                    p_w = float(stats.wilcoxon(pf["knowledge"], pf["random"], alternative="two-sided").pvalue)
            rows.append({"action": action, "knowledge_relative": kn, "random_relative": per_draw.mean(),
                         "n_random_draws": len(per_draw), "n_facts": sub["fact"].nunique(),
                         "p_empirical": p_emp, "p_wilcoxon": p_w})
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Mean p before / after and relative change by action and neuron kind, with the tests."""
        g = self.frame.groupby(["action", "neurons"]).agg(
            p_before=("p_before", "mean"), p_after=("p_after", "mean"), relative=("relative", "mean"))
        return g.reset_index()


def measure(model: Any, facts: Sequence[Fact], neuron_sets: Sequence[NeuronSet], *,
            actions: dict[str, float] | None = None, n_random: int = 20, seed: int = 0,
            point: str = "hook_post", batch_size: int = 64) -> InterventionResult:
    """Suppress (×0) and enhance (×2) each fact's neurons and ``n_random`` layer-matched random sets.

    ``neuron_sets[i]`` belongs to ``facts[i]``. An empty set is measured too (it changes nothing).
    """
    if len(facts) != len(neuron_sets):
        raise ValueError(f"{len(facts)} facts but {len(neuron_sets)} neuron sets: give one set per fact")
    actions = dict(FACTORS if actions is None else actions)
    records = []
    for f_idx, (fact, kn) in enumerate(zip(facts, neuron_sets)):
        q = encode(model, list(fact.prompts), fact.target)
        rand = [random_control(kn, model.cfg.d_mlp, seed=seed + 1000 * f_idx + d) for d in range(n_random)]
        before = _per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
        for action, factor in actions.items():
            after = _per_prompt(intervene(model, q, [kn, *rand], factor, point=point, batch_size=batch_size), q)
            for s_idx in range(after.shape[0]):
                for p_idx, prompt in enumerate(fact.prompts):
                    b, a = float(before[p_idx]), float(after[s_idx, p_idx])
                    records.append({
                        "fact": fact.name or f"fact{f_idx}", "relation": fact.relation, "prompt": prompt,
                        "action": action, "neurons": "knowledge" if s_idx == 0 else "random",
                        "draw": s_idx - 1, "n_neurons": len(kn), "p_before": b, "p_after": a,
                        "change": a - b, "relative": (a - b) / b if b > 0 else float("nan")})
    return InterventionResult(pd.DataFrame.from_records(records),
                              {"actions": actions, "n_random": n_random, "seed": seed, "hook_point": point,
                               "position": "target"})
