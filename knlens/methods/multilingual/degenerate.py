"""Degenerate neuron pairs per language, the pair version of Chen et al. (AAAI 2024; docs/methods.md,
degenerate pairs).

Per fact and language: the ``top`` (20) neurons by mean attribution over the language's prompts; each is
suppressed alone (set to 0 at the target position, :func:`~knlens.methods.interventions.intervene`), and the
*candidates* are those whose suppression lowers P by less than ``single_max`` (20 %); every pair of candidates
is suppressed together, and a pair is **degenerate** when that lowers P by more than ``pair_min`` (25 %):
each neuron can stand in for the other. P is the mean over the language's prompts of P(whole target | prompt)
(teacher forced: the product over the target's tokens); a drop is ``1 − P_suppressed / P_clean``.

>>> import pandas as pd
>>> effects = pd.DataFrame({"drop_a": [0.1, 0.1, 0.3], "drop_b": [0.05, 0.1, 0.0], "drop_pair": [0.4, 0.2, 0.9]})
>>> degenerate_rule(effects)["degenerate"].tolist()
[True, False, False]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from knlens.core.errors import SettingsError
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.data.multilingual import MultilingualFact
from knlens.methods.interventions import intervene, per_prompt
from knlens.methods.multilingual.likn_result import LanguageAttributions
from knlens.methods.selection import best_by_mean
from knlens.results.contract import TableResult
from knlens.run.engine import Engine

__all__ = ["degenerate_rule", "degenerate_pairs", "DegeneratePairs", "DegenerateSettings", "SINGLE_MAX", "PAIR_MIN"]

SINGLE_MAX, PAIR_MIN = 0.2, 0.25  # AAAI code: single suppression < 20 %, pair suppression > 25 %


def degenerate_rule(effects: pd.DataFrame, *, single_max: float = SINGLE_MAX, pair_min: float = PAIR_MIN) -> pd.DataFrame:
    """``effects`` (columns ``drop_a``, ``drop_b``, ``drop_pair``: relative drops of P) with ``degenerate``:
    both single drops below ``single_max`` and the pair's above ``pair_min``."""
    single = (effects["drop_a"] < single_max) & (effects["drop_b"] < single_max)
    return effects.assign(degenerate=single & (effects["drop_pair"] > pair_min))


@dataclass(frozen=True)
class DegenerateSettings:
    """The rule's thresholds, the number of top neurons, the attribution they were ranked by, the engine."""

    top: int = 20
    single_max: float = SINGLE_MAX
    pair_min: float = PAIR_MIN
    attribution: str = ""
    engine: str = "reference"
    model: str = ""


@dataclass(frozen=True, eq=False)
class DegeneratePairs(TableResult):
    """``frame``: one row per candidate pair (fact, language, ``neuron_a``, ``neuron_b`` as ``"L3.N57"``,
    ``drop_a``, ``drop_b``, ``drop_pair``, ``degenerate``); ``singles``: every top neuron's single drop with
    ``candidate``; ``clean``: P per (fact, language) before any suppression."""

    study = "degenerate-pairs"

    frame: pd.DataFrame
    singles: pd.DataFrame
    clean: pd.DataFrame
    languages: tuple[str, ...] = ()
    settings: DegenerateSettings = field(default_factory=DegenerateSettings)

    def summary(self) -> pd.DataFrame:
        """Per language: facts, mean candidates per fact, pairs tested, degenerate pairs, facts with at least
        one degenerate pair."""
        rows = []
        for lang in self.languages:
            s, p = self.singles[self.singles.language == lang], self.frame[self.frame.language == lang]
            n = s["fact"].nunique()
            rows.append({"language": lang, "n_facts": n,
                         "candidates_per_fact": float(s["candidate"].sum() / n) if n else float("nan"),
                         "pairs_tested": len(p), "degenerate_pairs": int(p["degenerate"].sum()),
                         "facts_with_degenerate": int(p[p.degenerate]["fact"].nunique())})
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """Degenerate pairs per fact, per language."""
        import matplotlib.pyplot as plt

        s = self.summary()
        fig, ax = plt.subplots(figsize=(max(3.0, 0.6 * len(s)), 2.6))
        ax.bar(s["language"], s["degenerate_pairs"] / s["n_facts"].clip(lower=1))
        ax.set_ylabel("degenerate pairs per fact")
        ax.set_title(f"top {self.settings.top}: single < {self.settings.single_max:.0%}, pair > "
                     f"{self.settings.pair_min:.0%}", fontsize=9)
        fig.tight_layout()
        return fig


