"""The multilingual study as a Markdown page: headline, facts per filter, LIKN, suppression, MATRICE vs
intersection, the cross-lingual edit matrix, the papers' claims beside ours, limitations.

``knlens study multilingual --page benchmarks/MULTILINGUAL.md`` writes it; statements are computed from the
tables (never fixed wording), empty tables are said to be empty.
"""

from __future__ import annotations

import pandas as pd

from knlens.studies.multilingual_edits import pivot_matrix
from knlens.studies.multilingual_study import MultilingualStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, phase_minutes, versions_line

__all__ = ["render_markdown", "PAPERS", "LIMITATIONS"]

PAPERS = [
    "- Chen et al. (AAAI 2024) **[code]**: language-independent knowledge neurons = the intersection of a fact's "
    "AMIG neurons (coarse ≥ 0.3·max) across languages; suppressing / enhancing them changes the prediction in "
    "every language. **[unverified]** their tables report large drops under suppression for mBERT / mGPT; no "
    "number is taken as a target here.",
    "- Cao et al. (MATRICE, 2024) **[paper, abstract only]**: a single prompt per fact localises with high "
    "uncertainty; aggregating over paraphrased queries and languages with an uncertainty estimate finds "
    "language-agnostic neurons more reliably. Their formula is not public; knlens' estimator is mean − k·std of "
    "the cells' max-normalised scores (docs/methods.md, MATRICE).",
    "- MEMLA **[code]**: edits through the language-independent and the edit language's specific neurons, half "
    "the learned update committed; reported average gain +7.1 % **[unverified]**.",
    "- Dai et al. (2022) **[unverified]**: suppressing a fact's knowledge neurons lowers P(target) by about 29 % "
    "(BERT-base, English), enhancing raises it by about 31 %.",
]

LIMITATIONS = [
    "- One small model (Gemma-3-270M, 4-bit GGUF weights dequantised to float32) on a shared CPU: few facts, few "
    "prompts per language, few random draws. With N random draws the smallest empirical p is 1/(N+1).",
    "- The facts are those the model knows in **every** chosen language (greedy answer = the object): a small and "
    "easy subset (frequent subjects, objects such as languages and countries).",
    "- The LIKN suppression is in-sample (the sets are selected on the prompts they are measured on); the "
    "held-out-language comparison of MATRICE and intersection is the out-of-sample test.",
    "- Multi-token objects are teacher-forced (every gold token must be the argmax to count as known; IG / AMIG "
    "differentiate the mean per-token probability).",
    "- MATRICE's formula is knlens' own (the paper's is not public): a comparison with an estimator, not with the "
    "paper's method.",
]


def _md(frame: pd.DataFrame, empty: str = "(none)") -> str:
    return markdown_table(frame.reset_index(drop=True), floatfmt="{:.4g}") if len(frame) else empty


