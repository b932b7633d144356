"""Query localization (Chen et al., ICLR 2025; methods.md §4, §6, §9, §10): is a fact's set of knowledge
neurons a property of the fact, or of the query that asks for it?

Instruments, each one hook composition run in batch:

* **consistency of neurons across paraphrases** — per fact, one neuron set per paraphrase (the coarse
  neurons of that prompt: IG score ≥ ``threshold`` × the prompt's maximum, optionally only the ``top_k``
  best); consistency = mean pairwise Jaccard of those sets (:func:`jaccard_consistency`); and Niu et al.'s
  similarity of the paraphrases' attribution vectors (:func:`niu_similarity`). Facts are split into
  consistent (score ≥ threshold) and inconsistent ones by Otsu's threshold (:func:`otsu_threshold`) and by
  a static 0.3, with a Welch t-test between the groups (:func:`consistency_study`);
* **query-KN mapping** — suppress a query's own neurons, a paraphrase's neurons, or their intersection,
  and compare ΔP on the query (:func:`query_kn_mapping`);
* **consistency-aware selection** — neurons with a high mean and a low spread of normalised attribution
  across paraphrases (β₁·mean − β₂·std), compared with the query's own set and the union / intersection
  on reliability, generality and locality (:func:`consistency_aware_neurons`, :func:`compare_selections`);
* **attention versus MLP at the neuron level** — patch attention outputs at the last token from a
  paraphrase or a corrupted run and measure the neurons' activations and P(target)
  (:func:`attention_patch`); scale the attention weights on the most-attended positions ("knowledge
  synapses") by α, with least-attended positions as control (:func:`synapse_scaling`, :func:`scale_attention`);
* **entity versus relation** — causal traces with the corruption on the subject or on the relation
  tokens (:func:`entity_vs_relation`).

>>> import torch
>>> from knlens import NeuronSet
>>> jaccard_consistency([NeuronSet([(0, 1)]), NeuronSet([(0, 1)]), NeuronSet([(1, 2)])])  # (1 + 0 + 0) / 3
0.3333333333333333
>>> round(niu_similarity(torch.eye(3)), 6)
0.0
>>> otsu_threshold([0.1, 0.12, 0.15, 0.8, 0.82, 0.9]) == (0.15 + 0.8) / 2
True
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

from ..attribution import Attribution, attribute
from ..engine import target_probs
from ..errors import KnlensError, PromptError
from ..hooks import Hook, HookFn, hook_name, hooked
from ..interventions import intervene
from ..neurons import NeuronSet
from ..patching import (EMBED_HOOK, Corruption, Trace, _n_prefix, corruption_hook,
                        subject_token_span, trace)
from ..prompts import Queries, encode
from ..selection import coarse

if TYPE_CHECKING:  # pragma: no cover
    from ..facts import Fact

__all__ = [
    "jaccard_consistency", "niu_similarity", "otsu_threshold", "welch_test", "per_prompt_neurons",
    "FactConsistency", "fact_consistency", "ConsistencyStudy", "consistency_study", "query_kn_mapping",
    "mapping_summary", "consistency_aware_scores", "consistency_aware_neurons", "compare_selections",
    "AttentionPatch", "attention_patch", "scale_attention", "attended_positions", "synapse_scaling",
    "EntityRelation", "entity_vs_relation", "STATIC_THRESHOLD",
]

STATIC_THRESHOLD = 0.3
Vectors = Union[Float[Tensor, "n d"], Float[Tensor, "n layer neuron"], Sequence[Attribution]]


# ------------------------------------------------------------------------------------ scores & stats

def jaccard_consistency(sets: Sequence[NeuronSet]) -> float:
    """Mean pairwise Jaccard index of neuron sets (1 = all identical, 0 = pairwise disjoint).

    Two empty sets count as identical (Jaccard 1). Needs at least two sets.
    """
    if len(sets) < 2:
        raise ValueError(f"consistency needs at least two neuron sets, got {len(sets)}")
    pairs = list(itertools.combinations(sets, 2))
    return float(sum(a.jaccard(b) for a, b in pairs) / len(pairs))


def _matrix(vectors: Vectors) -> Tensor:
    if isinstance(vectors, Tensor):
        m = vectors.detach().float()
    else:
        m = torch.stack([a.scores.detach().float() for a in vectors])
    return m.reshape(m.shape[0], -1)


def niu_similarity(vectors: Vectors) -> float:
    """Niu et al.'s localisation similarity of n attribution vectors: (σ₁² − 1) / (n − 1).

    The rows of the ``n × (L·d_mlp)`` matrix are normalised to unit length and σ₁ is its largest singular
    value: 1 for identical (parallel) rows, 0 for mutually orthogonal rows. Zero rows stay zero.

    >>> import torch
    >>> niu_similarity(torch.ones(4, 10))
    1.0
    """
    m = _matrix(vectors).double()
    n = m.shape[0]
    if n < 2:
        raise ValueError(f"similarity needs at least two vectors, got {n}")
    norms = m.norm(dim=1, keepdim=True)
    m = torch.where(norms > 0, m / norms.clamp_min(1e-300), m)
    sigma1 = float(torch.linalg.matrix_norm(m, ord=2))
    return float(round((sigma1 ** 2 - 1.0) / (n - 1), 12))


def otsu_threshold(values: Sequence[float] | np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample: the cut between consecutive sorted values that maximises the
    between-class variance w₀·w₁·(μ₀ − μ₁)², returned as the midpoint of the cut (exact, no histogram).

    >>> otsu_threshold([0.0, 0.1, 1.0, 1.1])
    0.55
    """
    x = np.sort(np.asarray(values, dtype=float).ravel())
    x = x[np.isfinite(x)]
    if len(x) < 2:
        raise ValueError("Otsu's threshold needs at least two finite values")
    if x[0] == x[-1]:
        return float(x[0])
    n = len(x)
    csum = np.cumsum(x)
    k = np.arange(1, n)  # cut after k values
    cuts = x[k - 1] < x[k]  # only between distinct values
    w0, w1 = k / n, (n - k) / n
    mu0 = csum[k - 1] / k
    mu1 = (csum[-1] - csum[k - 1]) / (n - k)
    between = np.where(cuts, w0 * w1 * (mu0 - mu1) ** 2, -np.inf)
    i = int(np.argmax(between))
    return float((x[i] + x[i + 1]) / 2)


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's unequal-variance t-test (scipy); NaN statistics when a group has fewer than two values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out = {"n_a": len(a), "n_b": len(b), "mean_a": float(a.mean()) if len(a) else float("nan"),
           "mean_b": float(b.mean()) if len(b) else float("nan"), "t": float("nan"), "p": float("nan")}
    if len(a) >= 2 and len(b) >= 2 and (a.std() > 0 or b.std() > 0):
        res = stats.ttest_ind(a, b, equal_var=False)
        out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


