"""Consistency of knowledge neurons across paraphrases (Chen et al., ICLR 2025; docs/methods.md, consistency across paraphrases).

Per fact, one neuron set per paraphrase: the coarse neurons of that prompt (IG score ≥ ``threshold`` ×
the prompt's maximum, optionally only the ``top_k`` best). A fact's consistency is the mean pairwise
Jaccard index of these sets, and Niu et al.'s similarity of the paraphrases' attribution vectors.

Three questions about many facts (:class:`ConsistencyStudy`):

* *share of inconsistent facts* — facts whose score is below Otsu's threshold of the sample or a static
  0.3 (:meth:`ConsistencyStudy.summary`). This only counts; no test compares the two groups, since they
  are made by thresholding the very score one would test;
* *within- versus between-fact similarity* — are two paraphrases of one fact more alike than two prompts
  of different facts of the same relation written with different templates? One paired difference per
  fact, a sign-flip permutation test (:meth:`ConsistencyStudy.within_between_test`). If the neurons were
  a property of the relation or the template only, the difference would be zero;
* *bimodality* — is there a consistent and an inconsistent kind of fact at all? Silverman's test of
  unimodality on the facts' scores (:meth:`ConsistencyStudy.bimodality`).

>>> from knlens import NeuronSet
>>> a, b = NeuronSet([(0, 1), (0, 2)]), NeuronSet([(5, 5)])
>>> facts = tuple(FactConsistency(f"f{i}", (f"s{i} is a", f"s{i} was a"), " x", (s, s), 1.0, 1.0, (0.5, 0.5),
...                               relation="R", templates=("[X] is a", "[X] was a")) for i, s in enumerate([a, b]))
>>> ConsistencyStudy(facts).within_between("jaccard")[["fact", "within", "between"]].values.tolist()
[['f0', 1.0, 0.0], ['f1', 1.0, 0.0]]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from knlens.methods.attribution.result import Attribution
from knlens.methods.attribution.ig import attribute
from knlens.core.errors import FactError, PromptError, SettingsError
from knlens.core.neurons import NeuronSet
from knlens.methods.selection import coarse
from knlens.core.errors import InsufficientDataError
from knlens.stats.sets import abs_cosine, jaccard_consistency, niu_similarity
from knlens.stats.thresholds import bimodality, otsu_threshold
from knlens.results.contract import Result
from knlens.stats.tests import paired_permutation_test

if TYPE_CHECKING:  # pragma: no cover
    from knlens.core.facts import Fact

__all__ = ["STATIC_THRESHOLD", "SCORES", "per_prompt_neurons", "ConsistencySettings", "FactConsistency",
           "fact_consistency", "ConsistencyStudy", "consistency_study"]

STATIC_THRESHOLD = 0.3
SCORES = ("jaccard", "niu")


def per_prompt_neurons(attributions: Sequence[Attribution], *, threshold: float = 0.2, strict: bool = False,
                       top_k: int | None = None) -> list[NeuronSet]:
    """The neurons of each prompt: coarse (score ≥ ``threshold`` × max), best first, at most ``top_k``.

    >>> import torch
    >>> from knlens import load_model, attribute
    >>> attrs = attribute(load_model("tiny-gpt2"), ["the capital of france is"], " paris", steps=2)
    >>> len(per_prompt_neurons(attrs, top_k=3)[0]) <= 3
    True
    """
    out = []
    for a in attributions:
        s = coarse(a, threshold, strict=strict)
        out.append(NeuronSet(list(s)[:top_k]) if top_k is not None else s)
    return out


@dataclass(frozen=True)
class ConsistencySettings:
    """How the per-prompt neuron sets were made: the model, integrated-gradients ``steps``, coarse
    ``threshold`` (× the prompt's maximum; ``strict``: >), at most ``top_k`` neurons per prompt, and the
    other :func:`~knlens.attribute` keywords as text (``options``)."""

    model: str = "?"
    steps: int = 20
    threshold: float = 0.2
    strict: bool = False
    top_k: int | None = None
    per_prompt_set: str = "coarse"
    knlens_version: str = ""
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class FactConsistency(Result):
    """Per-paraphrase neuron sets of one fact, their consistency scores and the attributions' checks.

    ``templates``: each prompt with the subject replaced by ``[X]`` (the prompt itself without a subject);
    ``completeness``: each prompt's relative completeness error of integrated gradients; ``vectors``: the
    prompts' attribution scores (saved with the result; None when not known).
    """

    study = "fact_consistency"

    name: str
    prompts: tuple[str, ...]
    target: str
    sets: tuple[NeuronSet, ...]
    jaccard: float
    niu: float
    p_clean: tuple[float, ...]
    relation: str | None = None
    templates: tuple[str, ...] = ()
    completeness: tuple[float, ...] = ()
    vectors: Float[Tensor, "prompt layer neuron"] | None = None
    settings: ConsistencySettings = ConsistencySettings()

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: ``prompt, template, n_neurons, p_clean, completeness_error``."""
        n = len(self.prompts)
        return pd.DataFrame({"prompt": list(self.prompts), "template": list(self.templates or self.prompts),
                             "n_neurons": [len(s) for s in self.sets], "p_clean": list(self.p_clean),
                             "completeness_error": list(self.completeness or (float("nan"),) * n)})

    def plot(self) -> Any:
        """The Jaccard index of every pair of prompts' neuron sets."""
        import matplotlib.pyplot as plt

        n = len(self.sets)
        m = np.array([[self.sets[i].jaccard(self.sets[j]) for j in range(n)] for i in range(n)])
        fig, ax = plt.subplots(figsize=(0.5 * n + 2.5, 0.5 * n + 2))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("prompt")
        ax.set_ylabel("prompt")
        ax.set_title(f"{self.name}: mean Jaccard {self.jaccard:.2f}", fontsize=9)
        fig.colorbar(im, ax=ax, label="Jaccard")
        return fig


def fact_consistency(model: Any, fact: Fact, *, attributions: Sequence[Attribution] | None = None,
                     steps: int = 20, threshold: float = 0.2, strict: bool = False, top_k: int | None = None,
                     batch_size: int = 64, **attribute_kw: Any) -> FactConsistency:
    """Attribute every paraphrase of ``fact`` (or reuse ``attributions``) and score the consistency.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-llama")
    >>> fc = fact_consistency(model, Fact(["the capital of france is", "the capital city of france is"],
    ...                                   " paris", subject="france"), steps=4)
    >>> 0.0 <= fc.jaccard <= 1.0 and len(fc.sets) == 2, fc.templates[0]
    (True, 'the capital of [X] is')
    """
    if len(fact.prompts) < 2:
        raise PromptError(f"fact {fact.name or fact.target!r} has {len(fact.prompts)} prompt(s); consistency "
                          f"needs at least two paraphrases")
    attrs = list(attributions) if attributions is not None else attribute(
        model, fact, steps=steps, batch_size=batch_size, **attribute_kw)
    sets = per_prompt_neurons(attrs, threshold=threshold, strict=strict, top_k=top_k)
    vec = torch.stack([a.scores.detach().float() for a in attrs])
    templates = tuple(p.replace(fact.subject, "[X]") if fact.subject else p for p in fact.prompts)
    a0 = attrs[0].settings
    settings = ConsistencySettings(a0.model, a0.steps, float(threshold), strict, top_k, "coarse", a0.knlens_version,
                                   {k: str(v) for k, v in attribute_kw.items()})
    return FactConsistency(fact.name or f"{fact.prompts[0]} →{fact.target}", tuple(fact.prompts), fact.target,
                           tuple(sets), float(jaccard_consistency(sets)), float(niu_similarity(vec)),
                           tuple(float(a.clean_value) for a in attrs), fact.relation, templates,
                           tuple(float(a.relative_completeness_error) for a in attrs), vec, settings)


@dataclass(frozen=True, eq=False)
class ConsistencyStudy(Result):
    """Consistency of many facts: their split into consistent (K_I) and inconsistent (K_II) facts, the
    within- versus between-fact test and the bimodality check (see the module docstring).

    A fact is *consistent* when its score is ≥ the threshold. Thresholds: Otsu's (computed on the
    sample of scores) and a static one (0.3), for both scores (``jaccard`` and ``niu``). Saved with the
    facts' attribution vectors, so a loaded study answers every question a computed one does.
    """

    study = "consistency"

    facts: tuple[FactConsistency, ...]
    static_threshold: float = STATIC_THRESHOLD
    settings: ConsistencySettings = ConsistencySettings()

    def thresholds(self) -> dict[tuple[str, str], float]:
        """Otsu's threshold of each score (NaN with fewer than two facts) and the static one."""
        def otsu(score: str) -> float:
            return otsu_threshold([getattr(f, score) for f in self.facts]) if len(self.facts) >= 2 else float("nan")
        return {**{(s, "otsu"): otsu(s) for s in SCORES},
                **{(s, "static"): self.static_threshold for s in SCORES}}

    def to_frame(self) -> pd.DataFrame:
        """One row per fact: scores, set sizes, completeness and the consistent flags under every threshold."""
        th = self.thresholds()
        rows = []
        for f in self.facts:
            r = {"fact": f.name, "relation": f.relation, "n_prompts": len(f.prompts),
                 "mean_neurons": float(np.mean([len(s) for s in f.sets])),
                 "union_neurons": len(NeuronSet.union(f.sets)),
                 "intersection_neurons": len(NeuronSet.intersection(f.sets)),
                 "jaccard": f.jaccard, "niu": f.niu, "mean_p_clean": float(np.mean(f.p_clean)),
                 "max_completeness_error": max(f.completeness) if f.completeness else float("nan")}
            for (score, kind), t in th.items():
                r[f"consistent_{score}_{kind}"] = bool(getattr(f, score) >= t)
            rows.append(r)
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Per (score, threshold): the threshold, the number of consistent / inconsistent facts and the share
        of inconsistent ones. Counts only: the groups are made from the score itself."""
        frame = self.to_frame()
        rows = []
        for (score, kind), t in self.thresholds().items():
            flag = frame[f"consistent_{score}_{kind}"]
            rows.append({"score": score, "threshold": kind, "value": t, "n_facts": len(frame),
                         "n_consistent": int(flag.sum()), "n_inconsistent": int((~flag).sum()),
                         "share_inconsistent": float((~flag).mean())})
        return pd.DataFrame(rows)

    def pairs(self, score: str = "jaccard") -> pd.DataFrame:
        """Similarity of every pair of prompts of the same relation (facts without a relation form one group).

        ``kind``: ``within`` (two paraphrases of one fact), ``between`` (different facts, different
        templates), ``same_template`` (different facts, same template). ``score`` is ``jaccard`` (of the
        neuron sets) or ``niu`` (Niu's similarity of the two attribution vectors, i.e. their |cos|).
        """
        if score not in SCORES:
            raise SettingsError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if score == "niu" and any(f.vectors is None for f in self.facts):
            raise InsufficientDataError("the niu score of prompt pairs needs every fact's attribution vectors, and some facts "
                              "have none (vectors=None): compute them with fact_consistency / consistency_study")
        names = [f.name for f in self.facts]
        if len(set(names)) != len(names):
            raise FactError("fact names must be unique to pair their prompts; rename the duplicated facts")
        rows = []
        groups: dict[str | None, list[FactConsistency]] = {}
        for f in self.facts:
            groups.setdefault(f.relation, []).append(f)
        for relation, facts in groups.items():
            units = [(fi, pi) for fi, f in enumerate(facts) for pi in range(len(f.prompts))]
            cos = abs_cosine(torch.cat([f.vectors for f in facts])) if score == "niu" else None
            for (u, (fa, pa)), (v, (fb, pb)) in itertools.combinations(enumerate(units), 2):
                a, b = facts[fa], facts[fb]
                kind = ("within" if fa == fb else
                        "same_template" if a.templates and a.templates[pa] == b.templates[pb] else "between")
                sim = a.sets[pa].jaccard(b.sets[pb]) if cos is None else float(cos[u, v])
                rows.append({"relation": relation, "fact_a": a.name, "prompt_a": pa, "fact_b": b.name,
                             "prompt_b": pb, "kind": kind, "similarity": sim})
        return pd.DataFrame(rows)

    def within_between(self, score: str = "jaccard") -> pd.DataFrame:
        """Per fact: mean similarity of its paraphrase pairs (``within``), of its prompts with other facts'
        prompts of different templates (``between``) and of the same template (``same_template``), and
        ``difference`` = within − between. Facts alone in their relation have no ``between`` (NaN)."""
        p = self.pairs(score)
        rows = []
        for f in self.facts:
            mine = p[(p.fact_a == f.name) | (p.fact_b == f.name)]
            mean = {k: float(mine.similarity[mine.kind == k].mean()) if (mine.kind == k).any() else float("nan")
                    for k in ("within", "between", "same_template")}
            rows.append({"fact": f.name, "relation": f.relation, **mean,
                         "difference": mean["within"] - mean["between"]})
        return pd.DataFrame(rows)

    def within_between_test(self, score: str = "jaccard", *, n_permutations: int = 10000,
                            seed: int = 0) -> dict[str, Any]:
        """Sign-flip permutation test of the facts' within − between differences (two-sided), with the means.

        ``share_positive``: share of facts whose paraphrases are more alike than prompts of other facts.
        """
        wb = self.within_between(score).dropna(subset=["difference"])
        if wb.empty:
            raise InsufficientDataError("no fact shares its relation with another fact: nothing to compare "
                                        "within-fact similarity with")
        test = paired_permutation_test(wb.difference.to_numpy(), n_permutations=n_permutations, seed=seed)
        return {"score": score, "within": float(wb.within.mean()), "between": float(wb.between.mean()),
                "same_template": float(wb.same_template.mean()), **test}

    def bimodality(self, score: str = "jaccard", *, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
        """Silverman's test of unimodality (:func:`knlens.stats.bimodality`) on the facts' scores."""
        if score not in SCORES:
            raise SettingsError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        return {"score": score, **bimodality([getattr(f, score) for f in self.facts], n_boot=n_boot, seed=seed)}

    def plot(self) -> Any:
        """Histograms of both scores with the Otsu and static thresholds."""
        import matplotlib.pyplot as plt

        frame, th = self.to_frame(), self.thresholds()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, score in zip(axes, SCORES):
            ax.hist(frame[score], bins=min(20, max(5, len(frame))), range=(0, 1), color="0.6")
            ax.axvline(th[(score, "otsu")], color="C3", label=f"Otsu {th[(score, 'otsu')]:.2f}")
            ax.axvline(th[(score, "static")], color="C0", ls="--", label=f"static {th[(score, 'static')]:.2f}")
            ax.set_xlabel({"jaccard": "mean pairwise Jaccard", "niu": "Niu similarity"}[score])
            ax.set_ylabel("facts")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def consistency_study(model: Any, facts: Sequence[Fact], *, steps: int = 20, threshold: float = 0.2,
                      top_k: int | None = None, static_threshold: float = STATIC_THRESHOLD,
                      batch_size: int = 64, progress: bool = False, **attribute_kw: Any) -> ConsistencyStudy:
    """:func:`fact_consistency` of every fact (≥ 2 prompts each), gathered in a :class:`ConsistencyStudy`.

    >>> from knlens import load_model, Fact
    >>> facts = [Fact(["the capital of france is", "the capital city of france is"], " paris"),
    ...          Fact(["the capital of germany is", "the capital city of germany is"], " berlin")]
    >>> consistency_study(load_model("tiny-llama"), facts, steps=2).summary().shape
    (4, 7)
    """
    it: Any = facts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(facts, desc="consistency")
    out = tuple(fact_consistency(model, f, steps=steps, threshold=threshold, top_k=top_k, batch_size=batch_size,
                                 **attribute_kw) for f in it)
    from knlens.core.versions import __version__
    settings = ConsistencySettings(getattr(model.cfg, "model_name", "?"), steps, float(threshold), False, top_k,
                                   "coarse", __version__, {k: str(v) for k, v in attribute_kw.items()})
    return ConsistencyStudy(out, static_threshold, settings)
