"""The QRNCA study (Chen, Dejl, Toni, 2024; docs/methods.md, Query-relevant neurons) on ParaRel.

Per relation (the "domain"): facts read, the known filter (the model's greedy answer is the object on at least
``min_prompts`` paraphrases), ``queries`` known facts kept; each asked as ``n_templates`` 4-option multiple-choice
prompts (options: objects of the relation). Then:

1. **QRNCA** — IG of the answer letter on every template (``steps`` nodes), NA-ICA over all queries, top-v per query;
   a domain's set is the top-v by the QRNCA score summed over its queries (common neurons excluded);
2. **KN (Dai)** — plain IG of the object on the cloze paraphrases, the top-v of the summed normalised scores of the
   domain's queries;
3. **random** — sets with the QRNCA set's layer counts, uniform and matched on activation magnitude;
4. **PCR** — each set boosted (×2) and suppressed (×0) on its domain's multiple-choice prompts (related) and on the
   other domains' (unrelated); PCR = |Δp% related| / |Δp% unrelated|.

The localised regions are the (layer, neuron-bin) counts of every query's QRNCA neurons per domain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import pandas as pd
import torch

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode, single_token
from knlens.core.versions import environment
from knlens.data.pararel import load_pararel
from knlens.methods.attribution.grids import Grid
from knlens.methods.attribution.ig import attribute_facts
from knlens.methods.controls import matched_control, random_control
from knlens.methods.known import known_facts
from knlens.methods.structure.multiple_choice import LETTERS, MCQuery, check_letters, multiple_choice
from knlens.methods.structure.pcr import pcr_frame, pcr_table
from knlens.methods.structure.qrnca import (QRNCASettings, common_neurons, density, neuron_attribution,
                                           query_relevant_neurons, top_neurons)
from knlens.results.study import StudyResult
from knlens.run.engine import target_logits

__all__ = ["QRNCAStudySettings", "QRNCAStudy", "qrnca_study", "mc_accuracy", "PAPER"]

# Llama-2-7B-chat, Chen, Dejl and Toni (2024), Table: PCR of domain boost / suppress [paper]
PAPER = {"QRNCA": {"boost": 4.4, "suppress": 5.6}, "KN": {"boost": 1.0, "suppress": 1.0},
         "random": {"boost": 1.0, "suppress": 0.55}}


@dataclass(frozen=True)
class QRNCAStudySettings:
    """Sizes of the study (defaults: the run of ``benchmarks/QRNCA.md``)."""

    model: str = "smollm2-135m"
    relations: tuple[str, ...] = ("P36", "P30", "P17", "P407")
    candidates: int = 40
    queries: int = 4
    n_templates: int = 3
    min_prompts: int = 1
    max_prompts: int = 3
    steps: int = 8
    grid: str = "right"  # the paper's uniform grid; Gemma-3 needs "gauss-legendre" (RESULTS.md, completeness)
    top_v: int = 20
    threshold: float = 0.2
    common_share: float = 0.3
    letters: tuple[str, ...] = LETTERS
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_domains()
        if min(self.queries, self.n_templates, self.steps, self.top_v, self.max_prompts) < 1:
            raise SettingsError("queries, n_templates, steps, top_v and max_prompts must be at least 1")
        if self.grid not in get_args(Grid):
            raise SettingsError(f"unknown grid {self.grid!r}; use one of {', '.join(get_args(Grid))}")

    def _check_domains(self) -> None:
        if len(self.relations) < 2:
            raise SettingsError(f"PCR needs unrelated queries: give at least 2 relations, got {list(self.relations)}")


@dataclass(frozen=True, eq=False)
class QRNCAStudy(StudyResult):
    """Every table of the study by name, single numbers, the localised regions per domain, timings and versions."""

    study = "qrnca_study"
    frame_table = "pcr"  # PCR of every method and action
    settings: QRNCAStudySettings
    numbers: dict[str, float]
    density: dict[str, torch.Tensor] = field(default_factory=dict)

    def plot(self) -> Any:
        """The localised regions: layer × neuron-bin counts of QRNCA neurons, one panel per domain."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.density), figsize=(3 * len(self.density), 4), squeeze=False)
        for ax, (rel, d) in zip(axes[0], self.density.items()):
            ax.imshow(d.numpy(), aspect="auto", origin="lower", cmap="Greys")
            ax.set_title(rel)
            ax.set_xlabel("neuron bin")
        axes[0][0].set_ylabel("layer")
        fig.tight_layout()
        return fig