# ---------------------------------------------------------------------------- consistency per fact

def per_prompt_neurons(attributions: Sequence[Attribution], *, threshold: float = 0.2, strict: bool = False,
                       top_k: int | None = None) -> list[NeuronSet]:
    """The neurons of each prompt: coarse (score ≥ ``threshold`` × max), best first, at most ``top_k``."""
    out = []
    for a in attributions:
        s = coarse(a, threshold, strict=strict)
        out.append(NeuronSet(list(s)[:top_k]) if top_k is not None else s)
    return out


@dataclass(frozen=True)
class FactConsistency:
    """Per-paraphrase neuron sets of one fact and their consistency scores."""

    name: str
    prompts: tuple[str, ...]
    target: str
    sets: tuple[NeuronSet, ...]
    jaccard: float
    niu: float
    p_clean: tuple[float, ...]
    vectors: Float[Tensor, "prompt layer neuron"] | None = None  # the attribution scores (kept for selection)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompts": list(self.prompts), "target": self.target,
                "sets": [json.loads(s.to_json()) for s in self.sets], "jaccard": self.jaccard,
                "niu": self.niu, "p_clean": list(self.p_clean)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FactConsistency:
        return cls(d["name"], tuple(d["prompts"]), d["target"],
                   tuple(NeuronSet.from_json(json.dumps(s)) for s in d["sets"]), d["jaccard"], d["niu"],
                   tuple(d["p_clean"]))


