"""Suppress a neuron set and measure what moves, against random sets that are not null by construction: the
probability of each word class and of each prompt's grammatical and ungrammatical token, and how often the top
prediction or the preferred number flips (docs/methods.md, syntax and the KN thesis critique).

:func:`suppression_frame` reads, for every prompt, the next-token distribution clean and with the set zeroed at
the last position (:func:`~knlens.methods.readout.readout`), and with ``n_random`` random sets of each control:
``uniform`` (the same number of neurons in the same layers, :func:`~knlens.methods.controls.random_control`) and
``matched`` (also in the same quantile bin of activation magnitude, :func:`~knlens.methods.controls.matched_control`).
Random sets move real neurons, so their effects are measured, not assumed zero.

:func:`effect_tests` then asks, per quantity, whether the change is significant: a one-sample t-test of the
per-prompt change (p < 0.05) **and** paired t-tests of the per-prompt change against the mean change of each
control's random sets (p < 0.05 for both); the empirical p (share of random sets whose mean change is at least as
large in the same direction, ≥ 1/(1 + n_random)) is reported beside them.

>>> import pandas as pd
>>> f = pd.DataFrame({"item": [0, 1, 0, 1], "set": ["knowledge"] * 2 + ["uniform"] * 2, "draw": [-1, -1, 0, 0],
...                   "p_x_before": [0.5, 0.4, 0.5, 0.4], "p_x_after": [0.1, 0.1, 0.5, 0.41]})
>>> round(effect_tests(f, "x", controls=("uniform",))["relative"], 3)
-0.778
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode, stack
from knlens.methods.controls import matched_control, random_control
from knlens.methods.readout import readout
from knlens.stats.tests import empirical_floor

__all__ = ["Prompt", "suppression_frame", "effect_tests", "flip_rates", "CONTROLS"]

CONTROLS = ("uniform", "matched")
ALPHA = 0.05


class Prompt(NamedTuple):
    """A prompt to read: its ``name``, the ``context`` it belongs to (e.g. its grammatical number), and the
    single-token ``good`` (expected) and ``bad`` (alternative, or None) continuations."""

    name: str
    context: str
    prompt: str
    good: str
    bad: str | None = None


def _sets(neurons: NeuronSet, magnitude: Tensor, d_mlp: int, n_random: int, seed: int
          ) -> list[tuple[NeuronSet, str, int]]:
    sets = [(neurons, "knowledge", -1)]
    sets += [(random_control(neurons, d_mlp, seed=seed + d), "uniform", d) for d in range(n_random)]
    sets += [(matched_control(neurons, magnitude, seed=seed + 500 + d), "matched", d) for d in range(n_random)]
    return sets


def suppression_frame(model: Any, prompts: Sequence[Prompt], neurons: NeuronSet, classes: Mapping[str, Sequence[int]],
                      magnitude: Float[Tensor, "layer d"], *, n_random: int = 10, seed: int = 0,
                      batch_size: int = 64) -> pd.DataFrame:
    """One row per (prompt, set, draw): ``p_<q>_before`` / ``p_<q>_after`` for every class ``q`` of ``classes``
    (summed over its token ids) and for ``good`` and ``bad``; the top token before and after (``top_before``,
    ``top_after``). ``magnitude`` (|activation| per neuron) bins the matched control."""
    q = stack([encode(model, [p.prompt], p.good, multi_token="error") for p in prompts])
    class_ids = [int(t) for ids in classes.values() for t in ids]
    own = torch.tensor([[int(q.target[i]), int(encode(model, [p.prompt], p.bad or p.good, multi_token="error").target[0])]
                        for i, p in enumerate(prompts)])
    tokens = torch.cat([torch.tensor(class_ids, dtype=torch.long).expand(len(prompts), -1), own], dim=1)
    sets = _sets(neurons, magnitude, model.cfg.d_mlp, n_random, seed)
    r = readout(model, q, [s for s, _, _ in sets], tokens, batch_size=batch_size)
    bounds = np.cumsum([0] + [len(v) for v in classes.values()])

    def probs(logp: Tensor) -> dict[str, np.ndarray]:
        out = {f"p_{c}": logp[:, a:b].exp().sum(1).numpy() for c, a, b in zip(classes, bounds[:-1], bounds[1:])}
        out["p_good"] = logp[:, -2].exp().numpy()
        if all(p.bad is not None for p in prompts):
            out["p_bad"] = logp[:, -1].exp().numpy()
        return out

    before = probs(r.clean)
    frames = []
    for k, (s, kind, draw) in enumerate(sets):
        after = probs(r.after[k])
        frames.append(pd.DataFrame({"item": [p.name for p in prompts], "context": [p.context for p in prompts],
                                    "set": kind, "draw": draw, "n_neurons": len(s),
                                    **{f"{c}_before": v for c, v in before.items()},
                                    **{f"{c}_after": v for c, v in after.items()},
                                    "top_before": r.argmax_clean.numpy(), "top_after": r.argmax_after[k].numpy()}))
    return pd.concat(frames, ignore_index=True)


def _ttest(x: np.ndarray) -> float:
    """Two-sided one-sample t-test of mean(x) = 0 (NaN with fewer than 2 values or no spread)."""
    x = x[np.isfinite(x)]
    if len(x) < 2 or np.allclose(x, x[0]):
        return float("nan") if len(x) < 2 or x[0] != 0 else 1.0
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def effect_tests(frame: pd.DataFrame, quantity: str, *, controls: Sequence[str] = CONTROLS) -> dict[str, Any]:
    """The knowledge set's change of ``p_<quantity>`` over the frame's prompts, and its tests (module docstring)."""
    delta = frame[f"p_{quantity}_after"] - frame[f"p_{quantity}_before"]
    f = frame.assign(delta=delta)
    kn = f[f.set == "knowledge"].set_index("item")
    before = float(kn[f"p_{quantity}_before"].mean())
    change = float(kn.delta.mean())
    row: dict[str, Any] = {"quantity": quantity, "prompts": len(kn), "p_before": before,
                           "p_after": float(kn[f"p_{quantity}_after"].mean()), "change": change,
                           "relative": change / before if before > 0 else float("nan"),
                           "p_ttest": _ttest(kn.delta.to_numpy())}
    sign = 1.0 if change >= 0 else -1.0
    significant = row["p_ttest"] < ALPHA
    for control in controls:
        rnd = f[f.set == control]
        per_item = rnd.groupby("item").delta.mean().reindex(kn.index)
        per_draw = rnd.groupby("draw").delta.mean().to_numpy()
        row[f"{control}_change"] = float(per_item.mean())
        row[f"p_vs_{control}"] = _ttest((kn.delta - per_item).to_numpy())
        row[f"p_empirical_{control}"] = float((1 + (sign * per_draw >= sign * change).sum()) / (1 + len(per_draw)))
        significant &= row[f"p_vs_{control}"] < ALPHA
    row["p_empirical_floor"] = empirical_floor(int(f[f.set == controls[0]].draw.nunique())) if controls else np.nan
    row["significant"] = bool(significant)
    return row


def flip_rates(frame: pd.DataFrame, pairs: Sequence[tuple[str, str]] = (("singular", "plural"), ("good", "bad"))
               ) -> pd.DataFrame:
    """Per set kind: the share of prompts whose top token changed, and for each pair (a, b) of quantities the share
    whose preference (p_a > p_b) flipped; random sets averaged over their draws."""
    f = frame.assign(top=frame.top_before != frame.top_after)
    cols = {"top prediction changed": "top"}
    for a, b in pairs:
        if f"p_{a}_before" in f and f"p_{b}_before" in f:
            name = f"{a} vs {b} flipped"
            f[name] = (f[f"p_{a}_before"] > f[f"p_{b}_before"]) != (f[f"p_{a}_after"] > f[f"p_{b}_after"])
            cols[name] = name
    per_draw = f.groupby(["set", "draw"], sort=False)[list(cols.values())].mean()
    out = per_draw.groupby("set", sort=False).mean().reset_index().rename(columns={v: k for k, v in cols.items()})
    return out
