"""The entity-versus-relation study as a Markdown page: headline, tracing averages with intervals for subject and
relation corruption, attention against MLP, severed paths, the papers' claims beside ours, limitations.
``knlens study entity-relation --page benchmarks/ENTITY_RELATION.md`` writes it."""

from __future__ import annotations

from knlens.studies.entity_relation import EntityRelationStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, phase_minutes, versions_line

__all__ = ["render_markdown", "PAPERS"]

PAPERS = [
    "- Meng et al. (2022) **[paper; GPT-2 XL numbers unverified]**: with the subject corrupted, restoring MLP outputs "
    "has its strongest effect at the last subject token in middle layers, attention at the last token in late "
    "layers; severing the MLP path at the last subject token removes most of the residual's effect in middle layers, "
    "severing attention much less.",
    "- Wei et al., \"Does Knowledge Localization Hold True?\" (CIKM 2024) **[paper]**: relational knowledge is "
    "encoded largely in attention modules, not only in MLPs; their causal tracer corrupts subject tokens only (the "
    "relation-token corruption here is knlens' own).",
    "- This repository, [EDITING.md](EDITING.md) (same model): a rank-one edit keyed at the relation's last token "
    "(`rank-one-relation`, Wei et al.'s relation edit) against the same edit keyed at the subject (`rank-one`) — "
    "see its rank-one vs rank-one-relation comparison (reliability and the relation criterion); not redone here.",
]

LIMITATIONS = [
    "- One model of 135M parameters; only facts it answers greedily on the first object-last template are traced.",
    "- Few noise samples per trace (`samples`, Meng et al. use 10): single traces are noisy; the averages over facts "
    "and their bootstrap intervals are the result.",
    "- Relation tokens are every prompt token that is neither BOS, the subject nor the last token: for ParaRel "
    "templates this mixes function words (\"of\", \"the\") with the relation's content words.",
    "- Peak effects are the per-fact maximum over layers, so their means are biased upwards by noise alike for "
    "every kind; the attention-minus-MLP difference is paired per fact.",
    "- Severing freezes the MLP or attention outputs at the restored token only, in the layers above the restored "
    "one (Meng et al.'s modified graph); other tokens' paths are untouched.",
]


def _headline(r: EntityRelationStudy) -> list[str]:
    t = r.tables
    c = t["counts"]
    lines = [f"- **Facts**: {int(c.traced.sum())} traced of {int(c.known.sum())} known of {int(c.read.sum())} read "
             f"({', '.join(f'{x.relation} {x.traced}/{x.known}/{x.read}' for x in c.itertuples())}; "
             "traced/known/read)."]
    for x in t["total"].itertuples():
        lines.append(f"- **Total effect, {x.corruption} corrupted**: P_clean − P_corrupted = {x.effect:.3f} "
                     f"[{x.ci_low:.3f}, {x.ci_high:.3f}].")
    p = t["peaks"]
    for corrupt in ("subject", "relation"):
        part = p[p.corruption == corrupt].sort_values("peak", ascending=False).head(3)
        lines.append(f"- **Largest peaks, {corrupt} corrupted**: " + "; ".join(
            f"{x['kind']} @ {x['group']} {x['peak']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}] (layer {x['at layer']})"
            for x in part.to_dict("records")) + ".")
    for x in t["attn_vs_mlp"].to_dict("records"):
        if x["group"] in ("last", "last subject", "further"):
            sig = "significant" if x["p"] < 0.05 else "not significant"
            lines.append(f"- {x['corruption']} corrupted, {x['group']}: attention − MLP peak = {x['attn - mlp']:+.3f} "
                         f"[{x['ci_low']:.3f}, {x['ci_high']:.3f}], p = {x['p']:.3g} ({sig}, n = {x['n']}).")
    for x in t["severed_summary"].to_dict("records"):
        lines.append(f"- **Severed**, {x['corruption']} corrupted, at the {x['token']} token: mean effect "
                     f"{x['mean effect']:.3f}; MLP severed {x['mlp severed']:.3f} (drop {x['drop mlp']:+.3f} "
                     f"{x['drop mlp ci']}), attention severed {x['attn severed']:.3f} (drop {x['drop attn']:+.3f} "
                     f"{x['drop attn ci']}).")
    return lines


def render_markdown(r: EntityRelationStudy) -> str:
    """The whole page (see the module)."""
    s, t = r.settings, r.tables
    timing = phase_minutes(r.timings)
    g = t["groups"]
    coarse = g.assign(layers=(g.layer // 5 * 5).astype(str) + "–" + (g.layer // 5 * 5 + 4).astype(str))
    coarse = coarse.groupby(["corruption", "kind", "group", "layers"], sort=False, as_index=False)["effect"].mean()
    coarse = coarse.pivot_table(index=["corruption", "kind", "group"], columns="layers", values="effect",
                                sort=False).reset_index()
    sev = t["severed"]
    sev = sev.assign(value=sev.effect.map("{:.3f}".format) + " [" + sev.ci_low.map("{:.3f}".format) + ", "
                     + sev.ci_high.map("{:.3f}".format) + "]")
    sev = sev.pivot_table(index=["corruption", "token", "layer"], columns="sever", values="value",
                          aggfunc="first").reset_index()
    lines = [
        "# Entity versus relation (causal tracing, severed paths) — measured", "",
        f"{generated_by('knlens study entity-relation')}; wall time {r.timings.get('total', 0.0) / 60:.1f} min: "
        f"{timing}.", "",
        versions_line(r.versions), "",
        "## Headline", "", *_headline(r), "",
        "## Peak effect by token group", "",
        f"Causal tracing (knlens.methods.tracing: Gaussian noise 3σ on the corrupted tokens' embeddings, "
        f"{s.samples} samples; restored states: residual (window 1), MLP and attention outputs (window 10)). Per fact "
        "the maximum over layers of the group's mean indirect effect; mean over facts with a 95 % bootstrap interval, "
        "and the layer where the mean curve peaks.", "",
        markdown_table(t["peaks"]), "",
        "## Attention against MLP", "",
        "Per fact and token group, the attention peak minus the MLP peak (paired; sign-flip permutation test):", "",
        markdown_table(t["attn_vs_mlp"]), "",
        "## Mean indirect effect by layer (blocks of 5 layers)", "",
        markdown_table(coarse), "",
        "## Severed paths", "",
        "The residual restored at one token and layer, with the MLP (or attention) outputs at that token in the layers "
        "above frozen at the corrupted run; per fact the mean over layers, then mean over facts (drop = unsevered − "
        "severed, 95 % bootstrap interval):", "",
        markdown_table(t["severed_summary"]), "",
        "By layer (mean [95 % CI] over facts):", "",
        markdown_table(sev), "",
        "## Total effects and counts", "",
        markdown_table(t["total"]), "", markdown_table(t["counts"]), "",
        "The full per-layer table of every (corruption, kind, group) is in the study's saved result (`--out`).", "",
        "## The papers' claims beside ours", "", *PAPERS, "",
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {s}.", "",
    ]
    return "\n".join(lines)