def fact_consistency(model: Any, fact: Fact, *, attributions: Sequence[Attribution] | None = None,
                     steps: int = 20, threshold: float = 0.2, strict: bool = False, top_k: int | None = None,
                     batch_size: int = 64, **attribute_kw: Any) -> FactConsistency:
    """Attribute every paraphrase of ``fact`` (or reuse ``attributions``) and score the consistency.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-llama")
    >>> fc = fact_consistency(model, Fact(["the capital of france is", "the capital city of france is"],
    ...                                   " paris"), steps=4)
    >>> 0.0 <= fc.jaccard <= 1.0 and len(fc.sets) == 2
    True
    """
    if len(fact.prompts) < 2:
        raise PromptError(f"fact {fact.name or fact.target!r} has {len(fact.prompts)} prompt(s); consistency "
                          f"needs at least two paraphrases")
    attrs = list(attributions) if attributions is not None else attribute(
        model, fact, steps=steps, batch_size=batch_size, **attribute_kw)
    sets = per_prompt_neurons(attrs, threshold=threshold, strict=strict, top_k=top_k)
    vec = torch.stack([a.scores.detach().float() for a in attrs])
    return FactConsistency(fact.name or f"{fact.prompts[0]} →{fact.target}", tuple(fact.prompts), fact.target,
                           tuple(sets), jaccard_consistency(sets), niu_similarity(vec),
                           tuple(float(a.clean_value) for a in attrs), vec)


