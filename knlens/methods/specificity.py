"""Dai et al.'s specificity control: a fact's neurons suppressed / enhanced on facts of other relations.

Knowledge neurons should move their own fact's probability, not everyone's. :func:`specificity` applies the
same intervention to other facts (by default the built-in facts of every other relation) and reports Dai's
Δ = mean(p_after − p_before) / mean(p_before) there, per fact and per relation, beside the fact's own Δ.

``p_specific`` (one-sided) is the share of other facts whose Δ is at least as extreme, in the expected
direction, as the fact's own: ``(1 + k) / (1 + K)`` over ``K`` other facts, never below ``1 / (1 + K)``.
Neurons that lower every fact's probability as much as their own get a large ``p_specific``.

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is"], " paris", relation="capital")
>>> others = [Fact(["the official language of japan is"], " japanese", relation="language", name="lang-japan"),
...           Fact(["the currency of japan is the"], " yen", relation="currency", name="currency-japan")]
>>> spec = specificity(model, fact, NeuronSet([(1, 3)]), others=others)
>>> spec.summary()["n_facts"].tolist()
[2, 2]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from knlens.stats.tests import empirical_floor
from knlens.run.engine import Engine
from knlens.core.errors import ControlError, PromptError, TargetError
from knlens.core.facts import Fact
from knlens.methods.interventions import FACTORS, NON_MONOTONE_POINTS, per_prompt
from knlens.methods.scaling import scaled_probs
from knlens.results.contract import TableResult
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode, stack

__all__ = ["Specificity", "SpecificitySettings", "specificity", "other_relation_facts"]


def other_relation_facts(model: Any, fact: Fact, pool: Sequence[Fact] | None = None) -> tuple[list[Fact], str]:
    """Facts of ``pool`` (default: the built-in facts) from relations other than ``fact``'s, usable on
    ``model`` (their target and prompts encode), and a sentence saying how they were chosen.

    A fact without a relation is compared with the facts whose target differs from its own, leaving out
    the relations of pool facts that share its target (a custom "capital of France" fact is not compared
    with the other capitals).
    """
    if pool is None:
        from knlens.data.builtin import builtin_facts

        pool = builtin_facts()
    if fact.relation is not None:
        chosen = [f for f in pool if f.relation != fact.relation and f.name != fact.name]
        basis = f"facts of relations other than {fact.relation!r}"
    else:
        target = fact.target.strip().lower()
        near = sorted({str(f.relation) for f in pool if f.target.strip().lower() == target})
        chosen = [f for f in pool if f.target.strip().lower() != target and str(f.relation) not in near]
        basis = "facts with another target" + (f", outside the relations whose facts share it ({', '.join(near)})"
                                                if near else "") + " (the fact has no relation)"
    usable, skipped = [], 0
    for f in chosen:
        try:
            encode(model, list(f.prompts), f.target)
        except (TargetError, PromptError):
            skipped += 1
            continue
        usable.append(f)
    relations = {f.relation for f in usable}
    text = f"{len(usable)} {basis}, {len(relations)} relations"
    if skipped:
        text += f" ({skipped} skipped: target or prompt does not fit this model's vocabulary)"
    return usable, text


@dataclass(frozen=True)
class SpecificitySettings:
    """The intervention (``actions``: name → factor, at ``hook_point`` with baseline ``"zero"`` or
    ``"custom tensor"``), the other facts it was applied to (``others``: their names) and the ``engine`` that ran
    it (:mod:`knlens.methods.scaling`; ``engine_note``: why a faster one fell back)."""

    actions: dict[str, float] = field(default_factory=lambda: dict(FACTORS))
    hook_point: str = "hook_post"
    baseline: str = "zero"
    others: tuple[str, ...] = ()
    engine: str = "reference"
    engine_note: str = ""


@dataclass(frozen=True, eq=False)
class Specificity(TableResult):
    """The fact's neurons on other facts.

    ``frame``: per fact (the fact itself first, ``own`` = True) and action — ``fact, relation, own, action,
    factor, p_before, p_after`` (means over its prompts), ``delta`` (Dai's Δ) and ``relative`` (mean of
    (p_after − p_before) / p_before). ``basis``: how the other facts were chosen.
    """

    study = "specificity"

    frame: pd.DataFrame
    basis: str
    settings: SpecificitySettings = SpecificitySettings()


    def plot(self) -> Any:
        """Per action: histogram of the other facts' Δ, the fact's own Δ as a line."""
        import matplotlib.pyplot as plt

        actions = list(dict.fromkeys(self.frame["action"]))
        fig, axes = plt.subplots(1, len(actions), figsize=(4.2 * len(actions), 2.8), squeeze=False)
        for ax, action in zip(axes[0], actions):
            sub = self.frame[self.frame["action"] == action]
            ax.hist(sub[~sub.own]["delta"] * 100, bins=min(20, max(5, len(sub) // 2)), color="0.6",
                    label="other facts")
            ax.axvline(float(sub[sub.own]["delta"].iloc[0]) * 100, color="#c33", lw=2, label="own fact")
            ax.set_title(f"{action}: Dai's Δ (%)", fontsize=9)
        axes[0][-1].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig

    def summary(self) -> pd.DataFrame:
        """Per action: ``own_delta``, the other facts' pooled Δ (``others_delta``, Dai's figure), the mean
        and largest |Δ| of the per-fact Δs, ``n_facts``, ``n_relations``, ``p_specific`` and its floor."""
        rows = []
        for action, sub in self.frame.groupby("action", sort=False):
            own, others = sub[sub.own], sub[~sub.own]
            sign = -1.0 if sub["factor"].iloc[0] < 1 else 1.0
            own_delta = float(own["delta"].iloc[0])
            tie = np.isclose(others["delta"], own_delta, rtol=1e-6, atol=0.0)  # equal up to float rounding
            extreme = int(((sign * others["delta"] >= sign * own_delta) | tie).sum())
            k = len(others)
            rows.append({"action": action, "own_delta": own_delta,
                         "others_delta": (others["p_after"] - others["p_before"]).mean() / others["p_before"].mean(),
                         "others_mean_delta": others["delta"].mean(), "others_max_abs_delta": others["delta"].abs().max(),
                         "n_facts": k, "n_relations": others["relation"].nunique(),
                         "p_specific": (1 + extreme) / (1 + k), "p_specific_floor": empirical_floor(k)})
        return pd.DataFrame(rows)

    def by_relation(self) -> pd.DataFrame:
        """Dai's Δ per other relation (pooled over its facts' prompts) and action: relations × actions."""
        others = self.frame[~self.frame.own]
        g = others.groupby(["relation", "action"], sort=False)
        delta = (g["p_after"].mean() - g["p_before"].mean()) / g["p_before"].mean()
        return delta.unstack("action").reset_index()


def specificity(model: Any, fact: Fact, neurons: NeuronSet, *, others: Sequence[Fact] | None = None,
                actions: dict[str, float] | None = None, hook_point: str = "hook_post",
                baseline: Float[Tensor, "layer d"] | None = None, batch_size: int = 64,
                engine: Engine = "fast") -> Specificity:
    """Suppress / enhance ``neurons`` on ``fact`` and on ``others`` (default: :func:`other_relation_facts`), on
    ``engine`` (:func:`knlens.methods.scaling.scaled_probs`).

    Raises :class:`~knlens.core.errors.ControlError` when there is no other fact to compare with.
    """
    if others is None:
        others, basis = other_relation_facts(model, fact)
    else:
        others = list(others)
        basis = f"{len(others)} given facts, {len({f.relation for f in others})} relations"
    if not others:
        raise ControlError(f"no fact of another relation to test the specificity of {fact.name or fact.prompts[0]!r} "
                           f"on ({basis})")
    actions = {k: float(v) for k, v in (FACTORS if actions is None else actions).items()}
    if hook_point in NON_MONOTONE_POINTS and any(f not in (0.0, 1.0) for f in actions.values()):
        warnings.warn(f"specificity: x2 at {hook_point} is not monotone in the neurons' output (see knlens.methods.interventions)",
                      UserWarning, stacklevel=2)
    facts = [fact, *others]
    q = stack([encode(model, list(fc.prompts), fc.target) for fc in facts])  # every prompt of every fact
    probs = scaled_probs(model, q, [neurons], list(actions.values()), hook_point=hook_point, baseline=baseline,
                         engine=engine, batch_size=batch_size)
    before = per_prompt(probs.clean, q).double()
    after = {action: per_prompt(probs.after[k, 0], q).double() for k, action in enumerate(actions)}
    per, start = [], 0
    for i, fc in enumerate(facts):
        rows = slice(start, start + len(fc.prompts))
        start += len(fc.prompts)
        b = before[rows]
        for action, factor in actions.items():
            a = after[action][rows]
            per.append({"fact": fc.name or f"fact{i}", "relation": fc.relation, "own": i == 0, "action": action,
                        "factor": float(factor), "p_before": float(b.mean()), "p_after": float(a.mean()),
                        "delta": float((a - b).mean() / b.mean()), "relative": float(((a - b) / b).mean())})
    settings = SpecificitySettings(actions, hook_point, "zero" if baseline is None else "custom tensor",
                                   tuple(fc.name or fc.prompts[0] for fc in others), probs.engine, probs.note)
    return Specificity(pd.DataFrame(per), basis, settings)
