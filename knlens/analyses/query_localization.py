"""Query localization (Chen et al., ICLR 2025; methods.md §4, §9): is a fact's set of knowledge neurons a
property of the fact, or of the query that asks for it? The consistency of neurons across paraphrases is
in :mod:`knlens.analyses.consistency`; this module holds the causal instruments, each one hook composition
run in batch:

* **query-KN mapping** — suppress on query i its own neurons S_i, a paraphrase's S_j, S_i ∩ S_j, and random
  sets with the layers and size of S_j, optionally after removing the relation's generic neurons from
  every set (:func:`query_kn_mapping`); per-fact permutation tests of own versus paraphrase and of each
  against its random control (:func:`mapping_tests`);
* **consistency-aware selection** — neurons with a high mean and a low spread of normalised attribution
  across paraphrases (β₁·mean − β₂·std), against the query's own top neurons and the top mean attribution
  at the same set size (:func:`equal_size_selections`), on reliability, generality (prompts used for the
  selection and held-out ones) and locality (:func:`compare_selections`);
* **attention versus MLP at the neuron level** — patch attention outputs at the last token from a
  paraphrase or a corrupted run and measure the neurons' activations and P(target)
  (:func:`attention_patch`); scale the attention weights on the most-attended positions ("knowledge
  synapses") by α, with random other positions as control and the attention mass of both recorded
  (:func:`synapse_scaling`, :func:`scale_attention`, :func:`attended_positions`);
* **entity versus relation** — causal traces with the corruption on the subject or on the relation
  tokens (:func:`entity_vs_relation`).

>>> import torch
>>> v = torch.zeros(3, 2, 4)
>>> v[:, 0, 1] = 1.0                        # high on every paraphrase
>>> v[0, 1, 2] = 2.0                        # highest, but on one paraphrase only
>>> sorted(consistency_aware_neurons(v, 1)), sorted(equal_size_selections(v, 1)["query"])
([Neuron(layer=0, index=1)], [Neuron(layer=1, index=2)])
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..attribution import Attribution
from ..engine import target_probs
from ..errors import KnlensError, PromptError
from ..hooks import Hook, HookFn, hook_name, hooked
from ..interventions import intervene, random_control
from ..neurons import NeuronSet
from ..patching import EMBED_HOOK, Corruption, Trace, _n_prefix, corruption_hook, subject_token_span, trace
from ..prompts import Queries, encode
from .stats import InsufficientDataError, paired_permutation_test

if TYPE_CHECKING:  # pragma: no cover
    from ..facts import Fact

__all__ = [
    "MAPPING_RELATIONS", "query_kn_mapping", "mapping_summary", "mapping_tests", "consistency_aware_scores",
    "consistency_aware_neurons", "equal_size_selections", "compare_selections", "AttentionPatch",
    "attention_patch", "scale_attention", "attended_positions", "synapse_scaling", "EntityRelation",
    "entity_vs_relation",
]

Vectors = Union[Float[Tensor, "n layer neuron"], Sequence[Attribution]]
MAPPING_RELATIONS = ("own", "own-random", "paraphrase", "paraphrase-random", "intersection")


# ------------------------------------------------------------------------------- query-KN mapping

def _per_prompt(p: Tensor, q: Queries) -> Tensor:
    """Probability of each prompt: the product over its (teacher-forced) target-token rows."""
    out = torch.ones(p.shape[:-1] + (len(q.prompts),), dtype=p.dtype)
    for i in range(len(q.prompts)):
        out[..., i] = p[..., (q.prompt_index == i).cpu()].prod(-1)
    return out


def query_kn_mapping(model: Any, fact: Fact, sets: Sequence[NeuronSet], *, factor: float = 0.0,
                     exclude: NeuronSet | None = None, n_random: int = 0, seed: int = 0,
                     batch_size: int = 64) -> pd.DataFrame:
    """Suppress (``factor=0``) on query i its own set S_i, each paraphrase's set S_j and S_i ∩ S_j.

    ``exclude`` (e.g. the relation's :func:`~knlens.selection.generic_neurons`) is removed from every set
    first. ``n_random`` draws of :func:`~knlens.interventions.random_control` per set S_j (same number of
    neurons in each layer) give the rows ``own-random`` (j = i) and ``paraphrase-random`` (j ≠ i), one per
    draw (``draw`` column). Returns one row per (query, source, relation, draw) with ``n_neurons, p_before,
    p_after, change, relative`` (= change / p_before). All (set, prompt) pairs run as rows of one batch
    (:func:`knlens.interventions.intervene`).

    >>> from knlens import load_model, Fact, NeuronSet
    >>> fact = Fact(["the capital of france is", "the capital city of france is"], " paris")
    >>> m = query_kn_mapping(load_model("tiny-llama"), fact, [NeuronSet([(1, 3)]), NeuronSet([(0, 2)])],
    ...                      n_random=2)
    >>> sorted(m.relation.value_counts().items())
    [('intersection', 2), ('own', 2), ('own-random', 4), ('paraphrase', 2), ('paraphrase-random', 4)]
    """
    n = len(fact.prompts)
    if len(sets) != n:
        raise KnlensError(f"{len(sets)} neuron sets for {n} prompts: give one set per prompt")
    if n_random < 0:
        raise KnlensError(f"n_random must be >= 0, got {n_random}")
    sets = [s - exclude for s in sets] if exclude is not None else list(sets)
    q = encode(model, list(fact.prompts), fact.target)
    pairs = list(itertools.permutations(range(n), 2))
    randoms = [random_control(sets[j], model.cfg.d_mlp, seed=seed + 1000 * j + d)
               for j in range(n) for d in range(n_random)]
    all_sets = [*sets, *[sets[i] & sets[j] for i, j in pairs], *randoms]
    before = _per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
    after = _per_prompt(intervene(model, q, all_sets, factor, batch_size=batch_size), q)  # [set, prompt]
    rows = []

    def rec(i: int, j: int, rel: str, s_idx: int, draw: int = 0) -> None:
        b, a = float(before[i]), float(after[s_idx, i])
        rows.append({"fact": fact.name, "query": i, "source": j, "relation": rel, "draw": draw,
                     "n_neurons": len(all_sets[s_idx]), "p_before": b, "p_after": a, "change": a - b,
                     "relative": (a - b) / b if b > 0 else float("nan")})
    for i in range(n):
        rec(i, i, "own", i)
    for k, (i, j) in enumerate(pairs):
        rec(i, j, "paraphrase", j)
        rec(i, j, "intersection", n + k)
    first_random = n + len(pairs)
    for i in range(n):
        for j in range(n):
            for d in range(n_random):
                rec(i, j, "own-random" if i == j else "paraphrase-random", first_random + j * n_random + d, d)
    return pd.DataFrame(rows)


def mapping_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean relative change, mean |set|, rows and share of empty sets per relation (own, paraphrase, ...)."""
    g = frame.groupby("relation")
    return pd.DataFrame({"relative": g["relative"].mean(), "change": g["change"].mean(),
                         "n_neurons": g["n_neurons"].mean(), "n": g.size(),
                         "share_empty": g["n_neurons"].apply(lambda s: float((s == 0).mean()))}).reindex(
        list(MAPPING_RELATIONS)).dropna(how="all").reset_index()


def mapping_tests(frame: pd.DataFrame, *, n_permutations: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Per-fact sign-flip permutation tests on the relative change of P(target), rows with empty sets left out.

    For each comparison A − B, a fact contributes mean(relative | A) − mean(relative | B) over its queries
    (and draws); facts lacking either are skipped. Query-KN mapping predicts ``own − paraphrase`` < 0 under
    suppression; ``own − own-random`` and ``paraphrase − paraphrase-random`` say whether each set does more
    than arbitrary neurons of its layers.
    """
    rows = []
    ok = frame[frame.n_neurons > 0]
    means = ok.groupby(["fact", "relation"])["relative"].mean().unstack("relation")
    for a, b in (("own", "paraphrase"), ("own", "own-random"), ("paraphrase", "paraphrase-random"),
                 ("intersection", "paraphrase")):
        if a not in means or b not in means:
            continue
        d = (means[a] - means[b]).dropna()
        if d.empty:
            continue
        t = paired_permutation_test(d.to_numpy(), n_permutations=n_permutations, seed=seed)
        rows.append({"comparison": f"{a} − {b}", "n_facts": t["n"], "mean_a": float(means.loc[d.index, a].mean()),
                     "mean_b": float(means.loc[d.index, b].mean()), "difference": t["mean"],
                     "share_a_above_b": t["share_positive"], "p": t["p"], "p_floor": t["p_floor"]})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ consistency-aware selection

def _values(values: Vectors) -> Float[Tensor, "n layer neuron"]:
    v = values.detach().float() if isinstance(values, Tensor) else torch.stack(
        [a.scores.detach().float() for a in values])
    if v.ndim != 3 or v.shape[0] < 2:
        raise KnlensError(f"expected [paraphrase ≥ 2, layer, neuron] values, got shape {tuple(v.shape)}")
    return v


def consistency_aware_scores(values: Vectors, *, beta1: float = 1.0, beta2: float = 1.0
                             ) -> Float[Tensor, "layer neuron"]:
    """β₁·mean − β₂·std across paraphrases of each neuron's normalised value.

    ``values`` are per-paraphrase attribution scores (``[n, layer, neuron]`` or Attributions); each
    paraphrase's values are divided by its largest absolute value first, so every paraphrase counts alike.
    """
    v = _values(values)
    v = v / v.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None]
    return beta1 * v.mean(0) - beta2 * v.std(0, unbiased=False)


def _top(scores: Float[Tensor, "layer neuron"], k: int, *, layers: Sequence[int] | None,
         exclude: NeuronSet | None, exact: bool) -> NeuronSet:
    """The ``k`` neurons with the highest positive score, best first, skipping ``exclude``; with ``exact``,
    fewer than ``k`` raises :class:`InsufficientDataError`."""
    layer_ids = list(layers) if layers is not None else list(range(scores.shape[0]))
    d, flat = scores.shape[1], scores.flatten()
    picked = []
    for i in flat.argsort(descending=True).tolist():
        nr = (layer_ids[i // d], i % d)
        if len(picked) == k or float(flat[i]) <= 0:
            break
        if exclude is None or nr not in exclude:
            picked.append(nr)
    if exact and len(picked) < k:
        raise InsufficientDataError(f"only {len(picked)} neurons have a positive score; {k} were asked for")
    return NeuronSet(picked)


def consistency_aware_neurons(values: Vectors, k: int, *, beta1: float = 1.0, beta2: float = 1.0,
                              layers: Sequence[int] | None = None, exclude: NeuronSet | None = None) -> NeuronSet:
    """The ``k`` neurons with the highest positive consistency-aware score, best first (fewer if fewer
    are positive), skipping ``exclude``."""
    return _top(consistency_aware_scores(values, beta1=beta1, beta2=beta2), k, layers=layers, exclude=exclude,
                exact=False)


def equal_size_selections(values: Vectors, k: int, *, query: int = 0, beta1: float = 1.0, beta2: float = 1.0,
                          layers: Sequence[int] | None = None, exclude: NeuronSet | None = None
                          ) -> dict[str, NeuronSet]:
    """Three selections of exactly ``k`` neurons from the paraphrases' attributions ``values``:

    ``query`` — the query's own top ``k``; ``mean`` — top ``k`` of the mean normalised attribution (β₂ = 0);
    ``consistency-aware`` — top ``k`` of β₁·mean − β₂·std. Raises :class:`InsufficientDataError` when a
    selection has fewer than ``k`` neurons with a positive score.
    """
    v = _values(values)
    if not 0 <= query < v.shape[0]:
        raise KnlensError(f"query {query} outside the {v.shape[0]} paraphrases")
    scores = {"query": v[query], "mean": consistency_aware_scores(v, beta1=1.0, beta2=0.0),
              "consistency-aware": consistency_aware_scores(v, beta1=beta1, beta2=beta2)}
    return {name: _top(s, k, layers=layers, exclude=exclude, exact=True) for name, s in scores.items()}


def compare_selections(model: Any, fact: Fact, sets: Mapping[str, NeuronSet], *, query: int = 0,
                       held_out: Sequence[int] = (), others: Sequence[Fact] = (), factor: float = 0.0,
                       batch_size: int = 64) -> pd.DataFrame:
    """Reliability, generality and locality of each neuron set under an intervention (default suppress).

    reliability: relative ΔP on the query ``fact.prompts[query]``; generality: mean relative ΔP on the
    fact's other prompts except ``held_out``; held_out: mean relative ΔP on the ``held_out`` prompts (those
    not used to select the neurons); locality: mean |relative ΔP| on the prompts of ``others`` (smaller is
    more local). For suppression a *more negative* reliability / generality means a stronger effect.
    """
    names = list(sets)
    n = len(fact.prompts)
    if not 0 <= query < n or any(not 0 <= h < n or h == query for h in held_out):
        raise KnlensError(f"query {query} and held_out {list(held_out)} must be distinct prompts of the {n}")
    q = encode(model, list(fact.prompts), fact.target)
    before = _per_prompt(target_probs(model, q, batch_size=batch_size).cpu(), q)
    after = _per_prompt(intervene(model, q, [sets[k] for k in names], factor, batch_size=batch_size), q)
    rel = (after - before) / before.clamp_min(1e-30)  # [set, prompt]
    used = [i for i in range(n) if i != query and i not in held_out]
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
                     "generality": float(rel[s_i, used].mean()) if used else float("nan"),
                     "held_out": float(rel[s_i, list(held_out)].mean()) if held_out else float("nan"),
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

def _attention_from(model: Any, tokens: Tensor, query: int, layers: Sequence[int]) -> Float[Tensor, "key"]:
    """Attention weight from position ``query`` to every position, mean over heads and ``layers``."""
    store: list[Tensor] = []
    saves = [(hook_name(l, "attn.hook_pattern"),
              lambda act, hook: store.append(act[0, :, query].detach().float().mean(0).cpu())) for l in layers]
    with torch.no_grad(), hooked(model, saves):
        model(tokens[:1])
    return torch.stack(store).mean(0)


def attended_positions(model: Any, prompt: str, *, k: int = 1, layers: Sequence[int] | None = None,
                       exclude_bos: bool = True, n_controls: int = 1, seed: int = 0
                       ) -> tuple[list[int], list[list[int]]]:
    """The ``k`` positions the last token attends to most (mean over heads and ``layers``: the "knowledge
    synapses"), and ``n_controls`` random draws of ``k`` other positions (the control; uniform among the
    positions that are not top, so they are neither chosen for low nor for high attention). BOS (with
    ``exclude_bos``) and the last token itself are never candidates.

    >>> from knlens import load_model
    >>> top, controls = attended_positions(load_model("tiny-gpt2"), "the capital of france is", n_controls=2)
    >>> len(top), [len(c) for c in controls], any(set(top) & set(c) for c in controls)
    (1, [1, 1], False)
    """
    tokens = model.to_tokens(prompt)
    n = tokens.shape[1]
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    mean = _attention_from(model, tokens, n - 1, layer_list)
    _, n_pre = _n_prefix(model, prompt)
    cand = list(range(n_pre if exclude_bos else 0, n - 1))
    if len(cand) < k + 1 or k < 1:
        raise PromptError(f"{prompt!r} has {len(cand)} candidate positions; k = {k} synapses need at least "
                          f"{k + 1} (one left for the control)")
    ranked = sorted(cand, key=lambda p: float(mean[p]), reverse=True)
    top, rest = sorted(ranked[:k]), ranked[k:]
    gen = torch.Generator().manual_seed(seed)
    controls = [sorted(rest[int(i)] for i in torch.randperm(len(rest), generator=gen)[:k]) for _ in range(n_controls)]
    return top, controls


@torch.no_grad()
def synapse_scaling(model: Any, prompt: str, target: str, neurons: NeuronSet, *,
                    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0), k: int = 1,
                    layers: Sequence[int] | None = None, n_controls: int = 5, seed: int = 0) -> pd.DataFrame:
    """Scale the last token's attention to its ``k`` most-attended positions ("knowledge synapses") by each
    α in every layer of ``layers`` (default all), and, as control, to ``n_controls`` random draws of ``k``
    other positions (:func:`attended_positions`).

    Returns one row per (group, draw, α): ``group`` (``synapse``/``control``), ``draw``, ``alpha``,
    ``positions``, ``mass`` (the positions' clean attention weight from the last token, mean over heads and
    ``layers``: scaling by α moves about ``|α − 1|·mass`` of attention), ``p_target``, ``relative_p`` and the
    mean (absolute) relative change of the neurons' activations at the last token. All rows run as one batch.

    >>> from knlens import load_model, NeuronSet
    >>> r = synapse_scaling(load_model("tiny-gpt2"), "the capital of france is", " paris", NeuronSet([(1, 3)]),
    ...                     alphas=(0.0, 1.0), n_controls=2)
    >>> r.groupby("group").size().to_dict()
    {'control': 4, 'synapse': 2}
    """
    tokens, pos, tgt = _single(model, prompt, target)
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    top, controls = attended_positions(model, prompt, k=k, layers=layer_list, n_controls=n_controls, seed=seed)
    weight = _attention_from(model, tokens, pos, layer_list)
    groups = [("synapse", 0, top)] + [("control", d, c) for d, c in enumerate(controls)]
    configs = [(g, d, a, ps) for g, d, ps in groups for a in alphas]
    n_rows = 1 + len(configs)
    alpha_t = torch.tensor([1.0] + [a for _, _, a, _ in configs])
    km = torch.zeros(n_rows, tokens.shape[1], dtype=torch.bool)
    for r, (_, _, _, ps) in enumerate(configs, start=1):
        km[r, ps] = True
    hooks = [(hook_name(l, "attn.hook_pattern"), scale_attention(alpha_t, km, query=pos)) for l in layer_list]
    p, acts = _read_run(model, tokens.expand(n_rows, -1), pos, tgt, neurons, hooks)
    rows = []
    for r, (group, d, a, ps) in enumerate(configs, start=1):
        rel = ((acts[r] - acts[0]) / acts[0].abs().clamp_min(1e-12)) if acts.numel() else torch.zeros(0)
        rows.append({"group": group, "draw": d, "alpha": a, "positions": ps, "mass": float(weight[ps].sum()),
                     "p_clean": float(p[0]), "p_target": float(p[r]),
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