@dataclass(frozen=True)
class ConsistencyStudy:
    """Consistency of many facts, their split into consistent (K_I) and inconsistent (K_II) facts.

    A fact is *consistent* when its score is ≥ the threshold. Thresholds: Otsu's (computed on the
    sample of scores) and a static one (0.3), for both scores (``jaccard`` and ``niu``).
    """

    facts: tuple[FactConsistency, ...]
    static_threshold: float = STATIC_THRESHOLD
    settings: dict[str, Any] = field(default_factory=dict)

    def thresholds(self) -> dict[tuple[str, str], float]:
        out = {}
        for score in ("jaccard", "niu"):
            vals = [getattr(f, score) for f in self.facts]
            out[(score, "otsu")] = otsu_threshold(vals) if len(vals) >= 2 else float("nan")
            out[(score, "static")] = self.static_threshold
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per fact: scores, mean set size and the consistent flags under every threshold."""
        th = self.thresholds()
        rows = []
        for f in self.facts:
            r = {"fact": f.name, "n_prompts": len(f.prompts), "mean_neurons": float(np.mean([len(s) for s in f.sets])),
                 "union_neurons": len(NeuronSet.union(f.sets)),
                 "intersection_neurons": len(NeuronSet.intersection(f.sets)),
                 "jaccard": f.jaccard, "niu": f.niu, "mean_p_clean": float(np.mean(f.p_clean))}
            for (score, kind), t in th.items():
                r[f"consistent_{score}_{kind}"] = bool(getattr(f, score) >= t)
            rows.append(r)
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Per (score, threshold): the threshold, group sizes, share of inconsistent facts and Welch tests.

        ``welch_t/p``: the score itself between the groups; ``cross_t/p``: the *other* score between the
        same groups (does the Jaccard split also separate Niu similarity, and vice versa?).
        """
        frame = self.to_frame()
        rows = []
        for (score, kind), t in self.thresholds().items():
            flag = frame[f"consistent_{score}_{kind}"]
            other = "niu" if score == "jaccard" else "jaccard"
            w = welch_test(frame.loc[flag, score], frame.loc[~flag, score])
            c = welch_test(frame.loc[flag, other], frame.loc[~flag, other])
            rows.append({"score": score, "threshold": kind, "value": t, "n_facts": len(frame),
                         "n_consistent": int(flag.sum()), "n_inconsistent": int((~flag).sum()),
                         "share_inconsistent": float((~flag).mean()) if len(frame) else float("nan"),
                         "welch_t": w["t"], "welch_p": w["p"], "cross_mean_consistent": c["mean_a"],
                         "cross_mean_inconsistent": c["mean_b"], "cross_t": c["t"], "cross_p": c["p"]})
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """Histograms of both scores with the Otsu and static thresholds."""
        import matplotlib.pyplot as plt

        frame, th = self.to_frame(), self.thresholds()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, score in zip(axes, ("jaccard", "niu")):
            ax.hist(frame[score], bins=min(20, max(5, len(frame))), range=(0, 1), color="0.6")
            ax.axvline(th[(score, "otsu")], color="C3", label=f"Otsu {th[(score, 'otsu')]:.2f}")
            ax.axvline(th[(score, "static")], color="C0", ls="--", label=f"static {th[(score, 'static')]:.2f}")
            ax.set_xlabel({"jaccard": "mean pairwise Jaccard", "niu": "Niu similarity"}[score])
            ax.set_ylabel("facts")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def save(self, path: str | Path) -> None:
        """JSON (facts with their neuron sets, settings)."""
        Path(path).write_text(json.dumps({"facts": [f.to_dict() for f in self.facts],
                                          "static_threshold": self.static_threshold,
                                          "settings": self.settings}, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> ConsistencyStudy:
        d = json.loads(Path(path).read_text())
        return cls(tuple(FactConsistency.from_dict(f) for f in d["facts"]), d["static_threshold"], d["settings"])


def consistency_study(model: Any, facts: Sequence[Fact], *, steps: int = 20, threshold: float = 0.2,
                      top_k: int | None = None, static_threshold: float = STATIC_THRESHOLD,
                      batch_size: int = 64, progress: bool = False, **attribute_kw: Any) -> ConsistencyStudy:
    """:func:`fact_consistency` of every fact (≥ 2 prompts each), gathered in a :class:`ConsistencyStudy`."""
    it: Any = facts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(facts, desc="consistency")
    out = tuple(fact_consistency(model, f, steps=steps, threshold=threshold, top_k=top_k, batch_size=batch_size,
                                 **attribute_kw) for f in it)
    from .. import __version__
    return ConsistencyStudy(out, static_threshold,
                            {"model": getattr(model.cfg, "model_name", "?"), "steps": steps, "threshold": threshold,
                             "top_k": top_k, "per_prompt_set": "coarse", "knlens_version": __version__,
                             **{k: str(v) for k, v in attribute_kw.items()}})


# ------------------------------------------------------------------------------- query-KN mapping

def _per_prompt(p: Tensor, q: Queries) -> Tensor:
    """Probability of each prompt: the product over its (teacher-forced) target-token rows."""
    out = torch.ones(p.shape[:-1] + (len(q.prompts),), dtype=p.dtype)
    for i in range(len(q.prompts)):
        out[..., i] = p[..., (q.prompt_index == i).cpu()].prod(-1)
    return out


def query_kn_mapping(model: Any, fact: Fact, sets: Sequence[NeuronSet], *, factor: float = 0.0,
                     batch_size: int = 64) -> pd.DataFrame:
    """Suppress (``factor=0``) on query i its own set S_i, each paraphrase's set S_j and S_i ∩ S_j.

    Returns one row per (query, neuron source): ``query, source, relation`` (``own``, ``paraphrase``,
    ``intersection``), ``n_neurons, p_before, p_after, change, relative`` (= change / p_before).
    All (set, prompt) pairs run as rows of one batch (:func:`knlens.interventions.intervene`).
    """
    n = len(fact.prompts)
    if len(sets) != n:
        raise ValueError(f"{len(sets)} neuron sets for {n} prompts: give one set per prompt")
    q = encode(model, list(fact.prompts), fact.target)
    pairs = list(itertools.permutations(range(n), 2))
    all_sets = [*sets, *[sets[i] & sets[j] for i, j in pairs]]
    before = _per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
    after = _per_prompt(intervene(model, q, all_sets, factor, batch_size=batch_size), q)  # [set, prompt]
    rows = []

    def rec(i: int, j: int, rel: str, s_idx: int) -> None:
        b, a = float(before[i]), float(after[s_idx, i])
        rows.append({"fact": fact.name, "query": i, "source": j, "relation": rel, "n_neurons": len(all_sets[s_idx]),
                     "p_before": b, "p_after": a, "change": a - b,
                     "relative": (a - b) / b if b > 0 else float("nan")})
    for i in range(n):
        rec(i, i, "own", i)
    for k, (i, j) in enumerate(pairs):
        rec(i, j, "paraphrase", j)
        rec(i, j, "intersection", n + k)
    return pd.DataFrame(rows)


def mapping_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean relative change, mean |set| and count per relation (own / paraphrase / intersection)."""
    g = frame.groupby("relation")
    return pd.DataFrame({"relative": g["relative"].mean(), "change": g["change"].mean(),
                         "n_neurons": g["n_neurons"].mean(), "n": g.size(),
                         "share_empty": g["n_neurons"].apply(lambda s: float((s == 0).mean()))}).reindex(
        ["own", "paraphrase", "intersection"]).dropna(how="all").reset_index()


# ------------------------------------------------------------------------ consistency-aware selection

def consistency_aware_scores(values: Vectors, *, beta1: float = 1.0, beta2: float = 1.0
                             ) -> Float[Tensor, "layer neuron"]:
    """β₁·mean − β₂·std across paraphrases of each neuron's normalised value.

    ``values`` are per-paraphrase attribution scores (``[n, layer, neuron]`` or Attributions); each
    paraphrase's values are divided by its largest absolute value first, so every paraphrase counts alike.
    """
    if isinstance(values, Tensor):
        v = values.detach().float()
    else:
        v = torch.stack([a.scores.detach().float() for a in values])
    if v.ndim != 3 or v.shape[0] < 2:
        raise ValueError(f"expected [paraphrase ≥ 2, layer, neuron] values, got shape {tuple(v.shape)}")
    peak = v.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None]
    v = v / peak
    return beta1 * v.mean(0) - beta2 * v.std(0, unbiased=False)


def consistency_aware_neurons(values: Vectors, k: int, *, beta1: float = 1.0, beta2: float = 1.0,
                              layers: Sequence[int] | None = None) -> NeuronSet:
    """The ``k`` neurons with the highest positive consistency-aware score, best first."""
    s = consistency_aware_scores(values, beta1=beta1, beta2=beta2)
    layer_ids = list(layers) if layers is not None else list(range(s.shape[0]))
    flat = s.flatten()
    order = flat.argsort(descending=True)[:k]
    keep = [int(i) for i in order if float(flat[i]) > 0]
    return NeuronSet((layer_ids[i // s.shape[1]], i % s.shape[1]) for i in keep)


def compare_selections(model: Any, fact: Fact, sets: Mapping[str, NeuronSet], *, query: int = 0,
                       others: Sequence[Fact] = (), factor: float = 0.0, batch_size: int = 64) -> pd.DataFrame:
    """Reliability, generality and locality of each neuron set under an intervention (default suppress).

    reliability: relative ΔP on the query ``fact.prompts[query]``; generality: mean relative ΔP on the
    fact's other prompts; locality: mean |relative ΔP| on the prompts of ``others`` (smaller is more local).
    For suppression a *more negative* reliability / generality means a stronger effect.
    """
    names = list(sets)
    q = encode(model, list(fact.prompts), fact.target)
    before = _per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
    after = _per_prompt(intervene(model, q, [sets[k] for k in names], factor, batch_size=batch_size), q)
    rel = (after - before) / before.clamp_min(1e-30)  # [set, prompt]
    other_prompts = [i for i in range(len(fact.prompts)) if i != query]
    loc = torch.zeros(len(names))
    n_loc = 0
    for o in others:
        qo = encode(model, list(o.prompts), o.target)
        bo = _per_prompt(target_probs(model, qo, batch_size=batch_size).cpu(), qo)
        ao = _per_prompt(intervene(model, qo, [sets[k] for k in names], factor, batch_size=batch_size), qo)
        loc += ((ao - bo) / bo.clamp_min(1e-30)).abs().sum(1)
        n_loc += len(o.prompts)
    rows = []
    for s_i, name in enumerate(names):
        rows.append({"fact": fact.name, "query": query, "set": name, "n_neurons": len(sets[name]),
                     "reliability": float(rel[s_i, query]),
                     "generality": float(rel[s_i, other_prompts].mean()) if other_prompts else float("nan"),
                     "locality": float(loc[s_i] / n_loc) if n_loc else float("nan")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------- attention versus MLP, neuron level

def _neuron_reads(neurons: NeuronSet, position: int, store: dict[int, list[Tensor]]) -> list[Hook]:
    hooks = []
    for layer, idx in sorted(neurons.by_layer().items()):
        ix = torch.tensor(idx)

        def save(act: Tensor, hook: Any = None, layer: int = layer, ix: Tensor = ix) -> None:
            store[layer].append(act[:, position, ix.to(act.device)].detach().float().cpu())
        hooks.append((hook_name(layer, "hook_post"), save))
    return hooks


def _gather(neurons: NeuronSet, store: dict[int, list[Tensor]]) -> Tensor:
    """``[batch, neuron]`` activations in the order of ``neurons``' by_layer listing."""
    by = sorted(neurons.by_layer().items())
    return torch.cat([store[layer][0] for layer, _ in by], dim=1) if by else torch.zeros(0, 0)


def _ordered(neurons: NeuronSet) -> list[tuple[int, int]]:
    return [(layer, i) for layer, idx in sorted(neurons.by_layer().items()) for i in idx]


def _read_run(model: Any, tokens: Tensor, position: int, target: int, neurons: NeuronSet,
              hooks: list[Hook]) -> tuple[Tensor, Tensor]:
    """P(target) ``[batch]`` and the neurons' activations ``[batch, neuron]`` at ``position``."""
    store: dict[int, list[Tensor]] = {layer: [] for layer in neurons.by_layer()}
    with hooked(model, [*hooks, *_neuron_reads(neurons, position, store)]):
        logits = model(tokens)
    p = logits[:, position].float().softmax(-1)[:, target].cpu()
    return p, _gather(neurons, store)


def _single(model: Any, prompt: str, target: str) -> tuple[Tensor, int, int]:
    row = encode(model, [prompt], target).row(0)
    return row.tokens, int(row.position[0]), int(row.target[0])


@dataclass(frozen=True)
class AttentionPatch:
    """Neuron activations and P(target) with attention outputs patched at the last token, per patched layer.

    ``frame``: one row per (patched, neuron) with ``act_clean, act_patched, change, relative``;
    ``probs``: one row per patched configuration with ``p_clean, p_patched``. ``patched`` is the layer
    number as a string, or ``"all"`` for every layer at once.
    """

    frame: pd.DataFrame
    probs: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.merge(self.probs, on="patched")

    def explained(self) -> pd.DataFrame:
        """Per patched configuration: mean relative change of the neurons' activations and of P."""
        g = self.frame.groupby("patched", sort=False)
        out = pd.DataFrame({"mean_relative_activation_change": g["relative"].mean(),
                            "mean_abs_relative_activation_change": g["relative"].apply(lambda s: s.abs().mean())})
        out = out.reset_index().merge(self.probs, on="patched")
        out["relative_p_change"] = (out.p_patched - out.p_clean) / out.p_clean
        return out

    def plot(self) -> Any:
        import matplotlib.pyplot as plt

        e = self.explained()
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(e)), 3))
        x = np.arange(len(e))
        ax.bar(x - 0.2, e["mean_relative_activation_change"], 0.4, label="neurons' activation")
        ax.bar(x + 0.2, e["relative_p_change"], 0.4, label="P(target)")
        ax.set_xticks(x, e["patched"], fontsize=8)
        ax.set_xlabel("attention output patched at layer")
        ax.set_ylabel("relative change")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _source_attention(model: Any, tokens: Tensor, position: int, layers: Sequence[int], point: str,
                      hooks: list[Hook]) -> dict[int, Tensor]:
    store: dict[int, Tensor] = {}
    saves = []
    for layer in layers:
        def save(act: Tensor, hook: Any = None, layer: int = layer) -> None:
            store[layer] = act[:, position].detach().float().mean(0)  # mean over noise samples
        saves.append((hook_name(layer, point), save))
    with hooked(model, [*hooks, *saves]):
        model(tokens)
    return store


