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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from .controls import empirical_floor
from .errors import ControlError, PromptError, TargetError
from .facts import Fact
from .interventions import measure
from .jsonable import records
from .neurons import NeuronSet
from .prompts import encode

__all__ = ["Specificity", "specificity", "other_relation_facts"]


def other_relation_facts(model: Any, fact: Fact, pool: Sequence[Fact] | None = None) -> tuple[list[Fact], str]:
    """Facts of ``pool`` (default: the built-in facts) from relations other than ``fact``'s, usable on
    ``model`` (their target and prompts encode), and a sentence saying how they were chosen.

    A fact without a relation is compared with the facts whose target differs from its own, leaving out
    the relations of pool facts that share its target (a custom "capital of France" fact is not compared
    with the other capitals).
    """
    if pool is None:
        from .data import builtin_facts

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


@dataclass(frozen=True, eq=False)
class Specificity:
    """The fact's neurons on other facts.

    ``frame``: per fact (the fact itself first, ``own`` = True) and action — ``fact, relation, own, action,
    factor, p_before, p_after`` (means over its prompts), ``delta`` (Dai's Δ) and ``relative`` (mean of
    (p_after − p_before) / p_before). ``basis``: how the other facts were chosen.
    """

    frame: pd.DataFrame
    basis: str

    def summary(self) -> pd.DataFrame:
        """Per action: ``own_delta``, the other facts' pooled Δ (``others_delta``, Dai's figure), the mean
        and largest |Δ| of the per-fact Δs, ``n_facts``, ``n_relations``, ``p_specific`` and its floor."""
        rows = []
        for action, sub in self.frame.groupby("action", sort=False):
            own, others = sub[sub.own], sub[~sub.own]
            sign = -1.0 if sub["factor"].iloc[0] < 1 else 1.0
            own_delta = float(own["delta"].iloc[0])
            extreme = int((sign * others["delta"] >= sign * own_delta).sum())
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

    def to_dict(self) -> dict[str, Any]:
        return {"basis": self.basis, "frame": records(self.frame)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Specificity:
        frame = pd.DataFrame.from_records(d["frame"]).fillna({"relative": float("nan")})
        return cls(frame.astype({"own": bool}), d["basis"])


def specificity(model: Any, fact: Fact, neurons: NeuronSet, *, others: Sequence[Fact] | None = None,
                actions: dict[str, float] | None = None, point: str = "hook_post",
                baseline: Float[Tensor, "layer d"] | None = None, batch_size: int = 64) -> Specificity:
    """Suppress / enhance ``neurons`` on ``fact`` and on ``others`` (default: :func:`other_relation_facts`).

    Raises :class:`~knlens.errors.ControlError` when there is no other fact to compare with.
    """
    if others is None:
        others, basis = other_relation_facts(model, fact)
    else:
        others = list(others)
        basis = f"{len(others)} given facts, {len({f.relation for f in others})} relations"
    if not others:
        raise ControlError(f"no fact of another relation to test the specificity of {fact.name or fact.prompts[0]!r} "
                           f"on ({basis})")
    facts = [fact, *others]
    iv = measure(model, facts, [neurons] * len(facts), actions=actions, n_random=0, controls=(), point=point,
                 baseline=baseline, batch_size=batch_size)
    per, start = [], 0
    for i, fc in enumerate(facts):  # measure() writes each fact's rows as one block: actions × prompts
        block = iv.frame.iloc[start:start + len(iv.settings["actions"]) * len(fc.prompts)]
        start += len(block)
        for action, sub in block.groupby("action", sort=False):
            per.append({"fact": fc.name or f"fact{i}", "relation": fc.relation, "own": i == 0, "action": action,
                        "factor": float(sub["factor"].iloc[0]), "p_before": sub["p_before"].mean(),
                        "p_after": sub["p_after"].mean(), "delta": sub["change"].mean() / sub["p_before"].mean(),
                        "relative": sub["relative"].mean()})
    return Specificity(pd.DataFrame(per), basis)