@torch.no_grad()
def mc_accuracy(model: Any, queries: list[MCQuery], letters: tuple[str, ...] = LETTERS) -> pd.DataFrame:
    """Per query and template: P of the answer letter, whether it is the likeliest of the option letters and which
    letter is (``chosen``; one forward of each query's templates)."""
    ids = [single_token(model, f" {x}") for x in letters]
    rows = []
    for q in queries:
        p = target_logits(model, encode(model, list(q.prompts), q.letters[0])).float().softmax(-1)[:, ids].cpu()
        for j, answer in enumerate(q.letters):
            k = letters.index(answer.strip())
            rows.append({"query": q.name, "template": j, "p_answer": float(p[j, k]),
                         "correct": bool(int(p[j].argmax()) == k), "answer": letters[k],
                         "chosen": letters[int(p[j].argmax())]})
    return pd.DataFrame(rows)


def _domain_set(scores: torch.Tensor, top_v: int, exclude: torch.Tensor | None, layers: tuple[int, ...]) -> NeuronSet:
    return top_neurons(scores.sum(0), top_v, exclude, layers)


def _relation_queries(model: Any, s: QRNCAStudySettings, data_dir: str | None, facts: Sequence[Fact] | None,
                      say: Callable[[str], None]) -> tuple[list[MCQuery], list[Fact], list[str], pd.DataFrame]:
    """The questions of every relation (the domains), the cloze facts for KN, each question's domain, the counts."""
    counts, queries, cloze = [], [], []
    for rel in s.relations:
        if facts is None:
            read = load_pararel(rel, data_dir=data_dir, max_facts=s.candidates, seed=s.seed)
            known = known_facts(model, read, keep_prompts="correct", min_prompts=s.min_prompts)
        else:
            read = known = [f for f in facts if f.relation == rel]
        names = {f.name for f in known[:s.queries]}
        mine = [q for q in multiple_choice(read, n_templates=s.n_templates, seed=s.seed, letters=s.letters)
                if q.name in names]
        queries += mine
        cloze += [Fact(f.prompts[:s.max_prompts], f.target, relation=rel, name=f.name) for f in known[:s.queries]]
        counts.append({"relation": rel, "read": len(read), "known": len(known), "queries": len(mine),
                       "objects (options drawn from)": len({f.target for f in read})})
        say(f"{rel}: {len(read)} read, {len(known)} known, {len(mine)} queries")
    return queries, cloze, [q.fact.relation or "" for q in queries], pd.DataFrame(counts)


def qrnca_study(model: Any, settings: QRNCAStudySettings = QRNCAStudySettings(), *, data_dir: str | None = None,
                facts: Sequence[Fact] | None = None, say: Callable[[str], None] = lambda _: None) -> QRNCAStudy:
    """Run the study on ``model`` (see the module) and return every table. ``facts`` (with ``relation`` set) replace
    the ParaRel facts and their known filter (e.g. hand-written facts a tiny test model can read); the option letters
    are ``settings.letters``, each one token after a space."""
    t0 = time.time()
    check_letters(model, settings.letters)
    queries, cloze, domains, counts = _relation_queries(model, settings, data_dir, facts, say)
    return qrnca_domains(model, settings, queries, cloze, domains, counts, t0=t0, say=say)