@torch.no_grad()
def attention_patch(model: Any, prompt: str, target: str, neurons: NeuronSet, *,
                    source: str | Corruption, subject: str | None = None, layers: Sequence[int] | None = None,
                    point: Literal["hook_attn_out", "attn.hook_z"] = "hook_attn_out",
                    heads: Sequence[int] | None = None) -> AttentionPatch:
    """How much of the neurons' activation at the last token is carried by attention.

    The attention output at the last token of ``prompt`` (``hook_attn_out``, or ``attn.hook_z`` with
    ``heads`` to patch single heads) is replaced by its value in a *source* run: another prompt (a
    paraphrase; its own last token) or the same prompt under a :class:`~knlens.patching.Corruption` of
    ``subject``. Row "clean" is unpatched; one row per layer in ``layers`` (default: every layer up to
    the neurons' deepest layer), and row "all" patches all of them at once. Every row runs in one batch.

    >>> from knlens import load_model, NeuronSet
    >>> model = load_model("tiny-llama")
    >>> r = attention_patch(model, "the capital of france is", " paris", NeuronSet([(1, 3)]),
    ...                     source="the capital city of france is")
    >>> r.probs["patched"].tolist()
    ['0', '1', 'all']
    """
    if point not in ("hook_attn_out", "attn.hook_z"):
        raise ValueError("point must be 'hook_attn_out' or 'attn.hook_z'")
    if heads is not None and point != "attn.hook_z":
        raise ValueError("patching single heads needs point='attn.hook_z'")
    if not len(neurons):
        raise KnlensError("attention_patch needs at least one neuron")
    neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    tokens, pos, tgt = _single(model, prompt, target)
    deepest = max(neurons.layers)
    layer_list = list(range(deepest + 1)) if layers is None else sorted(int(l) for l in layers)
    if isinstance(source, Corruption):
        if subject is None:
            raise PromptError("a corrupted source needs the subject")
        span = subject_token_span(model, prompt, subject)
        positions = list(range(*span))
        vals = source.values(model, positions)
        k = source.samples
        chook = corruption_hook(source, vals, positions, torch.arange(k))
        src = _source_attention(model, tokens.expand(k, -1), pos, layer_list, point, [(EMBED_HOOK, chook)])
        src_desc: Any = source.describe(model)
    else:
        s_tokens, s_pos, s_tgt = _single(model, source, target)
        src = _source_attention(model, s_tokens, s_pos, layer_list, point, [])
        src_desc = source
    configs = [[l] for l in layer_list] + [layer_list]
    labels = [str(l) for l in layer_list] + ["all"]
    n_rows = 1 + len(configs)
    hooks = []
    for layer in layer_list:
        rows = torch.tensor([False] + [layer in c for c in configs])
        value = src[layer]

        def patch(act: Tensor, hook: Any = None, rows: Tensor = rows, value: Tensor = value) -> Tensor:
            out = act.clone()
            r = rows.to(act.device)
            v = value.to(act.device, act.dtype)
            if heads is None:
                out[r, pos] = v
            else:
                h = torch.tensor(list(heads), device=act.device)
                sub = out[r, pos]
                sub[:, h] = v[h]
                out[r, pos] = sub
            return out
        hooks.append((hook_name(layer, point), patch))
    p, acts = _read_run(model, tokens.expand(n_rows, -1), pos, tgt, neurons, hooks)
    order = _ordered(neurons)
    recs, prec = [], []
    for r, label in enumerate(labels, start=1):
        prec.append({"patched": label, "p_clean": float(p[0]), "p_patched": float(p[r])})
        for j, (layer, idx) in enumerate(order):
            a0, a1 = float(acts[0, j]), float(acts[r, j])
            recs.append({"patched": label, "layer": layer, "neuron": idx, "act_clean": a0, "act_patched": a1,
                         "change": a1 - a0, "relative": (a1 - a0) / abs(a0) if a0 != 0 else float("nan")})
    return AttentionPatch(pd.DataFrame(recs), pd.DataFrame(prec),
                          {"prompt": prompt, "target": target, "source": src_desc, "point": point,
                           "heads": list(heads) if heads is not None else None, "position": "last"})