def _headline(r: MultilingualStudy) -> list[str]:
    t, n, s = r.tables, r.numbers, r.settings
    f = t["filters"]
    known = f[f["filter"] == f"known in {s.languages[-1]}"].set_index("relation")["facts"]
    read = f[f["filter"] == "read"].set_index("relation")["facts"]
    lines = [f"- **Facts**: {int(n['facts_known_in_all'])} known in all of {', '.join(s.languages)} ("
             + ", ".join(f"{rel} {known[rel]} of {read[rel]}" for rel in known.index)
             + f"); {int(n['facts_attributed'])} attributed within the budget."]
    lines.append(f"- **LIKN**: {n['mean_independent']:.3g} language-independent neurons per fact on average "
                 f"({int(n['facts_without_independent'])} of {int(n['facts_attributed'])} facts have none), of "
                 f"{n['mean_neurons']:.3g} neurons per (fact, language).")
    e = t["likn_effects"]
    sup = e[e.action == "suppress"]
    if len(sup):
        lines.append("- **Suppressing the LIKN set** changes P(target) by " + ", ".join(
            f"{x.language} {x.knowledge_relative:+.0%} (matched random {x.matched_relative:+.0%}, p = "
            f"{x.p_empirical_matched:.2g})" for x in sup.itertuples()) + ".")
    else:
        lines.append("- **Suppression**: no fact has a language-independent neuron: nothing to suppress.")
    st = t["stability"]
    if len(st) and not (st.n_facts > 0).any():
        lines.append(f"- **Stability over resampled queries**: not measured: none of the "
                     f"{int(st.facts_not_resamplable.max())} facts has two answered prompts in every language.")
    elif len(st):
        lines.append("- **Stability over resampled queries** (mean Jaccard of the sets selected on random halves of "
                     "each language's queries): " + ", ".join(f"{x.method} {x.stability:.2f} (mean size "
                                                              f"{x.mean_size:.3g})" for x in st.itertuples()) + ".")
    h = t["heldout"]
    if len(h) and "knowledge_relative" in h:
        hs = h[h.action == "suppress"].groupby("method")[["knowledge_relative", "matched_relative"]].mean()
        lines.append("- **Held-out language** (selected on the other languages, suppressed on it; mean over the "
                     "held-out languages): " + ", ".join(f"{m} {x.knowledge_relative:+.0%} (matched random "
                                                         f"{x.matched_relative:+.0%})" for m, x in hs.iterrows()) + ".")
    d = t["degenerate"]
    if len(d):
        lines.append(f"- **Degenerate pairs** ({int(d.n_facts.max())} facts): " + ", ".join(
            f"{x.language} {int(x.degenerate_pairs)} of {int(x.pairs_tested)} pairs tested" for x in d.itertuples())
            + ".")
    m = t["edit_matrix"]
    rel = m[(m.metric == "reliability") & m.n_facts.gt(0)] if len(m) else m
    if len(rel):
        same, cross = rel[rel.edit_language == rel.eval_language], rel[rel.edit_language != rel.eval_language]
        lines.append("- **Cross-lingual edits** (reliability, mean over facts and languages; in the edit language / in "
                     "the others): " + ", ".join(
                         f"{e} {same[same.editor == e].after.mean():.2f} / {cross[cross.editor == e].after.mean():.2f}"
                         for e in dict.fromkeys(rel.editor)) + ".")
    lines += [f"- **Not done**: {n}." for n in t["notes"].get("note", [])]
    return lines


