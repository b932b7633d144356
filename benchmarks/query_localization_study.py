"""Query localization on ParaRel (Chen et al., ICLR 2025; docs/methods.md, query localization), with tests that can fail.

One command (from the project root)::

    .venv/bin/python benchmarks/query_localization_study.py      # writes benchmarks/QUERY_LOCALIZATION.md

Facts: ParaRel relations read by ``knlens.data.load_pararel`` (object-last templates, ≥ 3 paraphrases), a
random subset of ``--candidates`` per relation; kept by ``knlens.methods.known.known_facts`` when the model's greedy
continuation equals the whole target on at least ``--min-prompts`` paraphrases; only those answered
paraphrases are analysed (at most ``--max-prompts``), so every analysed prompt is known. The first
``--facts-per-relation`` kept facts of each relation are studied. Integrated gradients with 8
Gauss–Legendre nodes. Every size is a flag (``--help``); the defaults finish in about half an hour on one
busy CPU core (see the .md for the measured time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import knlens  # noqa: E402
from knlens.studies.query_localization import compare_selections, mapping_summary, mapping_tests, query_kn_mapping
from knlens.studies.consistency import consistency_study
from knlens.methods.consistent_selection import equal_size_selections
from knlens.stats.tests import paired_permutation_test
from knlens.methods.attention import synapse_scaling
from knlens.data.pararel import load_pararel
from knlens.methods.controls import random_control
from knlens.methods.known import known_facts
from knlens.core.neurons import NeuronSet
from knlens.methods.selection import generic_neurons
from knlens.core.versions import environment

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.05


def md_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = list(frame.columns)
    out = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = [(f"{v:.2g}" if 0 < abs(v) < 0.001 else floatfmt.format(v)) if isinstance(v, float) else str(v)
                 for v in r]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def select_facts(model, args, say):
    """Per relation: facts read, known on ≥ min_prompts paraphrases, studied; the studied facts."""
    counts, chosen = [], []
    for rel in args.relations:
        read = load_pararel(rel, data_dir=args.data_dir, object_last=True, min_paraphrases=3,
                            max_facts=args.candidates, seed=args.seed)
        known = known_facts(model, read, keep_prompts="correct", min_prompts=args.min_prompts)
        kept = [replace(f, prompts=f.prompts[:args.max_prompts]) for f in known[:args.facts_per_relation]]
        counts.append({"relation": rel, "templates": len(read[0].prompts) if read else 0, "read": len(read),
                       f"known on ≥ {args.min_prompts} prompts": len(known), "studied": len(kept),
                       "prompts per studied fact": float(np.mean([len(f.prompts) for f in kept])) if kept else 0.0})
        chosen += kept
        say(f"{rel}: {len(read)} read, {len(known)} known, {len(kept)} studied")
    return chosen, pd.DataFrame(counts)


def per_fact_test(frame: pd.DataFrame, a: str, b: str, value: str, by: str = "set", n_perm: int = 10000) -> dict:
    """Sign-flip test of the per-fact mean of ``value`` for rows ``by == a`` minus ``by == b``."""
    m = frame.groupby(["fact", by])[value].mean().unstack(by)
    d = (m[a] - m[b]).dropna()
    t = paired_permutation_test(d.to_numpy(), n_permutations=n_perm)
    return {"comparison": f"{a} − {b}", "value": value, "n_facts": t["n"], "mean_a": float(m.loc[d.index, a].mean()),
            "mean_b": float(m.loc[d.index, b].mean()), "difference": t["mean"], "share_a_above_b": t["share_positive"],
            "p": t["p"]}


def verdict(p: float, difference: float, claim_sign: int) -> str:
    if p < ALPHA and np.sign(difference) == claim_sign:
        return "supported"
    if p < ALPHA:
        return "contradicted (significant, opposite direction)"
    return "not supported (not significant)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relations", nargs="+", default=["P36", "P1376"])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--candidates", type=int, default=150, help="facts read per relation before the known filter")
    ap.add_argument("--facts-per-relation", type=int, default=14, help="known facts studied per relation")
    ap.add_argument("--min-prompts", type=int, default=3, help="a fact is kept when known on at least this many "
                                                               "paraphrases (≥ 3 for a pairwise consistency)")
    ap.add_argument("--max-prompts", type=int, default=4, help="answered paraphrases analysed per fact")
    ap.add_argument("--steps", type=int, default=8, help="Gauss–Legendre nodes")
    ap.add_argument("--threshold", type=float, default=0.2, help="coarse neurons: score ≥ t · max")
    ap.add_argument("--generic-share", type=float, default=0.1, help="generic: in the sets of more than this share "
                                                                     "of a relation's facts (and of ≥ 2 facts)")
    ap.add_argument("--n-random", type=int, default=5, help="random sets per neuron set in the mapping test")
    ap.add_argument("--k", type=int, default=5, help="set size of the selection comparison")
    ap.add_argument("--n-controls", type=int, default=5, help="random control positions per synapse test")
    ap.add_argument("--others", type=int, default=3, help="facts of the same relation used for locality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 threads ran 10x slower)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "QUERY_LOCALIZATION.md"))
    args = ap.parse_args(argv)
    if args.min_prompts < 3 or args.max_prompts < args.min_prompts:
        ap.error("need 3 ≤ --min-prompts ≤ --max-prompts (a held-out paraphrase and two to select on)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    say = lambda *m: print(f"[{time.time() - t0:6.0f}s]", *m, file=sys.stderr, flush=True)  # noqa: E731
    times = {}

    model = knlens.load_model(args.model)
    say("model loaded")
    facts, counts = select_facts(model, args, say)
    if len(facts) < 4:
        raise SystemExit(f"only {len(facts)} known facts: add relations or candidates")
    times["filter"] = time.time() - t0

    # ------------------------------------------------------------------ consistency across paraphrases
    t = time.time()
    study = consistency_study(model, facts, steps=args.steps, grid="gauss-legendre", tolerance=None,
                              threshold=args.threshold)
    times["attribution"] = time.time() - t
    say("consistency done")
    frame = study.to_frame()
    summary = study.summary()
    share_rel = frame.groupby("relation", sort=False)[[c for c in frame if c.startswith("consistent_")]].apply(
        lambda g: (~g).mean()).reset_index()
    share_rel.columns = ["relation"] + [c.replace("consistent_", "inconsistent_") for c in share_rel.columns[1:]]
    comp = pd.DataFrame([{"relation": f.relation, "error": e} for f in study.facts for e in f.completeness])
    above = lambda e: int((e > 0.05).sum())  # noqa: E731
    completeness = comp.groupby("relation", sort=False).error.agg(["count", "median", "max", above]).reset_index()
    completeness.loc[len(completeness)] = ["all", len(comp), comp.error.median(), comp.error.max(), above(comp.error)]
    completeness.columns = ["relation", "prompts", "median relative error", "max relative error", "prompts above 0.05"]

    wb_rows = []
    for score in ("jaccard", "niu"):
        wb_rows.append({"relations": "all", **study.within_between_test(score)})
        for rel in args.relations:
            sub = type(study)(tuple(f for f in study.facts if f.relation == rel))
            if len(sub.facts) >= 2:
                wb_rows.append({"relations": rel, **sub.within_between_test(score)})
    wb = pd.DataFrame(wb_rows)[["score", "relations", "n", "within", "between", "same_template", "mean",
                                "share_positive", "p", "p_floor"]].rename(
        columns={"n": "facts", "mean": "within − between", "share_positive": "share within > between"})
    bim = pd.DataFrame([study.bimodality(s, seed=args.seed) for s in ("jaccard", "niu")])[
        ["score", "n", "h_crit", "p", "n_boot"]]

    # -------------------------------------------- query-KN mapping, generic neurons removed, random sets
    t = time.time()
    generic, gen_rows = {}, []
    for rel in args.relations:
        unions = [NeuronSet.union(f.sets) for f in study.facts if f.relation == rel]
        if unions:
            share = max(args.generic_share, 1.0 / len(unions))
            generic[rel] = generic_neurons(unions, max_share=share)
            gen_rows.append({"relation": rel, "facts": len(unions), "generic if in more than": f"{share * len(unions):.1f} facts",
                             "generic neurons": len(generic[rel]),
                             "mean coarse neurons per prompt": float(np.mean([len(s) for f in study.facts
                                                                              if f.relation == rel for s in f.sets])),
                             "mean left after removal": float(np.mean([len(s - generic[rel]) for f in study.facts
                                                                       if f.relation == rel for s in f.sets]))})
    consistent = dict(zip(frame.fact, frame.consistent_jaccard_otsu))
    mapping = pd.concat([query_kn_mapping(model, fact, list(fc.sets), exclude=generic[fact.relation],
                                          n_random=args.n_random, seed=args.seed)
                         for fact, fc in zip(facts, study.facts)], ignore_index=True)
    mapping["group"] = mapping.fact.map(lambda n: "consistent" if consistent[n] else "inconsistent")
    times["mapping"] = time.time() - t
    say("mapping done")
    map_sum, map_tests = [], []
    for group, sub in (("inconsistent", mapping[mapping.group == "inconsistent"]), ("all", mapping)):
        s = mapping_summary(sub[sub.n_neurons > 0])
        s.insert(0, "facts", group)
        map_sum.append(s)
        if len(sub):
            tt = mapping_tests(sub)
            tt.insert(0, "facts", group)
            map_tests.append(tt)
    map_sum, map_tests = pd.concat(map_sum, ignore_index=True), pd.concat(map_tests, ignore_index=True)
    empty_own = mapping[(mapping.relation == "own")].groupby("group").n_neurons.apply(lambda s: int((s == 0).sum()))

    # ------------------------------------------------ consistency-aware selection at equal set size
    t = time.time()
    sel = []
    for i, (fact, fc) in enumerate(zip(facts, study.facts)):
        n = len(fact.prompts)
        sets = equal_size_selections(fc.vectors[:n - 1], args.k, query=0, layers=None)
        sets["random"] = random_control(sets["consistency-aware"], model.cfg.d_mlp, seed=args.seed + i)
        same_rel = [f for f in facts if f.relation == fact.relation and f.name != fact.name]
        others = [same_rel[(j + i) % len(same_rel)] for j in range(min(args.others, len(same_rel)))]
        sel.append(compare_selections(model, fact, sets, query=0, held_out=[n - 1], others=others))
    sel = pd.concat(sel, ignore_index=True)
    times["selection"] = time.time() - t
    say("selection done")
    sel_sum = sel.groupby("set", sort=False)[["n_neurons", "reliability", "generality", "held_out", "locality"]].mean(
        ).reset_index()
    sel_tests = pd.DataFrame([per_fact_test(sel, "consistency-aware", b, v)
                              for b in ("query", "mean", "random") for v in ("held_out", "locality")])

    # ------------------------------------------------------------------ knowledge-synapse scaling
    t = time.time()
    syn, no_neurons = [], 0
    for fact, fc in zip(facts, study.facts):
        kn = NeuronSet(list(fc.sets[0] - generic[fact.relation])[:args.k])
        if not len(kn):
            no_neurons += 1
            continue
        r = synapse_scaling(model, fact.prompts[0], fact.target, kn, alphas=(0.0, 2.0), k=1,
                            n_controls=args.n_controls, seed=args.seed)
        r.insert(0, "fact", fact.name)
        syn.append(r)
    syn = pd.concat(syn, ignore_index=True)
    times["synapses"] = time.time() - t
    say("synapses done")
    syn_sum = syn.groupby(["alpha", "group"])[["mass", "relative_p", "activation_abs_relative"]].mean().reset_index()
    syn_tests = pd.DataFrame([per_fact_test(syn[syn.alpha == a], "synapse", "control", v, by="group")
                              for a in (0.0, 2.0) for v in ("relative_p", "activation_abs_relative")])
    syn_tests.insert(0, "alpha", [0.0, 0.0, 2.0, 2.0])
    mass = syn[syn.alpha == 0.0].groupby(["fact", "group"]).mass.mean().unstack("group")
    mass_ratio = (mass.synapse / mass.control).median()
    mass_test = per_fact_test(syn[syn.alpha == 0.0], "synapse", "control", "mass", by="group")
    t_total = time.time() - t0
    say("done")

    # ------------------------------------------------------------------------------------ report
    env = environment()
    own = map_tests[(map_tests.facts == "inconsistent") & (map_tests.comparison == "own − paraphrase")]
    wbj = wb[(wb.score == "jaccard") & (wb.relations == "all")].iloc[0]
    ca_h = sel_tests[(sel_tests.comparison == "consistency-aware − query") & (sel_tests.value == "held_out")].iloc[0]
    s0 = syn_tests[(syn_tests.alpha == 0.0) & (syn_tests.value == "relative_p")].iloc[0]
    j_otsu = summary[(summary.score == "jaccard") & (summary.threshold == "otsu")].iloc[0]
    bj = bim[bim.score == "jaccard"].iloc[0]
    headline = [
        f"- **Share of inconsistent facts** (Jaccard below Otsu's threshold {j_otsu['value']:.3f}): "
        f"{j_otsu['n_inconsistent']} of {j_otsu['n_facts']} ({j_otsu['share_inconsistent']:.0%}). Silverman's test of "
        f"unimodality of the Jaccard scores: p = {bj['p']:.3f} ({'two kinds of facts' if bj['p'] < ALPHA else 'no evidence of two kinds of facts; the split is a cut through one distribution'}).",
        f"- **Within- vs between-fact similarity** (Jaccard): paraphrases of one fact {wbj['within']:.3f}, prompts of other "
        f"facts of the relation with other templates {wbj['between']:.3f}, with the same template {wbj['same_template']:.3f}; "
        f"within − between = {wbj['within − between']:+.3f} over {wbj['facts']} facts, p = {wbj['p']:.2g}.",
    ]
    def row(frame, **eq):
        return frame[np.logical_and.reduce([frame[k] == v for k, v in eq.items()])].iloc[0]

    q_sel = row(sel_sum, set="query")
    advantage = q_sel["reliability"] - q_sel["held_out"]
    if len(own):
        o = own.iloc[0]
        rnd = row(map_tests, facts="inconsistent", comparison="own − own-random")
        headline.append(
            f"- **Query-KN mapping** on the {o['n_facts']} inconsistent facts with a non-empty set (generic neurons "
            f"removed): suppressing a query's own neurons changes P(target) by {o['mean_a']:+.3f} (relative), a "
            f"paraphrase's by {o['mean_b']:+.3f}, random sets of the same layers and size by {rnd['mean_b']:+.3f}; "
            f"own − paraphrase = {o['difference']:+.3f}, p = {o['p']:.2g}: the direction the claim predicts is "
            f"**{verdict(o['p'], o['difference'], -1)}**; a paraphrase's neurons do "
            f"{o['mean_b'] / o['mean_a']:.0%} of what the query's own do"
            + (", so the neurons are largely shared, not query-specific" if o['mean_b'] / o['mean_a'] > 0.5 else "")
            + ". Part of the gap is selection: own neurons are chosen on the query they are tested on; "
            f"for top-{args.k} sets that advantage measures {advantage:+.3f} (query's own set on its prompt vs on a "
            f"held-out paraphrase).")
    else:
        headline.append("- **Query-KN mapping**: no inconsistent fact kept a non-empty neuron set after the generic "
                        "neurons were removed; nothing to test.")
    ca_m = row(sel_tests, comparison="consistency-aware − mean", value="held_out")
    ca_l = row(sel_tests, comparison="consistency-aware − query", value="locality")
    s2 = row(syn_tests, alpha=2.0, value="relative_p")
    a0 = row(syn_tests, alpha=0.0, value="activation_abs_relative")
    headline += [
        f"- **Consistency-aware selection** ({args.k} neurons) on the held-out paraphrase: {ca_h['mean_a']:+.3f} vs "
        f"{ca_h['mean_b']:+.3f} for the query's own top {args.k} (p = {ca_h['p']:.2g}, "
        f"{verdict(ca_h['p'], ca_h['difference'], -1)}) but {ca_m['mean_b']:+.3f} for the top {args.k} of the plain mean "
        f"attribution (p = {ca_m['p']:.2g}, {verdict(ca_m['p'], ca_m['difference'], -1)}"
        + ("" if ca_m['p'] < ALPHA else ": no evidence that penalising the spread adds to pooling the paraphrases")
        + f"); locality {ca_l['mean_a']:.3f} vs {ca_l['mean_b']:.3f} for the "
        f"query's set (p = {ca_l['p']:.2g}; larger = less local).",
        f"- **Knowledge synapses**: removing (α = 0) the last token's attention to its most-attended position changes "
        f"P(target) by {s0['mean_a']:+.3f} (relative), to a random other position by {s0['mean_b']:+.3f} (p = "
        f"{s0['p']:.2g}; the claim predicts a larger drop for the synapse: {verdict(s0['p'], s0['difference'], -1)}), "
        f"with the synapse holding a median {mass_ratio:.1f}× the control's attention mass; doubling it (α = 2): "
        f"{s2['mean_a']:+.3f} vs {s2['mean_b']:+.3f} (p = {s2['p']:.2g}). The neurons' mean |relative activation "
        f"change| at α = 0: {a0['mean_a']:.3f} (synapse) vs {a0['mean_b']:.3f} (control), p = {a0['p']:.2g}"
        + ("" if a0['p'] < ALPHA else ": no evidence that the synapse drives the neurons more than other positions")
        + ".",
    ]
    settings = {k: v for k, v in vars(args).items()}
    lines = [
        "# Query localization on ParaRel — measured",
        "",
        f"Generated by `benchmarks/query_localization_study.py` on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} "
        f"({platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores shared with other jobs, torch with "
        f"{torch.get_num_threads()} thread); wall time {t_total / 60:.1f} min: "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "## Headline",
        "",
        *headline,
        "",
        "## Facts",
        "",
        f"Model `{args.model}` ({model.cfg.n_layers} layers, d_mlp {model.cfg.d_mlp}). For each relation, "
        f"`knlens.data.load_pararel` reads a random subset (seed {args.seed}) of {args.candidates} facts (object-last "
        f"templates, ≥ 3 paraphrases); `knlens.methods.known.known_facts(keep_prompts=\"correct\", min_prompts={args.min_prompts})` "
        f"keeps a fact when the model's greedy continuation equals the whole target on at least {args.min_prompts} "
        f"paraphrases, and only those answered paraphrases are analysed (at most {args.max_prompts}): every analysed "
        f"prompt is known. The first {args.facts_per_relation} kept facts per relation are studied.",
        "",
        md_table(counts),
        "",
        f"Size: {len(facts)} facts, {sum(len(f.prompts) for f in facts)} prompts. Integrated gradients cost "
        f"{times['attribution'] / len(facts):.0f} s per fact in this run (one fact was timed before choosing the size); "
        f"{args.facts_per_relation} facts per relation keep the whole study well under an hour on a 2-core machine "
        "shared with other jobs, and the known facts of the candidates read bound it anyway (table).",
        "",
        "The relations are ParaRel's two capital relations: in a probe of other ParaRel relations before this run "
        "(not part of it), the model answered at least 3 paraphrases of almost no fact (see Limitations).",
        "",
        f"Neurons per prompt: coarse neurons of integrated gradients (`hook_post`, P(target), {args.steps} "
        f"Gauss–Legendre nodes, fixed: `tolerance=None`, no adaptive refinement), score ≥ {args.threshold} × the prompt's maximum. Completeness error "
        "|Σ IG − (P(a) − P(0))| relative to Σ_l |P(a) − P(0)| per layer, per prompt:",
        "",
        md_table(completeness),
        "",
        "## Consistency across paraphrases",
        "",
        "Consistency of a fact = mean pairwise Jaccard of its paraphrases' neuron sets; Niu similarity = "
        "(σ₁² − 1)/(n − 1) of the row-normalised attribution matrix. Counts only — the earlier Welch test compared "
        "groups made by thresholding the same score (p ≈ 0 by construction) and is gone.",
        "",
        md_table(summary),
        "",
        "Share of inconsistent facts per relation (thresholds of the whole sample):",
        "",
        md_table(share_rel),
        "",
        "### Within-fact versus between-fact similarity",
        "",
        "Per fact: mean similarity of its paraphrase pairs (`within`), of its prompts with the prompts of the other "
        "studied facts of its relation written with a *different* template (`between`) and with the *same* template "
        "(`same_template`). Test: two-sided sign-flip permutation test of the per-fact differences within − between "
        "(one value per fact). If neurons belonged to the fact, within ≫ between; if they belonged to the query "
        "wording, same_template ≫ within. `niu` is Niu's similarity of the two prompts' attribution vectors (|cos|).",
        "",
        md_table(wb),
        "",
        "### Is there a consistent and an inconsistent kind of fact?",
        "",
        "Silverman's bandwidth test of unimodality on the facts' scores (smoothed bootstrap at the critical bandwidth "
        "`h_crit`; conservative). Hartigan's dip test is the usual alternative; no installed library has it (it would "
        "need the PyPI package `diptest`). A Gaussian-mixture BIC comparison was rejected: it calls skewed one-mode "
        "samples bimodal.",
        "",
        md_table(bim),
        "",
        "## Query-KN mapping",
        "",
        f"On query i, suppress (×0 at the last token) its own coarse neurons S_i, a paraphrase's S_j, S_i ∩ S_j, and "
        f"{args.n_random} random sets per S_j with S_j's number of neurons in each layer (`own-random`, "
        f"`paraphrase-random`). The relation's generic neurons are removed from every set first: a neuron is generic "
        f"when it is in the sets of more than {args.generic_share:.0%} of the relation's studied facts and of at least "
        "two facts (with fewer than 10 facts the 10 % rule alone would call every neuron generic). Relative change = "
        "(P_after − P_before)/P_before; rows with empty sets are left out. Inconsistent = Jaccard below Otsu's "
        "threshold.",
        "",
        md_table(pd.DataFrame(gen_rows)),
        "",
        "Queries whose own set is empty after the removal: "
        + ", ".join(f"{g} {v}" for g, v in empty_own.items()) + ".",
        "",
        md_table(map_sum),
        "",
        "Per-fact sign-flip permutation tests (mean relative change over a fact's queries, A − B):",
        "",
        md_table(map_tests),
        "",
        "## Consistency-aware selection at equal set size",
        "",
        f"Per fact, neurons are selected on all analysed paraphrases but the last (held out): `query` = the top {args.k} "
        f"of prompt 0's attribution; `mean` = top {args.k} of the mean normalised attribution; `consistency-aware` = top "
        f"{args.k} of mean − std (β₁ = β₂ = 1); `random` = {args.k} random neurons in the consistency-aware set's layers. "
        "Suppression (×0): reliability = relative ΔP on prompt 0, generality = on the other selection prompts, "
        f"held_out = on the held-out paraphrase, locality = mean |relative ΔP| on {args.others} other facts of the "
        "relation (smaller is more local).",
        "",
        md_table(sel_sum),
        "",
        md_table(sel_tests),
        "",
        "## Knowledge-synapse scaling",
        "",
        f"First prompt of each fact; neurons = its top {args.k} coarse neurons without the generic ones "
        f"({no_neurons} facts had none left and are skipped). The last token's attention to its most-attended position "
        f"(BOS and itself excluded; mean over heads and layers) is scaled by α in every layer and the row renormalised; "
        f"control: the same at {args.n_controls} random draws among the other positions (not the least-attended ones). "
        "`mass` = the position's clean attention weight (mean over heads and layers): scaling by α moves about "
        "|α − 1|·mass.",
        "",
        md_table(syn_sum),
        "",
        md_table(syn_tests),
        "",
        f"Attention mass, synapse vs control (per fact, α = 0): {mass_test['mean_a']:.3f} vs {mass_test['mean_b']:.3f}, "
        f"median ratio {mass_ratio:.2f}, p = {mass_test['p']:.2g}. A random other position holds less attention by "
        "construction (the synapse is the maximum), so part of any synapse − control difference is the larger mass "
        "moved, not the position.",
        "",
        "## Per fact",
        "",
        md_table(frame[["fact", "relation", "n_prompts", "mean_neurons", "intersection_neurons", "jaccard", "niu",
                        "mean_p_clean", "max_completeness_error"]]),
        "",
        "## Limitations",
        "",
        f"- A 135M-parameter model knows few ParaRel facts on ≥ {args.min_prompts} paraphrases: {len(facts)} facts from "
        f"{len(args.relations)} relations; results may not carry to other "
        "relations or larger models (the paper's 77 % inconsistent is for LLaMA3-8B, **[unverified]**).",
        f"- {args.max_prompts} or fewer paraphrases per fact: a fact's consistency rests on 3–6 pairs; the "
        "within/between test has one value per fact, and facts of one relation share prompts in their `between` "
        "means, so they are not fully independent.",
        "- Own neurons are selected on the query they are then tested on, a paraphrase's on another prompt: the "
        "own − paraphrase gap includes this selection advantage (measured above for top-k sets), which a held-out "
        "design would remove.",
        "- Only paraphrases the model answers are analysed: the sample is biased toward easy wordings, which "
        "should raise consistency, not lower it.",
        "- The generic-neuron rule (> 10 % and ≥ 2 of the studied facts) depends on how many facts are studied; with "
        "few facts it is strict and can empty a query's set (counts above).",
        "- Suppression ×0 at the last token only; relative ΔP is bounded below by −1, so large sets saturate.",
        "- Synapse control: random non-top positions hold less attention than the top one (mass reported); no "
        "α makes the moved mass equal for suppression (α = 0 removes what there is).",
        "- Silverman's test is conservative; with a few dozen facts a non-rejection is weak evidence of one mode.",
        "",
        f"Settings: {settings}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
