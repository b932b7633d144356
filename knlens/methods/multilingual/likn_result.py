"""``LanguageNeurons``: each fact's neurons in each language, split into language-independent and
language-specific ones, with their overlap statistics (docs/methods.md, language-independent neurons)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from knlens.core.errors import MissingTranslationError
from knlens.core.neurons import NeuronSet
from knlens.methods.attribution.result import Attribution
from knlens.results.contract import TableResult

__all__ = ["LanguageAttributions", "LanguageNeuronSettings", "LanguageNeurons"]


@dataclass(frozen=True, eq=False)
class LanguageAttributions:
    """The attributions of each fact's prompts in each language (``by_fact[key][language]``, one per prompt) and
    how they were computed: what LIKN and MATRICE select from."""

    facts: tuple[Any, ...]  # the MultilingualFacts attributed
    languages: tuple[str, ...]
    by_fact: dict[str, dict[str, list[Attribution]]]
    method: str
    steps: int
    grid: str
    hook_point: str = "hook_post"
    model: str = ""

    def of(self, key: str, language: str) -> list[Attribution]:
        """The attributions of fact ``key``'s prompts in ``language``."""
        if key not in self.by_fact or language not in self.by_fact[key]:
            raise MissingTranslationError(f"no attributions of fact {key!r} in {language!r}")
        return self.by_fact[key][language]


@dataclass(frozen=True)
class LanguageNeuronSettings:
    """How the per-language neurons were found: the attribution (``"amig/authors"``, ``"amig/textbook"`` or
    ``"integrated_gradients"``), its steps and grid, the coarse ``threshold`` (× the prompt's top score) and the
    share ``p`` of a language's prompts a neuron must be coarse in (more than ``p·n``), the languages whose
    sets are intersected (``across``) and the hook point."""

    attribution: str = "amig/authors"
    steps: int = 20
    grid: str = "right"
    threshold: float = 0.3
    p: float = 0.5
    across: tuple[str, ...] = ()
    hook_point: str = "hook_post"
    model: str = ""


@dataclass(frozen=True, eq=False)
class LanguageNeurons(TableResult):
    """One row per (fact, language, neuron) in ``frame`` (columns ``fact, language, layer, neuron,
    independent``): the language's neurons, ``independent`` when the neuron is in the fact's set in every
    language of ``settings.across`` (the LIKN set). ``sizes`` has one row per (fact, language) with
    ``n_neurons, n_independent, n_specific`` (zero rows are kept: an empty set is a finding, not a gap)."""

    study = "language-neurons"

    frame: pd.DataFrame
    sizes: pd.DataFrame
    languages: tuple[str, ...] = ()
    settings: LanguageNeuronSettings = field(default_factory=LanguageNeuronSettings)

    @property
    def facts(self) -> list[str]:
        return list(dict.fromkeys(self.sizes["fact"]))

    def neurons(self, fact: str, language: str) -> NeuronSet:
        """The fact's neurons in ``language``."""
        self._check(fact, language)
        rows = self.frame[(self.frame.fact == fact) & (self.frame.language == language)]
        return NeuronSet(zip(rows.layer, rows.neuron))

    def independent(self, fact: str) -> NeuronSet:
        """The fact's language-independent neurons (LIKN): in its set in every language of ``settings.across``."""
        self._check(fact, self.languages[0])
        rows = self.frame[(self.frame.fact == fact) & (self.frame.language == self.languages[0]) & self.frame.independent]
        return NeuronSet(zip(rows.layer, rows.neuron))

    def specific(self, fact: str, language: str) -> NeuronSet:
        """The fact's neurons in ``language`` that are not language-independent."""
        return self.neurons(fact, language) - self.independent(fact)

    def _check(self, fact: str, language: str) -> None:
        if language not in self.languages:
            raise MissingTranslationError(f"no neurons in {language!r}: the languages are {', '.join(self.languages)}")
        if fact not in set(self.sizes["fact"]):
            raise MissingTranslationError(f"no fact {fact!r} here; facts: {', '.join(self.facts[:5])} ...")

    def layer_stats(self) -> pd.DataFrame:
        """Per layer: ``independent`` (LIKN count over facts), and per language its neuron count and the share of
        them that are independent (``<lang>_neurons``, ``<lang>_share_independent``)."""
        f = self.frame
        out = f[f.language == self.languages[0]].groupby("layer")["independent"].sum().rename("independent")
        cols = [out]
        for lang in self.languages:
            mine = f[f.language == lang].groupby("layer")
            cols += [mine.size().rename(f"{lang}_neurons"), mine["independent"].mean().rename(f"{lang}_share_independent")]
        table = pd.concat(cols, axis=1).fillna({c.name: 0 for c in cols if not c.name.endswith("share_independent")})
        return table.sort_index().reset_index().rename(columns={"index": "layer"})

    def overlap(self) -> pd.DataFrame:
        """Per pair of languages: the mean over facts of the Jaccard similarity of their neuron sets (two empty
        sets count as 1), the mean intersection size, and the number of facts."""
        rows = []
        for a, b in itertools.combinations(self.languages, 2):
            sims, inter = [], []
            for fact in self.facts:
                x, y = self.neurons(fact, a), self.neurons(fact, b)
                sims.append(x.jaccard(y) if (x or y) else 1.0)
                inter.append(len(x & y))
            rows.append({"language_a": a, "language_b": b, "jaccard": sum(sims) / len(sims),
                         "intersection": sum(inter) / len(inter), "n_facts": len(sims)})
        return pd.DataFrame(rows, columns=["language_a", "language_b", "jaccard", "intersection", "n_facts"])

    def summary(self) -> pd.DataFrame:
        """Per language: mean neurons, independent and specific neurons per fact, and facts with no LIKN."""
        s = self.sizes
        g = s.groupby("language", sort=False)
        out = g[["n_neurons", "n_independent", "n_specific"]].mean()
        out["facts_without_independent"] = g["n_independent"].apply(lambda x: int((x == 0).sum()))
        out["n_facts"] = g.size()
        return out.reindex(list(self.languages)).reset_index()

    def plot(self, ax: Any = None) -> Any:
        """Language × layer heatmap of neuron counts (all facts), the LIKN count as the last row."""
        import matplotlib.pyplot as plt

        stats = self.layer_stats()
        rows = [stats[f"{l}_neurons"].to_numpy() for l in self.languages] + [stats["independent"].to_numpy()]
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(stats)), 0.4 * len(rows) + 1.2))
        im = ax.imshow(rows, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [*self.languages, "independent"])
        ax.set_xticks(range(len(stats)), stats["layer"].tolist())
        ax.set_xlabel("layer")
        ax.figure.colorbar(im, ax=ax, label="neurons (all facts)")
        ax.set_title(f"neurons per language and layer ({self.settings.attribution})")
        return ax.figure
