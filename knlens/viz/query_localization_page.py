"""The query-localization study as a Markdown page: headline, every table, limitations.

``knlens study query-localization --page benchmarks/QUERY_LOCALIZATION.md`` writes it; the verdicts follow
the tests (α = 0.05 and the direction each claim predicts), never fixed wording.
"""

from __future__ import annotations

import datetime as dt
import os
import platform

import numpy as np
import pandas as pd

from knlens.studies.query_localization_study import QueryLocalizationStudy

__all__ = ["ALPHA", "markdown_table", "verdict", "render_markdown"]

ALPHA = 0.05


def markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub Markdown table; floats with 3 decimals (2 significant digits below 0.001).

    >>> print(markdown_table(pd.DataFrame({"a": [0.5], "b": ["x"]})))
    | a | b |
    |---|---|
    | 0.500 | x |
    """
    out = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for r in frame.itertuples(index=False):
        out.append("| " + " | ".join((f"{v:.2g}" if 0 < abs(v) < 0.001 else floatfmt.format(v))
                                     if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def verdict(p: float, difference: float, claim_sign: int) -> str:
    """What a test says of a claim that predicts ``sign(difference) == claim_sign``.

    >>> verdict(0.01, -0.2, -1), verdict(0.3, -0.2, -1)
    ('supported', 'not supported (not significant)')
    """
    if p < ALPHA and np.sign(difference) == claim_sign:
        return "supported"
    if p < ALPHA:
        return "contradicted (significant, opposite direction)"
    return "not supported (not significant)"


def _row(frame: pd.DataFrame, **eq: object) -> pd.Series:
    return frame[np.logical_and.reduce([frame[k] == v for k, v in eq.items()])].iloc[0]


def _headline(r: QueryLocalizationStudy) -> list[str]:
    t, s, n = r.tables, r.settings, r.numbers
    j = _row(t["consistency"], score="jaccard", threshold="otsu")
    bj = _row(t["bimodality"], score="jaccard")
    wb = _row(t["within_between"], score="jaccard", relations="all")
    modes = ("two kinds of facts" if bj["p"] < ALPHA
             else "no evidence of two kinds of facts; the split is a cut through one distribution")
    lines = [
        f"- **Share of inconsistent facts** (Jaccard below Otsu's threshold {j['value']:.3f}): {j['n_inconsistent']} of "
        f"{j['n_facts']} ({j['share_inconsistent']:.0%}). Silverman's test of unimodality of the Jaccard scores: "
        f"p = {bj['p']:.3f} ({modes}).",
        f"- **Within- vs between-fact similarity** (Jaccard): paraphrases of one fact {wb['within']:.3f}, prompts of "
        f"other facts of the relation with other templates {wb['between']:.3f}, with the same template "
        f"{wb['same_template']:.3f}; within − between = {wb['within − between']:+.3f} over {wb['facts']} facts, "
        f"p = {wb['p']:.2g}.",
    ]
    mt = t["mapping_tests"]
    own = mt[(mt.facts == "inconsistent") & (mt.comparison == "own − paraphrase")]
    if len(own):
        o, rnd = own.iloc[0], _row(mt, facts="inconsistent", comparison="own − own-random")
        lines.append(
            f"- **Query-KN mapping** on the {o['n_facts']} inconsistent facts with a non-empty set (generic neurons "
            f"removed): suppressing a query's own neurons changes P(target) by {o['mean_a']:+.3f} (relative), a "
            f"paraphrase's by {o['mean_b']:+.3f}, random sets of the same layers and size by {rnd['mean_b']:+.3f}; "
            f"own − paraphrase = {o['difference']:+.3f}, p = {o['p']:.2g}: the direction the claim predicts is "
            f"**{verdict(o['p'], o['difference'], -1)}**; a paraphrase's neurons do {o['mean_b'] / o['mean_a']:.0%} of "
            "what the query's own do" + (", so the neurons are largely shared, not query-specific"
                                         if o['mean_b'] / o['mean_a'] > 0.5 else "")
            + ". Part of the gap is selection: own neurons are chosen on the query they are tested on; for top-"
            f"{s.k} sets that advantage measures {n['selection_advantage']:+.3f} (query's own set on its prompt vs on "
            "a held-out paraphrase).")
    else:
        lines.append("- **Query-KN mapping**: no inconsistent fact kept a non-empty neuron set after the generic "
                     "neurons were removed; nothing to test.")
    st, sy = t["selection_tests"], t["synapse_tests"]
    ca_h = _row(st, comparison="consistency-aware − query", value="held_out")
    ca_m = _row(st, comparison="consistency-aware − mean", value="held_out")
    ca_l = _row(st, comparison="consistency-aware − query", value="locality")
    s0, s2 = _row(sy, alpha=0.0, value="relative_p"), _row(sy, alpha=2.0, value="relative_p")
    a0 = _row(sy, alpha=0.0, value="activation_abs_relative")
    lines += [
        f"- **Consistency-aware selection** ({s.k} neurons) on the held-out paraphrase: {ca_h['mean_a']:+.3f} vs "
        f"{ca_h['mean_b']:+.3f} for the query's own top {s.k} (p = {ca_h['p']:.2g}, "
        f"{verdict(ca_h['p'], ca_h['difference'], -1)}) but {ca_m['mean_b']:+.3f} for the top {s.k} of the plain "
        f"mean attribution (p = {ca_m['p']:.2g}, {verdict(ca_m['p'], ca_m['difference'], -1)}"
        + ("" if ca_m['p'] < ALPHA else ": no evidence that penalising the spread adds to pooling the paraphrases")
        + f"); locality {ca_l['mean_a']:.3f} vs {ca_l['mean_b']:.3f} for the query's set (p = {ca_l['p']:.2g}; "
        "larger = less local).",
        f"- **Knowledge synapses**: removing (α = 0) the last token's attention to its most-attended position changes "
        f"P(target) by {s0['mean_a']:+.3f} (relative), to a random other position by {s0['mean_b']:+.3f} (p = "
        f"{s0['p']:.2g}; the claim predicts a larger drop for the synapse: {verdict(s0['p'], s0['difference'], -1)}), "
        f"with the synapse holding a median {n['mass_ratio']:.1f}× the control's attention mass; doubling it (α = 2): "
        f"{s2['mean_a']:+.3f} vs {s2['mean_b']:+.3f} (p = {s2['p']:.2g}). The neurons' mean |relative activation "
        f"change| at α = 0: {a0['mean_a']:.3f} (synapse) vs {a0['mean_b']:.3f} (control), p = {a0['p']:.2g}"
        + ("" if a0['p'] < ALPHA else ": no evidence that the synapse drives the neurons more than other positions")
        + ".",
    ]
    return lines


def _methods_text(r: QueryLocalizationStudy) -> dict[str, str]:
    s, n = r.settings, r.numbers
    return {
        "facts": (f"Model `{s.model}` ({r.model_shape['n_layers']} layers, d_mlp {r.model_shape['d_mlp']}). For each "
                  f"relation, `knlens.data.load_pararel` reads a random subset (seed {s.seed}) of {s.candidates} facts "
                  "(object-last templates, ≥ 3 paraphrases); `knlens.methods.known.known_facts(keep_prompts=\"correct\", "
                  f"min_prompts={s.min_prompts})` keeps a fact when the model's greedy continuation equals the whole "
                  f"target on at least {s.min_prompts} paraphrases, and only those answered paraphrases are analysed "
                  f"(at most {s.max_prompts}): every analysed prompt is known. The first {s.facts_per_relation} kept "
                  "facts per relation are studied."),
        "size": (f"Size: {int(n['facts'])} facts, {int(n['prompts'])} prompts. Integrated gradients cost "
                 f"{r.timings['attribution'] / n['facts']:.0f} s per fact in this run. The default relations are "
                 "ParaRel's two capital relations: in a probe of other ParaRel relations before the first run (not "
                 "part of it), the model answered at least 3 paraphrases of almost no fact (see Limitations)."),
        "neurons": (f"Neurons per prompt: coarse neurons of integrated gradients (`hook_post`, P(target), {s.steps} "
                    "Gauss–Legendre nodes, fixed: `tolerance=None`, no adaptive refinement), score ≥ "
                    f"{s.threshold} × the prompt's maximum. Completeness error |Σ IG − (P(a) − P(0))| relative to "
                    "Σ_l |P(a) − P(0)| per layer, per prompt:"),
        "mapping": (f"On query i, suppress (×0 at the last token) its own coarse neurons S_i, a paraphrase's S_j, "
                    f"S_i ∩ S_j, and {s.n_random} random sets per S_j with S_j's number of neurons in each layer "
                    "(`own-random`, `paraphrase-random`). The relation's generic neurons are removed from every set "
                    f"first: a neuron is generic when it is in the sets of more than {s.generic_share:.0%} of the "
                    "relation's studied facts and of at least two facts. Relative change = (P_after − P_before)/"
                    "P_before; rows with empty sets are left out. Inconsistent = Jaccard below Otsu's threshold. "
                    f"Queries whose own set is empty after the removal: consistent {int(n['empty_own_consistent'])}, "
                    f"inconsistent {int(n['empty_own_inconsistent'])}."),
        "selection": (f"Per fact, neurons are selected on all analysed paraphrases but the last (held out): `query` = "
                      f"the top {s.k} of prompt 0's attribution; `mean` = top {s.k} of the mean normalised "
                      f"attribution; `consistency-aware` = top {s.k} of mean − std (β₁ = β₂ = 1); `random` = {s.k} "
                      "random neurons in the consistency-aware set's layers. Suppression (×0): reliability = "
                      "relative ΔP on prompt 0, generality = on the other selection prompts, held_out = on the "
                      f"held-out paraphrase, locality = mean |relative ΔP| on {s.others} other facts of the relation "
                      "(smaller is more local)."),
        "synapses": (f"First prompt of each fact; neurons = its top {s.k} coarse neurons without the generic ones "
                     f"({int(n['synapse_facts_skipped'])} facts had none left and are skipped). The last token's "
                     "attention to its most-attended position (BOS and itself excluded; mean over heads and layers) "
                     "is scaled by α in every layer and the row renormalised; control: the same at "
                     f"{s.n_controls} random draws among the other positions. `mass` = the position's clean "
                     "attention weight: scaling by α moves about |α − 1|·mass. Attention mass, synapse vs control "
                     f"(per fact, α = 0): {n['mass_synapse']:.3f} vs {n['mass_control']:.3f}, median ratio "
                     f"{n['mass_ratio']:.2f}, p = {n['mass_p']:.2g}; the synapse is the maximum, so part of any "
                     "synapse − control difference is the larger mass moved, not the position."),
    }


LIMITATIONS = [
    "- A 135M-parameter model knows few ParaRel facts on ≥ 3 paraphrases; results may not carry to other "
    "relations or larger models (the paper's 77 % inconsistent is for LLaMA3-8B, **[unverified]**).",
    "- Few paraphrases per fact: a fact's consistency rests on 3–6 pairs; the within/between test has one value per "
    "fact, and facts of one relation share prompts in their `between` means, so they are not fully independent.",
    "- Own neurons are selected on the query they are then tested on, a paraphrase's on another prompt: the own − "
    "paraphrase gap includes this selection advantage (measured above for top-k sets).",
    "- Only paraphrases the model answers are analysed: the sample is biased toward easy wordings, which should "
    "raise consistency, not lower it.",
    "- The generic-neuron rule depends on how many facts are studied; with few facts it is strict and can empty a "
    "query's set (counts above).",
    "- Suppression ×0 at the last token only; relative ΔP is bounded below by −1, so large sets saturate.",
    "- Silverman's test is conservative; with a few dozen facts a non-rejection is weak evidence of one mode.",
]


def render_markdown(r: QueryLocalizationStudy) -> str:
    """The whole page (see the module)."""
    t, text = r.tables, _methods_text(r)
    timing = ", ".join(f"{k} {v / 60:.1f}" for k, v in r.timings.items() if k != "total")
    lines = [
        "# Query localization on ParaRel — measured", "",
        f"Generated by `knlens study query-localization` on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} "
        f"({platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores); wall time "
        f"{r.timings.get('total', 0.0) / 60:.1f} min: {timing}.", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r.versions.items()) + ".", "",
        "## Headline", "", *_headline(r), "",
        "## Facts", "", text["facts"], "", markdown_table(t["counts"]), "", text["size"], "",
        text["neurons"], "", markdown_table(t["completeness"]), "",
        "## Consistency across paraphrases", "",
        "Consistency of a fact = mean pairwise Jaccard of its paraphrases' neuron sets; Niu similarity = "
        "(σ₁² − 1)/(n − 1) of the row-normalised attribution matrix. Counts only: no test compares groups made by "
        "thresholding the same score.", "",
        markdown_table(t["consistency"]), "", "Share of inconsistent facts per relation:", "",
        markdown_table(t["inconsistent_share"]), "",
        "### Within-fact versus between-fact similarity", "",
        "Per fact: mean similarity of its paraphrase pairs (`within`), of its prompts with the prompts of the other "
        "studied facts of its relation written with a *different* template (`between`) and with the *same* template "
        "(`same_template`); two-sided sign-flip permutation test of the per-fact differences within − between.", "",
        markdown_table(t["within_between"]), "",
        "### Is there a consistent and an inconsistent kind of fact?", "",
        "Silverman's bandwidth test of unimodality on the facts' scores (smoothed bootstrap at the critical "
        "bandwidth `h_crit`; conservative). Hartigan's dip test is the usual alternative; no installed library has "
        "it (it would need the PyPI package `diptest`).", "", markdown_table(t["bimodality"]), "",
        "## Query-KN mapping", "", text["mapping"], "", markdown_table(t["generic"]), "",
        markdown_table(t["mapping_summary"]), "",
        "Per-fact sign-flip permutation tests (mean relative change over a fact's queries, A − B):", "",
        markdown_table(t["mapping_tests"]), "",
        "## Consistency-aware selection at equal set size", "", text["selection"], "",
        markdown_table(t["selection_summary"]), "", markdown_table(t["selection_tests"]), "",
        "## Knowledge-synapse scaling", "", text["synapses"], "", markdown_table(t["synapse_summary"]), "",
        markdown_table(t["synapse_tests"]), "",
        "## Per fact", "", markdown_table(t["facts"]), "",
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {r.settings}.", "",
    ]
    return "\n".join(lines)