def render_markdown(r: MultilingualStudy) -> str:
    """The whole page (see the module)."""
    s, t = r.settings, r.tables
    timing = phase_minutes(r.timings)
    counts_cols = [c for c in ["relation", "language", "tuples", "templates_used", "templates_object_not_last",
                               "aligned", "kept", "tested", "known", "not_known", "multi_token_targets"]
                   if c in t["counts"]]
    filters = t["filters"].pivot_table(index="filter", columns="relation", values="facts", sort=False).reset_index()
    layers = t["layers"][[c for c in t["layers"].columns if not c.endswith("share_independent")]]
    lines = [
        f"# One fact, many languages (mParaRel, {s.model}) — measured", "",
        f"{generated_by('knlens study multilingual')}; model {s.model}; wall time "
        f"{r.timings.get('total', 0.0) / 60:.1f} min ({timing}); budget {s.budget_minutes:g} min.", "",
        versions_line(r.versions), "",
        "## Headline", "", *_headline(r), "",
        "## Facts per filter", "",
        f"Relations {', '.join(s.relations)}; languages {', '.join(s.languages)}. Per relation: facts aligned across "
        f"the languages (same subject and object URI, object-last templates), a random {s.candidates} read "
        f"(seed {s.seed}; each language's first {s.max_prompts} templates), then known in each language in turn "
        f"among the facts known in the languages before it (greedy answer = the object on at least {s.min_prompts} "
        "prompt(s); multi-token objects teacher-forced; the last row is known in all), attributed within the "
        f"budget (each language's first {s.attribute_prompts} answered prompts).", "",
        _md(filters), "",
        "Per language (loader counts and the known filter):", "", _md(t["counts"][counts_cols]), "",
        "Attributed facts (answered prompts per language; seconds of attribution; the median relative completeness error "
        "of the fact's attributions, nan for AMIG in the authors' scaling, which has none; on Gemma-3, Gauss-Legendre "
        "needs about 32 nodes to bring it under 0.1, benchmarks/RESULTS.md):", "", _md(t["facts"]), "",
        "## Language-independent (LIKN) and language-specific neurons", "",
        f"{r.neurons.settings.attribution if r.neurons else s.attribution}, {s.steps} {s.grid} steps; a language's "
        f"neurons: coarse (≥ {s.threshold} × the prompt's max) in more than {s.p} of its prompts; LIKN = their "
        "intersection over all languages; specific = a language's remainder. Mean per fact:", "",
        _md(t["likn_sizes"]), "",
        "Overlap of language pairs (mean Jaccard of the neuron sets, mean intersection):", "", _md(t["overlap"]), "",
        "Layer distribution (neurons of all facts; `independent` counts LIKN once per fact):", "", _md(layers), "",
        "## Suppressing and enhancing LIKN", "",
        f"Each fact's LIKN set ×0 / ×2 at the target position on every language's prompts; `random`: {s.n_random} "
        f"random sets of the same layers, `matched`: same layers and activation-magnitude decile; relative change of "
        f"P(target); p: share of random sets at least as extreme (floor 1/(N+1)). In-sample.", "",
        _md(t["likn_effects"]), "",
        "Each language's **specific** set (`source`) suppressed / enhanced on every language's prompts (does a "
        "language's own remainder act only on that language?):", "",
        _md(t["specific_effects"]), "",
        "## MATRICE vs plain intersection", "",
        f"MATRICE: mean − {s.k}·std over the query × language cells of max-normalised scores, ≥ {s.threshold} × "
        f"max (uniform cell weights, or weighted by P(target) = `confidence`). Stability: {s.n_resamples} "
        f"resamples, each language keeping a random half of its queries; mean Jaccard of the resamples' sets (facts "
        f"with one prompt in a language cannot be resampled).", "",
        _md(t["stability"]), "",
        "Held-out language: each set selected on every language but `held_out`, then suppressed / enhanced on the "
        "held-out language's prompts beside random sets (out of sample):", "",
        _md(t["heldout"], "(fewer than 3 languages: no language can be held out)"), "",
        "## Degenerate pairs", "",
        f"For the first {s.degenerate_facts} facts, in every language: among the top {s.degenerate_top} neurons by "
        "mean attribution, those whose single suppression lowers P(target) by < 20 % are candidates; a pair of "
        "candidates is degenerate when suppressing both lowers it by > 25 % (Chen et al., AAAI 2024, their code).",
        "", _md(t["degenerate"], "(not run: see the notes)"), "",
        "## Cross-lingual edits: KN update of LIKN vs MEMLA", "",
        f"Each of the first {s.edit_facts} facts edited in each edit language (rows) to another fact's object "
        "(its label in each language), judged in each evaluation language (columns): reliability (the language's "
        f"first prompt), generality (its other prompts), locality ({s.n_neighbours} other facts' prompts); EasyEdit "
        "conventions (docs/methods.md, editing evaluation). `kn-update`: Dai's update of the LIKN set (single-token "
        f"objects only); `memla`: MEMLA's masked update of the LIKN and the edit language's specific neurons "
        f"(≤ {s.memla_steps} Adam steps, half committed). Mean after the edit:", "",
        _md(pivot_matrix(t["edit_matrix"]) if len(t["edit_matrix"]) else t["edit_matrix"], "(not run: see the notes)"),
        "", "Cells skipped, by reason (never dropped silently):", "", _md(t["edit_skips"]), "",
        "The edits (size; MEMLA's steps and P(new) after the committed half):", "", _md(t["edit_sizes"]), "",
        *([f"Not done: {n}." for n in t["notes"].get("note", [])] + [""] if len(t["notes"]) else []),
        "## The papers' claims beside ours", "", *PAPERS, "",
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {s}.", "",
    ]
    return "\n".join(lines)
