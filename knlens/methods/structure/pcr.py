"""The probability change ratio (PCR) of NA-ICA / QRNCA (docs/methods.md, Query-relevant neurons).

A neuron set is boosted (×2) or suppressed (×0) at the answer position (:func:`knlens.methods.interventions.measure`)
and the relative change of P(answer) is read on *related* queries (those the set was found for) and on *unrelated*
ones: ``PCR = |Δp% related| / |Δp% unrelated|``, Δp% the mean relative change in percent. A set specific to its
queries has PCR ≫ 1; a random set about 1.

>>> pcr([-50.0, -30.0], [-4.0, 4.0, -8.0])          # |-40| / |-8/3|
15.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import ControlError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.methods.interventions import FACTORS, per_prompt
from knlens.methods.scaling import scaled_probs
from knlens.run.engine import Engine

__all__ = ["pcr", "pcr_frame", "pcr_table", "ACTIONS"]

ACTIONS: dict[str, float] = {"boost": FACTORS["enhance"], "suppress": FACTORS["suppress"]}


def pcr(related: Sequence[float], unrelated: Sequence[float]) -> float:
    """``|mean(related)| / |mean(unrelated)|`` of Δp% values (inf when the unrelated mean is 0, NaN when empty)."""
    r, u = np.asarray(related, dtype=float), np.asarray(unrelated, dtype=float)
    r, u = r[np.isfinite(r)], u[np.isfinite(u)]
    if not len(r) or not len(u):
        return float("nan")
    num, den = abs(float(r.mean())), abs(float(u.mean()))
    return num / den if den > 0 else float("inf")


def pcr_frame(model: Any, sets: Mapping[str, NeuronSet], related: Mapping[str, Sequence[Fact]],
              unrelated: Mapping[str, Sequence[Fact]], *, actions: Mapping[str, float] = ACTIONS,
              engine: Engine = "fast", batch_size: int = 64) -> pd.DataFrame:
    """Relative change of P(answer) on every related and unrelated prompt of every group's set.

    Columns: ``group, kind`` (``"related"`` / ``"unrelated"``), ``fact, prompt, action, n_neurons, p_before,
    p_after, dp_percent`` (= 100 · (p_after − p_before) / p_before) and the ``engine`` that ran. The prompts of one
    target run together through :func:`~knlens.methods.scaling.scaled_probs` with every set that measures any of
    them: each prompt's clean forward (and its prefix cache) is shared by all the sets, and the fast engines check
    themselves against plain forwards (no random draws: the baselines are sets of their own).

    >>> from knlens import load_model, Fact
    >>> m = load_model("tiny-llama")
    >>> f, g = Fact(["the capital of france is"], " paris"), Fact(["the capital of spain is"], " madrid")
    >>> frame = pcr_frame(m, {"x": NeuronSet([(1, 3)])}, {"x": [f]}, {"x": [g]})
    >>> sorted(frame.kind.unique()), sorted(frame.action.unique())
    (['related', 'unrelated'], ['boost', 'suppress'])
    """
    missing = [g for g in sets if g not in related or g not in unrelated]
    if missing:
        raise ControlError(f"group(s) {missing} have a neuron set but no related or unrelated facts")
    for neurons in sets.values():
        neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    uses: dict[str, dict[str, list[tuple[str, str, str]]]] = {}  # target -> prompt -> (group, kind, fact)
    for group in sets:
        for kind, pool in (("related", related[group]), ("unrelated", unrelated[group])):
            for f in pool:
                for prompt in f.prompts:
                    uses.setdefault(f.target, {}).setdefault(prompt, []).append((group, kind, f.name or f.prompts[0]))
    if not uses:
        raise ControlError("no related or unrelated facts to measure the sets on")
    records = []
    for target, by_prompt in uses.items():
        groups = list(dict.fromkeys(g for users in by_prompt.values() for g, _, _ in users))
        q = encode(model, list(by_prompt), target)
        probs = scaled_probs(model, q, [sets[g] for g in groups], list(actions.values()), engine=engine,
                             batch_size=batch_size)
        before, after = per_prompt(probs.clean, q), per_prompt(probs.after, q)  # [prompt], [action, set, prompt]
        for i, (prompt, users) in enumerate(by_prompt.items()):
            b = float(before[i])
            for group, kind, fact in users:
                for k, action in enumerate(actions):
                    a = float(after[k, groups.index(group), i])
                    records.append({"group": group, "kind": kind, "fact": fact, "prompt": prompt, "action": action,
                                    "n_neurons": len(sets[group]), "p_before": b, "p_after": a,
                                    "dp_percent": 100.0 * (a - b) / b if b > 0 else float("nan"),
                                    "engine": probs.engine})
    return pd.DataFrame.from_records(records)


def pcr_table(frame: pd.DataFrame, by: Sequence[str] = ("action",)) -> pd.DataFrame:
    """Δp% on related and unrelated prompts and their PCR, per ``by`` (e.g. ``("method", "action")``).

    >>> f = pd.DataFrame({"action": ["boost"] * 4, "kind": ["related", "related", "unrelated", "unrelated"],
    ...                   "dp_percent": [30.0, 10.0, 2.0, -6.0]})
    >>> pcr_table(f)[["action", "related_dp", "unrelated_dp", "pcr"]].values.tolist()
    [['boost', 20.0, -2.0, 10.0]]
    """
    rows = []
    for key, part in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rel = part.loc[part.kind == "related", "dp_percent"]
        unr = part.loc[part.kind == "unrelated", "dp_percent"]
        rows.append({**dict(zip(by, key)), "related_dp": float(rel.mean()), "unrelated_dp": float(unr.mean()),
                     "n_related": len(rel), "n_unrelated": len(unr), "pcr": pcr(rel, unr)})
    return pd.DataFrame(rows)
