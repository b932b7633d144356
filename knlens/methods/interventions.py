"""Suppress / enhance neurons at the target position and measure the change of P(target) (docs/methods.md, suppress and enhance).

An action with factor ``f`` moves each selected neuron along the integrated-gradients path:
``a ← b + f·(a − b)`` at the target position, ``b`` the IG baseline (0 by default). Suppress is ``f = 0``
(the neuron at its baseline), enhance ``f = 2`` (its contribution relative to the baseline doubled).

* At ``hook_post`` (the input of ``W_out``, the default) the neuron writes ``a · W_out[i]`` into the
  residual stream, linear in ``a``: enhance doubles that write whatever its sign. In a gated MLP
  (``silu(gate) · up``) ``a`` is often negative; enhance then doubles a negative write, which is still
  "more of what the neuron does", not a push towards positive values.
* At ``hook_pre_linear`` (the ``up`` projection of a gated MLP) the output ``silu(gate) · up`` is linear
  in ``up``, so enhance there doubles the output as well.
* At ``hook_pre`` (the input of GELU / SiLU) ×2 is not monotone in the neuron's output: a negative
  pre-activation doubled can shrink the output or flip its sign. :func:`measure` warns, says how many of
  the neurons have a negative pre-activation at the target, and records the caveat in its settings.

Beside each fact's neurons, :func:`measure` runs ``n_random`` random sets of each control of
:mod:`knlens.methods.controls` (``uniform`` within the layers, and ``matched`` on activation magnitude). All
(action, set) pairs of a fact run together, each row with its own neuron mask, on the engines of
:mod:`knlens.methods.scaling` (by default ``fast``: the prompt's prefix once, then a staircase from each set's
lowest layer, checked against plain forwards).

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
>>> res = measure(model, [fact], [NeuronSet([(1, 3), (1, 7)])], n_random=5)
>>> sorted(res.frame["neurons"].unique()), sorted(res.frame["control"].unique())
(['knowledge', 'random'], ['', 'matched', 'uniform'])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from knlens.methods.controls import CONTROLS, matched_control, matched_widening, random_control
from knlens.stats.tests import empirical_floor, wilcoxon_floor
from knlens.methods.scaling import path_scale, scaled_probs
from knlens.run.engine import Engine, activations_at
from knlens.core.errors import ControlError, HookShapeError
from knlens.core.facts import Fact
from knlens.run.hooks import hook_name
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import Queries, encode
from knlens.results.contract import TableResult

__all__ = ["InterventionResult", "InterventionSettings", "random_control", "path_scale", "intervene", "measure", "per_prompt", "FACTORS",
           "NON_MONOTONE_POINTS"]

FACTORS: dict[str, float] = {"suppress": 0.0, "enhance": 2.0}
NON_MONOTONE_POINTS = ("hook_pre",)  # hook points where ×f is not monotone in the neuron's output


def _check_baseline(model: Any, baseline: Tensor | None) -> None:
    want = (model.cfg.n_layers, model.cfg.d_mlp)
    if baseline is not None and tuple(baseline.shape) != want:
        raise HookShapeError(f"baseline has shape {tuple(baseline.shape)}, expected [n_layers, d_mlp] = {list(want)} "
                             f"(one value per neuron of every layer)")


def intervene(model: Any, q: Queries, sets: Sequence[NeuronSet], factor: float, *, hook_point: str = "hook_post",
              baseline: Float[Tensor, "layer d"] | None = None, batch_size: int = 64,
              engine: Engine = "reference") -> Float[Tensor, "set batch"]:
    """P(target) of every row of ``q`` with each neuron set moved to ``b + factor·(a − b)`` at the target position.

    ``factor=0`` suppresses, ``factor=2`` enhances; ``baseline`` (``[n_layers, d_mlp]``) is ``b``, zero when
    ``None``. ``engine="reference"`` runs every (set, row) pair as one row of a plain forward; the faster engines
    and the record of which one ran are :func:`knlens.methods.scaling.scaled_probs`'.

    >>> from knlens import load_model
    >>> model = load_model("tiny-llama")
    >>> q = encode(model, ["the capital of france is", "france capital city is"], " paris")
    >>> intervene(model, q, [NeuronSet([(1, 3)]), NeuronSet()], 0.0).shape          # [set, row]
    torch.Size([2, 2])
    """
    _check_baseline(model, baseline)
    return scaled_probs(model, q, sets, [factor], hook_point=hook_point, baseline=baseline, engine=engine,
                        batch_size=batch_size).after[0]


def per_prompt(p: Float[Tensor, "*sets batch"], q: Queries) -> Float[Tensor, "*sets prompt"]:
    """One probability per prompt from teacher-forced rows: the product of the per-token probabilities
    (P of the whole target given the prompt).

    >>> from knlens import load_model
    >>> m = load_model("tiny-gpt2")
    >>> q = encode(m, ["the capital of", "france is"], " paris is")     # two target tokens per prompt
    >>> per_prompt(torch.tensor([0.5, 0.2, 0.1, 0.3]), q).tolist()
    [0.10000000149011612, 0.030000001192092896]
    """
    out = torch.ones(p.shape[:-1] + (len(q.prompts),), dtype=p.dtype)
    for i in range(len(q.prompts)):
        out[..., i] = p[..., (q.prompt_index == i).cpu()].prod(-1)
    return out


def _stat_rows(sub: pd.DataFrame, control: str, by: list[str]) -> dict[str, Any]:
    """The knowledge set against one control: empirical p over draws, Wilcoxon over ``by`` units (two-sided)."""
    rnd = sub[(sub.neurons == "random") & (sub.control == control)]
    kn = sub[sub.neurons == "knowledge"]["relative"].mean()
    per_draw = rnd.groupby("draw")["relative"].mean()
    sign = -1.0 if sub["factor"].iloc[0] < 1 else 1.0
    extreme = int((sign * per_draw.to_numpy() >= sign * kn).sum())
    p_emp = (1 + extreme) / (1 + len(per_draw)) if len(per_draw) else float("nan")
    pf = pd.DataFrame({"kn": sub[sub.neurons == "knowledge"].groupby(by)["relative"].mean(),
                       "rnd": rnd.groupby(by)["relative"].mean()}).dropna()
    diff = (pf["kn"] - pf["rnd"]).to_numpy()
    p_w = float(stats.wilcoxon(diff).pvalue) if len(pf) >= 2 and np.any(diff != 0) else float("nan")
    return {"relative": per_draw.mean() if len(per_draw) else float("nan"), "n_draws": len(per_draw),
            "p_empirical": p_emp, "p_wilcoxon": p_w, "n_pairs": len(pf)}


@dataclass(frozen=True)
class InterventionSettings:
    """How :func:`measure` moved the neurons: ``actions`` (name → factor f of ``a ← b + f·(a − b)``), the random
    ``controls`` and their ``n_random`` draws (``n_bins`` magnitude bins; ``matched_widened`` neurons whose bin
    had to be widened), the hook point and position, the baseline ``b`` and, at a hook point where ×f is not
    monotone in the neuron's output, a note saying so; the ``engine`` that ran (:mod:`knlens.methods.scaling`) and,
    when a faster one fell back, why (``engine_note``)."""

    actions: dict[str, float] = field(default_factory=lambda: dict(FACTORS))
    n_random: int = 20
    controls: tuple[str, ...] = CONTROLS
    n_bins: int = 10
    matched_widened: int = 0
    seed: int = 0
    hook_point: str = "hook_post"
    position: str = "target"
    baseline: str = "zero"  # "zero" | "custom tensor"
    rule: str = "a <- b + factor * (a - b)"
    non_monotone_note: str = ""
    engine: str = "reference"
    engine_note: str = ""


@dataclass(frozen=True, eq=False)
class InterventionResult(TableResult):
    """Per (fact, prompt, action, neuron set) probabilities before and after, and the tests.

    ``frame`` has columns ``fact, relation, prompt, action, factor, neurons, control, draw, n_neurons,
    p_before, p_after, change`` (= p_after − p_before) and ``relative`` (= change / p_before). ``neurons``
    is ``"knowledge"`` or ``"random"``; ``control`` says which random draw (``"uniform"`` or ``"matched"``,
    ``""`` for the knowledge set) and ``draw`` numbers the draws of a control. For a multi-token target
    ``p_*`` is the product of the teacher-forced per-token probabilities.
    """

    study = "interventions"

    frame: pd.DataFrame
    settings: InterventionSettings = InterventionSettings()


    def plot(self) -> Any:
        """Mean relative change of P(target) per action and set (knowledge, then each control)."""
        import matplotlib.pyplot as plt

        e = self.effects()
        labels = [f"{a}\n{c or k}" for a, k, c in zip(e["action"], e["neurons"], e["control"])]
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(e)), 3))
        ax.bar(range(len(e)), e["relative"] * 100, yerr=e["relative_std"].fillna(0) * 100,
               color=["#c33" if k == "knowledge" else "0.6" for k in e["neurons"]])
        ax.set_xticks(range(len(e)), labels, fontsize=8)
        ax.set_ylabel("mean ΔP(target) / P (%)")
        ax.axhline(0, color="0.3", lw=0.8)
        fig.tight_layout()
        return fig

    def delta(self) -> pd.DataFrame:
        """Δ = mean(p_after − p_before) / mean(p_before) by action, neuron kind and control (docs/methods.md, suppress and enhance)."""
        g = self.frame.groupby(["action", "neurons", "control"], sort=False)
        return (g["change"].mean() / g["p_before"].mean()).rename("delta").reset_index()

    def per_fact(self) -> pd.DataFrame:
        """Mean relative change per fact, action and set kind (random draws averaged per control)."""
        f = self.frame.assign(set=np.where(self.frame.neurons == "knowledge", "knowledge", self.frame.control))
        return f.groupby(["fact", "action", "set"])["relative"].mean().unstack("set").reset_index()

    def effects(self) -> pd.DataFrame:
        """Per action and set (knowledge, then each control): ``n_neurons, p_before, p_after, relative`` (mean
        relative change), ``relative_std`` (std over a control's draws of their mean) and ``delta`` (Dai's Δ)."""
        rows = []
        for (action, kind, control), part in self.frame.groupby(["action", "neurons", "control"], sort=False):
            per_draw = part.groupby("draw")["relative"].mean()
            rows.append({"action": action, "neurons": kind, "control": control,
                         "n_neurons": float(part["n_neurons"].mean()),
                         "p_before": part["p_before"].mean(), "p_after": part["p_after"].mean(),
                         "relative": part["relative"].mean(),
                         "relative_std": float(per_draw.std()) if len(per_draw) > 1 else float("nan"),
                         "delta": part["change"].mean() / part["p_before"].mean()})
        return pd.DataFrame(rows)

    def tests(self, by: str = "fact") -> pd.DataFrame:
        """Per action: the knowledge set's effect against each random control.

        ``p_empirical`` (uniform control) and ``p_empirical_matched``: share of random draws whose mean
        relative change is at least as extreme (in the knowledge set's direction: down for factors < 1, up
        otherwise) as the knowledge set's, pooled over facts, ``(1 + k) / (1 + N)`` — never below
        ``p_empirical_floor`` = 1 / (1 + N). ``p_wilcoxon`` / ``p_wilcoxon_matched``: two-sided Wilcoxon
        signed-rank test over facts (``by="prompt"``: over prompts) of knowledge vs mean random change (NaN with
        fewer than 2 pairs or no difference), never below ``p_wilcoxon_floor`` (``n_pairs`` pairs).
        """
        if by not in ("fact", "prompt"):
            raise ControlError(f"tests(by=...) pairs over 'fact' or 'prompt', got {by!r}")
        keys = ["fact"] if by == "fact" else ["fact", "prompt"]
        rows = []
        for action, sub in self.frame.groupby("action", sort=False):
            row: dict[str, Any] = {"action": action,
                                   "knowledge_relative": sub[sub.neurons == "knowledge"]["relative"].mean()}
            for control in self.settings.controls:
                st = _stat_rows(sub, control, keys)
                tag = "" if control == "uniform" else f"_{control}"
                name = "random" if control == "uniform" else control
                row |= {f"{name}_relative": st["relative"], f"p_empirical{tag}": st["p_empirical"],
                        f"p_wilcoxon{tag}": st["p_wilcoxon"]}
                row |= {"n_random_draws": st["n_draws"], "p_empirical_floor": empirical_floor(st["n_draws"]),
                        "n_facts": sub["fact"].nunique(), "n_pairs": st["n_pairs"],
                        "p_wilcoxon_floor": wilcoxon_floor(st["n_pairs"])}
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Mean p before / after and relative change by action, neuron kind and control."""
        return self.effects()[["action", "neurons", "control", "p_before", "p_after", "relative"]]