def _drops(model: Any, q: Any, sets: list[NeuronSet], clean: float, engine: Engine, batch_size: int) -> list[float]:
    if not sets:
        return []
    p = per_prompt(intervene(model, q, sets, 0.0, engine=engine, batch_size=batch_size).cpu(), q).mean(-1)
    return (1.0 - p / clean).tolist()


def degenerate_pairs(model: Any, facts: Sequence[MultilingualFact], attributions: LanguageAttributions, *,
                     languages: Sequence[str] | None = None, top: int = 20, single_max: float = SINGLE_MAX,
                     pair_min: float = PAIR_MIN, engine: Engine = "reference", batch_size: int = 64) -> DegeneratePairs:
    """The degenerate pairs of each fact in each language (see the module docstring), ranking neurons by
    ``attributions`` (:func:`~knlens.methods.multilingual.likn.attribute_languages`)."""
    if top < 2:
        raise SettingsError(f"top must be at least 2 (pairs are drawn from the top neurons), got {top}")
    if not 0.0 < single_max <= 1.0 or not 0.0 < pair_min <= 1.0:
        raise SettingsError(f"single_max and pair_min must be in (0, 1], got {single_max}, {pair_min}")
    langs = tuple(languages or attributions.languages)
    singles, pairs, cleans = [], [], []
    for m in facts:
        for lang in langs:
            fact = m[lang]
            ranked = list(best_by_mean(attributions.of(m.key, lang), top))
            q = encode(model, list(fact.prompts), fact.target)
            clean = float(per_prompt(intervene(model, q, [NeuronSet()], 0.0, engine=engine,
                                               batch_size=batch_size).cpu(), q).mean())
            cleans.append({"fact": m.key, "language": lang, "p_clean": clean})
            drops = dict(zip(ranked, _drops(model, q, [NeuronSet([n]) for n in ranked], clean, engine, batch_size)))
            singles += [{"fact": m.key, "language": lang, "rank": r, "layer": n.layer, "neuron": n.index,
                         "drop": drops[n], "candidate": drops[n] < single_max} for r, n in enumerate(ranked)]
            both = list(itertools.combinations([n for n in ranked if drops[n] < single_max], 2))
            pair_drops = _drops(model, q, [NeuronSet([a, b]) for a, b in both], clean, engine, batch_size)
            pairs += [{"fact": m.key, "language": lang, "neuron_a": str(a), "neuron_b": str(b), "drop_a": drops[a],
                       "drop_b": drops[b], "drop_pair": d} for (a, b), d in zip(both, pair_drops)]
    columns = ["fact", "language", "neuron_a", "neuron_b", "drop_a", "drop_b", "drop_pair"]
    frame = degenerate_rule(pd.DataFrame(pairs, columns=columns).astype(
        {"drop_a": "float64", "drop_b": "float64", "drop_pair": "float64"}), single_max=single_max, pair_min=pair_min)
    settings = DegenerateSettings(top=top, single_max=single_max, pair_min=pair_min, attribution=attributions.method,
                                  engine=engine, model=str(getattr(model.cfg, "model_name", "")))
    return DegeneratePairs(frame.astype({"degenerate": "bool"}),
                           pd.DataFrame(singles, columns=["fact", "language", "rank", "layer", "neuron", "drop",
                                                          "candidate"]),
                           pd.DataFrame(cleans, columns=["fact", "language", "p_clean"]), langs, settings)
