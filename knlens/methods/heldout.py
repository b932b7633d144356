"""Held-out paraphrase evaluation: neurons selected on some prompts, their effect measured on another.

Selecting neurons and measuring their effect on the same prompts flatters them (the neurons were chosen
because they matter for those prompts). :func:`held_out` leaves each prompt out in turn: the neurons are
refined on the other ``n − 1`` prompts (same preset, same ``p`` adaptation; the ``fallback_k`` best by mean
score when refinement keeps nothing) and suppressed / enhanced on the held-out prompt only, beside the
same random controls as the in-sample measurement.

Why leave-one-out and not a half split: the ``dai`` preset keeps neurons coarse in ≥ ``max(0.7·n, 3)``
prompts, so a fact with 4 prompts split 2 / 2 could never refine a neuron (3 > 2). With ``n − 1 = 3``
selection prompts it demands all 3, whatever ``p`` adaptation does. :attr:`HeldOut.note` says this in
words for the fact at hand. The integrated-gradients scores are per prompt, so no attribution is recomputed.

>>> from knlens import load_model, Fact, attribute
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is", "the capital city of france is", "france capital city is",
...              "the city of paris is the capital of"], " paris")
>>> ho = held_out(model, fact, attribute(model, fact, steps=2), "eleuther", n_random=2)
>>> len(ho.folds), sorted(ho.interventions.frame["fact"].unique())
(4, ['fold0', 'fold1', 'fold2', 'fold3'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from knlens.methods.attribution.result import Attribution
from knlens.methods.controls import CONTROLS
from knlens.core.errors import ControlError
from knlens.core.facts import Fact
from knlens.methods.interventions import InterventionResult, measure
from knlens.results.contract import Result
from knlens.run.engine import Engine
from knlens.core.neurons import NeuronSet
from knlens.methods.selection import SelectionPreset, best_by_mean, get_preset, refinement

__all__ = ["HeldOut", "HeldOutSettings", "held_out", "MIN_PROMPTS_DEFAULT_ON"]

MIN_PROMPTS_DEFAULT_ON = 4  # locate runs the held-out evaluation by default from this many prompts on


@dataclass(frozen=True)
class HeldOutSettings:
    """The selection each fold repeated: the preset (its name, or ``(custom)``), the fallback size and the
    fact's number of prompts (= folds). The measurement's settings are ``interventions.settings``."""

    preset: str = "dai"
    fallback_k: int = 3
    n_prompts: int = 0


@dataclass(frozen=True, eq=False)
class HeldOut(Result):
    """Leave-one-prompt-out selection and measurement.

    ``folds``: one row per held-out prompt — ``fold, held_out`` (the prompt), ``n_selection`` (prompts the
    neurons were refined on), ``p`` (the preset's share after adaptation), ``min_prompts`` (prompts a
    neuron had to be coarse in), ``refined`` (neurons refined), ``fallback`` (refinement kept nothing and the
    best by mean score were tested), ``neurons`` (tested, as text), ``n_neurons``, ``jaccard_all`` (overlap
    with the set refined on all prompts). ``interventions``: one fact ``fold{k}`` per fold, its prompt the
    held-out one. ``note``: the split and its consequence in words.
    """

    study = "heldout"

    folds: pd.DataFrame
    interventions: InterventionResult
    note: str
    settings: HeldOutSettings = HeldOutSettings()

    def to_frame(self) -> pd.DataFrame:
        """The folds, one row per held-out prompt."""
        return self.folds.copy()

    def effects(self) -> pd.DataFrame:
        """The held-out interventions per action and set (see :meth:`InterventionResult.effects`)."""
        return self.interventions.effects()

    def plot(self) -> Any:
        """The held-out interventions' mean relative change per action and set."""
        return self.interventions.plot()


def _note(folds: pd.DataFrame, n: int, cfg: SelectionPreset, preset_name: str) -> str:
    k = n - 1
    need = sorted(set(folds["min_prompts"]))
    text = (f"leave one prompt out: {n} folds, each refines neurons on the other {k} prompts (preset "
            f"{preset_name}: coarse in >= {'/'.join(map(str, need))} of {k}")
    if not cfg.strict_count and cfg.min_count > k:
        text += f"; min_count {cfg.min_count} > {k} prompts: no neuron can be refined"
    elif not cfg.strict_count and cfg.min_count == k:
        text += f", i.e. every selection prompt: min_count {cfg.min_count} = {k} prompts, so adapting p cannot relax it"
    text += ") and measures them on the held-out prompt only"
    n_fb = int(folds["fallback"].sum())
    if n_fb:
        text += (f"; {n_fb} of {n} folds refined no neuron and tested the {int(folds['n_neurons'].max())} best by "
                 f"mean score instead")
    return text + "."


def held_out(model: Any, fact: Fact, attributions: Sequence[Attribution], preset: str | SelectionPreset = "dai",
             *, full: NeuronSet | None = None, fallback_k: int = 3, n_random: int = 20,
             controls: Sequence[str] = CONTROLS, n_bins: int = 10, seed: int = 0, hook_point: str = "hook_post",
             baseline: Float[Tensor, "layer d"] | None = None, batch_size: int = 64, engine: Engine = "fast") -> HeldOut:
    """Leave-one-prompt-out evaluation of ``fact``'s neurons from its per-prompt ``attributions``.

    ``full`` (the set refined on all prompts) is compared with each fold's set (``jaccard_all``). The other
    keywords go to :func:`knlens.measure` for the held-out prompts. Needs at least 2 prompts.
    """
    attrs = list(attributions)
    n = len(attrs)
    if n < 2 or n != len(fact.prompts):
        raise ControlError(f"held-out evaluation needs one attribution per prompt and at least 2 prompts; got "
                           f"{n} attributions for {len(fact.prompts)} prompts")
    cfg = get_preset(preset)
    preset_name = preset if isinstance(preset, str) else "(custom)"
    rows, facts, sets = [], [], []
    for k in range(n):
        selection = attrs[:k] + attrs[k + 1:]
        r = refinement([selection], cfg)
        refined = r.sets[0]
        tested = refined if len(refined) else best_by_mean(selection, fallback_k)
        rows.append({"fold": k, "held_out": fact.prompts[k], "n_selection": n - 1, "p": r.p,
                     "min_prompts": r.min_prompts[0], "refined": len(refined), "fallback": not len(refined),
                     "neurons": " ".join(map(str, tested)), "n_neurons": len(tested),
                     "jaccard_all": tested.jaccard(full) if full is not None else float("nan")})
        facts.append(Fact([fact.prompts[k]], fact.target, relation=fact.relation, name=f"fold{k}"))
        sets.append(tested)
    folds = pd.DataFrame(rows)
    iv = measure(model, facts, sets, n_random=n_random, controls=controls, n_bins=n_bins, seed=seed, hook_point=hook_point,
                 baseline=baseline, batch_size=batch_size, engine=engine)
    return HeldOut(folds, iv, _note(folds, n, cfg, preset_name), HeldOutSettings(preset_name, fallback_k, n))