def scale_attention(alpha: float | Float[Tensor, "batch"], keys: Bool[Tensor, "batch key"] | Sequence[int],
                    query: int = -1, heads: Sequence[int] | None = None) -> HookFn:
    """Hook for ``blocks.{l}.attn.hook_pattern``: multiply the attention weights from ``query`` to
    ``keys`` by α and renormalise the row to its original sum.

    ``alpha`` is a scalar or one value per batch row; ``keys`` positions (shared) or a ``[batch, key]``
    mask. With α = 1 the pattern is returned unchanged (bit for bit).

    >>> import torch
    >>> pat = torch.tensor([[[[0.5, 0.25, 0.25]]]])          # [batch, head, query, key]
    >>> [round(x, 4) for x in scale_attention(3.0, [1])(pat, None)[0, 0, 0].tolist()]   # renormalised
    [0.3333, 0.5, 0.1667]
    """
    def hook(act: Float[Tensor, "batch head q k"], hook: Any = None) -> Float[Tensor, "batch head q k"]:
        b, h, nq, nk = act.shape
        a = torch.as_tensor(alpha, dtype=act.dtype, device=act.device)
        a = a.expand(b) if a.ndim == 0 else a
        if isinstance(keys, Tensor) and keys.dtype == torch.bool:
            km = keys.to(act.device)
        else:
            km = torch.zeros(b, nk, dtype=torch.bool, device=act.device)
            km[:, [int(k) for k in keys]] = True
        hm = torch.ones(h, dtype=torch.bool, device=act.device)
        if heads is not None:
            hm = torch.zeros(h, dtype=torch.bool, device=act.device)
            hm[list(heads)] = True
        qi = query % nq
        row = act[:, :, qi, :]  # [b, h, k]
        sel = (km[:, None, :] & hm[None, :, None]).to(act.dtype)
        extra = (a - 1)[:, None, None] * row * sel  # exactly 0 where α = 1
        new_row = (row + extra) / (1 + extra.sum(-1, keepdim=True))
        out = act.clone()
        out[:, :, qi, :] = new_row
        return out
    return hook