def qrnca_domains(model: Any, s: QRNCAStudySettings, queries: Sequence[MCQuery], cloze: Sequence[Fact],
                  domains: Sequence[str], counts: pd.DataFrame, *, t0: float, paper: dict = PAPER,
                  say: Callable[[str], None] = lambda _: None) -> QRNCAStudy:
    """QRNCA, KN and random sets of every domain (``domains[i]`` is the domain of ``queries[i]`` and ``cloze[i]``)
    and their PCR on the domain's own questions against the other domains' (``paper``: the published PCR beside
    them); ``t0`` is when the study started (its time so far is the filter's)."""
    if len(set(domains)) < 2:
        raise InsufficientDataError("fewer than 2 domains have a known fact: PCR needs unrelated queries")
    times = {"filter": time.time() - t0}
    t = time.time()
    acc = mc_accuracy(model, list(queries), s.letters)
    times["mc accuracy"] = time.time() - t
    t = time.time()
    mc_facts = [f for q in queries for f in q.facts()]
    flat = attribute_facts(model, mc_facts, steps=s.steps, grid=s.grid, tolerance=None)
    per_query = [[a for attrs in flat[i * s.n_templates:(i + 1) * s.n_templates] for a in attrs]
                 for i in range(len(queries))]
    qs = QRNCASettings(threshold=s.threshold, top_v=s.top_v, common_share=s.common_share)
    res = query_relevant_neurons(per_query, [q.name for q in queries], qs)
    times["qrnca ig"] = time.time() - t
    say(f"QRNCA: {len(mc_facts)} prompts attributed, {len(res.common)} common neurons ({times['qrnca ig']:.0f} s)")
    t = time.time()
    kn_na = neuron_attribution(attribute_facts(model, list(cloze), steps=s.steps, grid=s.grid, tolerance=None))
    times["kn ig"] = time.time() - t
    layers = res.layers
    sets, related, unrelated, dens, set_rows = {}, {}, {}, {}, []
    for k, dom in enumerate(dict.fromkeys(domains)):
        idx = torch.tensor([i for i, d in enumerate(domains) if d == dom])
        qr = _domain_set(res.scores[idx], s.top_v, common_neurons(res.clusters, s.common_share), layers)
        kn = _domain_set(kn_na[idx], s.top_v, None, layers)
        acts = torch.stack([a.activations for i in idx.tolist() for a in per_query[i]]).abs().mean(0)
        magnitude = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)
        magnitude[list(layers)] = acts
        sets |= {f"QRNCA|{dom}": qr, f"KN|{dom}": kn,
                 f"random|{dom}": random_control(qr, model.cfg.d_mlp, seed=s.seed + k),
                 f"random (matched)|{dom}": matched_control(qr, magnitude, seed=s.seed + k)}
        mine = [f for q, d in zip(queries, domains) if d == dom for f in q.facts()]
        others = [f for q, d in zip(queries, domains) if d != dom for f in q.facts()]
        for method in ("QRNCA", "KN", "random", "random (matched)"):
            related[f"{method}|{dom}"], unrelated[f"{method}|{dom}"] = mine, others
        dens[dom] = density(NeuronSet(n for i in idx.tolist() for n in res.neurons[i]), len(layers),
                            model.cfg.d_mlp, layers=layers)
        set_rows.append({"domain": dom, "QRNCA neurons": len(qr), "KN neurons": len(kn), "shared": len(qr & kn),
                         "QRNCA mean layer": sum(n.layer for n in qr) / max(1, len(qr)),
                         "KN mean layer": sum(n.layer for n in kn) / max(1, len(kn)),
                         "QRNCA set": " ".join(map(str, list(qr)[:8])), "KN set": " ".join(map(str, list(kn)[:8]))})
    t = time.time()
    frame = pcr_frame(model, sets, related, unrelated)
    times["pcr"] = time.time() - t
    frame[["method", "domain"]] = frame["group"].str.split("|", expand=True)
    per_domain = pcr_table(frame, by=("method", "domain", "action"))
    pooled = pcr_table(frame, by=("method", "action"))
    pooled["paper (Llama-2-7B-chat)"] = [paper.get(m.split(" ")[0], {}).get(a, float("nan"))
                                         for m, a in zip(pooled.method, pooled.action)]
    completeness = [a.relative_completeness_error for attrs in per_query for a in attrs]
    times["total"] = time.time() - t0
    numbers = {"queries": float(len(queries)), "mc prompts": float(len(mc_facts)),
               "mc accuracy": float(acc.correct.mean()), "common neurons": float(len(res.common)),
               "median relative completeness error": float(torch.tensor(completeness).median())}
    qr_sets = {d: sets[f"QRNCA|{d}"] for d in dens}
    overlap = pd.DataFrame([[len(qr_sets[a] & qr_sets[b]) for b in qr_sets] for a in qr_sets],
                           index=list(qr_sets), columns=list(qr_sets)).rename_axis("domain").reset_index()
    tables = {"counts": counts, "mc_accuracy": acc, "sets": pd.DataFrame(set_rows), "overlap": overlap,
              "pcr": pooled, "pcr_by_domain": per_domain, "common": pd.DataFrame({"neuron": [str(n) for n in res.common]}),
              "neurons": res.to_frame(), "engines": frame.groupby("engine").size().rename("rows").reset_index()}
    return QRNCAStudy(s, tables, numbers, dens, timings=times, versions=environment())