def _target_activations(model: Any, q: Queries, hook_point: str) -> Float[Tensor, "row layer d"]:
    names = [hook_name(l, hook_point) for l in range(model.cfg.n_layers)]
    acts = activations_at(model, q, names)
    return torch.stack([acts[n].float().cpu() for n in names], dim=1)


def measure(model: Any, facts: Sequence[Fact], neuron_sets: Sequence[NeuronSet], *,
            actions: dict[str, float] | None = None, n_random: int = 20, controls: Sequence[str] = CONTROLS,
            n_bins: int = 10, seed: int = 0, hook_point: str = "hook_post",
            baseline: Float[Tensor, "layer d"] | None = None, batch_size: int = 64,
            engine: Engine = "fast") -> InterventionResult:
    """Suppress (×0) and enhance (×2) each fact's neurons, and ``n_random`` sets of each control.

    ``neuron_sets[i]`` belongs to ``facts[i]``. An empty set is measured too (it changes nothing).
    ``controls``: ``"uniform"`` (any neuron of the same layers) and/or ``"matched"`` (same layers, same
    ``n_bins``-quantile bin of |a − b| at the target position, averaged over the fact's prompts; see
    :mod:`knlens.methods.controls`). ``baseline`` (``[n_layers, d_mlp]``) is the ``b`` of ``b + f·(a − b)``.
    ``engine`` runs every (action, set) of a fact's prompts (:func:`knlens.methods.scaling.scaled_probs`: ``"fast"``,
    ``"batched"`` or ``"reference"``, same numbers up to float rounding); the one that ran is in the settings.
    """
    if len(facts) != len(neuron_sets):
        raise ControlError(f"{len(facts)} facts but {len(neuron_sets)} neuron sets: give one set per fact")
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise ControlError(f"unknown control(s) {unknown}; choose from {list(CONTROLS)}")
    _check_baseline(model, baseline)
    actions = {k: float(v) for k, v in (FACTORS if actions is None else actions).items()}
    non_monotone = hook_point in NON_MONOTONE_POINTS and any(f not in (0.0, 1.0) for f in actions.values())
    records, widened, negative, engines, notes = [], 0, 0, [], []
    for f_idx, (fact, kn) in enumerate(zip(facts, neuron_sets)):
        kn.check(model.cfg.n_layers, model.cfg.d_mlp)
        q = encode(model, list(fact.prompts), fact.target)
        sets: list[tuple[NeuronSet, str, str, int]] = [(kn, "knowledge", "", -1)]
        rng = seed + 1000 * f_idx
        if "uniform" in controls:
            sets += [(random_control(kn, model.cfg.d_mlp, seed=rng + d), "random", "uniform", d)
                     for d in range(n_random)]
        if "matched" in controls or non_monotone:
            acts = _target_activations(model, q, hook_point)  # [row, layer, d]
            negative += sum(int((acts[:, n.layer, n.index].mean() < 0)) for n in kn)
        if "matched" in controls:
            moved = acts if baseline is None else acts - baseline.float().cpu()
            magnitude = moved.abs().mean(0)
            widened += matched_widening(kn, magnitude, n_bins)
            sets += [(matched_control(kn, magnitude, n_bins=n_bins, seed=rng + 500 + d), "random", "matched", d)
                     for d in range(n_random)]
        probs = scaled_probs(model, q, [s[0] for s in sets], list(actions.values()), hook_point=hook_point,
                             baseline=baseline, engine=engine, batch_size=batch_size)
        engines.append(probs.engine)
        notes.append(probs.note)
        before = per_prompt(probs.clean, q)
        for k, (action, factor) in enumerate(actions.items()):
            after = per_prompt(probs.after[k], q)
            for (s, kind, control, draw), p_after in zip(sets, after):
                for p_idx, prompt in enumerate(fact.prompts):
                    b, a = float(before[p_idx]), float(p_after[p_idx])
                    records.append({
                        "fact": fact.name or f"fact{f_idx}", "relation": fact.relation, "prompt": prompt,
                        "action": action, "factor": factor, "neurons": kind, "control": control, "draw": draw,
                        "n_neurons": len(s), "p_before": b, "p_after": a, "change": a - b,
                        "relative": (a - b) / b if b > 0 else float("nan")})
    note = ""
    if non_monotone:
        note = (f"×f at {hook_point} scales the input of the activation function (GELU / SiLU), which is not monotone "
                f"in the neuron's output: doubling a negative pre-activation can shrink or flip the output; "
                f"{negative} of the {sum(map(len, neuron_sets))} neurons have a negative pre-activation at the "
                f"target. Enhance at hook_post (or hook_pre_linear) strengthens the output instead.")
        warnings.warn(note, UserWarning, stacklevel=2)
    return InterventionResult(
        pd.DataFrame.from_records(records),
        InterventionSettings(actions=actions, n_random=n_random, controls=tuple(controls), n_bins=n_bins,
                             matched_widened=int(widened), seed=seed, hook_point=hook_point, position="target",
                             baseline="zero" if baseline is None else "custom tensor", non_monotone_note=note,
                             engine="+".join(dict.fromkeys("+".join(engines).split("+"))) if engines else engine,
                             engine_note="; ".join(dict.fromkeys(n for n in notes if n))))