def attended_positions(model: Any, prompt: str, *, k: int = 1, layers: Sequence[int] | None = None,
                       exclude_bos: bool = True) -> tuple[list[int], list[int]]:
    """The ``k`` positions the last token attends to most (mean over heads and ``layers``) and the ``k``
    it attends to least (the irrelevant-position control); BOS and the last token itself are excluded."""
    tokens = model.to_tokens(prompt)
    n = tokens.shape[1]
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    store: list[Tensor] = []
    saves = [(hook_name(l, "attn.hook_pattern"),
              lambda act, hook: store.append(act[0, :, -1].detach().float().mean(0))) for l in layer_list]
    with torch.no_grad(), hooked(model, saves):
        model(tokens)
    mean = torch.stack(store).mean(0)
    _, n_pre = _n_prefix(model, prompt)
    cand = [p for p in range(n_pre if exclude_bos else 0, n - 1)]
    if len(cand) < 2 * k:
        raise PromptError(f"{prompt!r} has {len(cand)} candidate positions; need {2 * k} for top and control")
    ranked = sorted(cand, key=lambda p: float(mean[p]), reverse=True)
    return sorted(ranked[:k]), sorted(ranked[-k:])


@torch.no_grad()
def synapse_scaling(model: Any, prompt: str, target: str, neurons: NeuronSet, *,
                    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0), k: int = 1,
                    layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Scale the last token's attention to its ``k`` most-attended positions ("knowledge synapses") and, as
    a control, to its ``k`` least-attended ones, by each α, in every layer of ``layers`` (default all).

    Returns one row per (group, α): ``group`` (``synapse``/``control``), ``alpha``, ``positions``,
    ``p_target``, ``relative_p`` and the mean relative change of the neurons' activations at the last
    token. All rows run as one batch.
    """
    tokens, pos, tgt = _single(model, prompt, target)
    top, low = attended_positions(model, prompt, k=k, layers=layers)
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    configs = [("synapse", a, top) for a in alphas] + [("control", a, low) for a in alphas]
    n_rows = 1 + len(configs)
    alpha_t = torch.tensor([1.0] + [a for _, a, _ in configs])
    km = torch.zeros(n_rows, tokens.shape[1], dtype=torch.bool)
    for r, (_, _, ps) in enumerate(configs, start=1):
        km[r, ps] = True
    hooks = [(hook_name(l, "attn.hook_pattern"), scale_attention(alpha_t, km, query=pos)) for l in layer_list]
    p, acts = _read_run(model, tokens.expand(n_rows, -1), pos, tgt, neurons, hooks)
    rows = []
    for r, (group, a, ps) in enumerate(configs, start=1):
        rel = ((acts[r] - acts[0]) / acts[0].abs().clamp_min(1e-12)) if acts.numel() else torch.zeros(0)
        rows.append({"group": group, "alpha": a, "positions": ps, "p_clean": float(p[0]), "p_target": float(p[r]),
                     "relative_p": float((p[r] - p[0]) / p[0]) if float(p[0]) > 0 else float("nan"),
                     "activation_relative": float(rel.mean()) if rel.numel() else float("nan"),
                     "activation_abs_relative": float(rel.abs().mean()) if rel.numel() else float("nan")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ entity vs relation

@dataclass(frozen=True)
class EntityRelation:
    """Causal traces of one prompt with the corruption on the subject and on the relation tokens."""

    subject: Trace
    relation: Trace

    def to_frame(self) -> pd.DataFrame:
        """Per (corrupted part, kind): total effect, peak indirect effect with its layer / token, and the
        mean indirect effect at the last token and at the (last) corrupted tokens."""
        rows = []
        for part, t in (("subject", self.subject), ("relation", self.relation)):
            last = len(t.tokens) - 1
            for kind, e in t.effects.items():
                i = int(e.argmax())
                rows.append({"corrupted": part, "kind": kind, "p_clean": t.p_clean, "p_corrupted": t.p_corrupted,
                             "total_effect": t.total_effect, "peak_effect": float(e.max()),
                             "peak_layer": i // e.shape[1], "peak_token": t.tokens[i % e.shape[1]],
                             "mean_last_token": float(e[:, last].mean()),
                             "mean_corrupted_tokens": float(e[:, list(t.corrupted)].mean())})
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        return self.subject.plot(), self.relation.plot()


def entity_vs_relation(model: Any, fact_or_prompt: Any, target: str | None = None, *,
                       kinds: Sequence[str] = ("mlp", "attn"), **trace_kw: Any) -> EntityRelation:
    """:func:`knlens.patching.trace` twice: corrupting the subject, then the relation tokens."""
    return EntityRelation(trace(model, fact_or_prompt, target, kinds=kinds, corrupt="subject", **trace_kw),
                          trace(model, fact_or_prompt, target, kinds=kinds, corrupt="relation", **trace_kw))
