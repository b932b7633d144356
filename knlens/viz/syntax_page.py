"""The syntax study as a Markdown page: headline, the comparison of syntax with ParaRel facts, every table, the
papers' findings beside ours, limitations.

``knlens study syntax --page benchmarks/SYNTAX.md`` writes it; statements follow the tests (α = 0.05), never fixed
wording.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from knlens.studies.syntax_data import TASKS, WORD_CLASSES
from knlens.studies.syntax_study import SyntaxStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, phase_minutes, versions_line

__all__ = ["render_markdown", "PAPERS"]

PAPERS = [
    "- Niu et al. (ICLR 2024), their code **[code]**: neurons are searched over the whole prompt set of a "
    "target (t = 0.2, p = 0.7 ± 0.05, ≤ 20 rounds, 2–5 neurons); suppressing the number neuron shifts the "
    "probabilities of determiners significantly (t-test, p < 0.05) but rarely flips the top prediction.",
    "- Niu et al., project page **[paper]**: editing KN activations has only limited impact on categorical "
    "predictions, its effect shows in shifts of the output distribution; KNs of linguistic and of factual tasks "
    "share similar characteristics of localisation (their n-sample similarity).",
    "- Dai et al. (2022) **[unverified]**: suppressing a fact's knowledge neurons lowers P(target) by about 29 % "
    "(BERT-base, relative), enhancing raises it by about 31 %; unrelated facts move by 1–2 %.",
    "- This repository, `benchmarks/QUERY_LOCALIZATION.md` (same model, ParaRel P36/P1376, coarse sets of ~20 "
    "neurons per prompt rather than refined sets): suppressing a query's own neurons changes P(target) by about "
    "−0.56 (relative), random sets by about 0.",
]

LIMITATIONS = [
    "- A left-to-right model reads a determiner before its noun: in the determiner task (Niu et al.'s decoder "
    "reading) the prompt holds no cue to the number, so the \"singular\" set is the set of neurons that favour "
    "this/that where the sentence happens to use them, not neurons that compute agreement. The subject–verb task "
    "does carry the cue (the subject precedes the verb).",
    "- Subject–verb items are mostly auxiliaries (has/hasn't, is/isn't, was/wasn't); its plural set is smaller "
    "and its prompts are short (often a name).",
    "- Refinement adapts p for up to 20 rounds towards 2–5 neurons; a set outside that range is reported as found.",
    "- Suppression is ×0 at the last position only; relative changes of small probabilities are noisy, so the "
    "absolute change and the t-tests are reported beside them.",
    "- The ParaRel facts have 3–6 paraphrases against dozens of syntax prompts; the similarity is also given on "
    "random subsets of the same size, and the ParaRel rows are means over facts.",
    "- The random control of an edit has the KN edit's norm ‖ΔW‖, but a value slot's effect is its neuron's "
    "activation times its change: the number neurons include massive-activation neurons (mean |a| of 10–60 at "
    "the last token), so a random edit of the same norm on ordinary neurons moves the output far less.",
    "- One model (135M parameters); the paper's models (BERT, GPT-2, LLaMA-2) are larger.",
]


def _headline(r: SyntaxStudy) -> list[str]:
    t = r.tables
    loc, supp, flips, edits = t["localisation"], t["suppression"], t["flips"], t["edits"]
    lines = []
    for row in loc.to_dict("records"):
        lines.append(f"- **{row['task']} {row['number']}**: {row['neurons']} neuron(s) ({row['neurons list'] or 'none'}) "
                     f"from {row['prompts']} prompts (p = {row['p']:.2f} after {row['rounds']} rounds), similarity "
                     f"{row['similarity']:.3f}.")
    if len(supp):
        held = supp[supp.prompts_of == "same number, held out"]
        sig = held[held.significant]
        lines.append(f"- **Suppression** on held-out prompts of the set's own number: {len(sig)} of {len(held)} "
                     "(set, quantity) changes are significant by the t-test and against both random controls: "
                     + ("; ".join(f"{a} {b}: {q} {rel:+.1%}" for a, b, q, rel in
                                  zip(sig.task, sig.number, sig.quantity, sig.relative)) or "none") + ".")
    if len(flips):
        f = flips[(flips.prompts_of == "same number, held out") & (flips.set == "knowledge")]
        m = flips[(flips.prompts_of == "same number, held out") & (flips.set == "matched")]
        lines.append(f"- **Top prediction** changed on {f['top prediction changed'].mean():.0%} of held-out prompts "
                     f"(mean over sets; matched random sets {m['top prediction changed'].mean():.0%}); the grammatical "
                     f"vs ungrammatical preference flipped on {f['good vs bad flipped'].mean():.0%} "
                     f"({m['good vs bad flipped'].mean():.0%}).")
    if len(edits):
        e = edits[edits.editor == "kn-update"].pivot_table(index=["task", "number"], columns="metric",
                                                           values="mean").reset_index()
        r_ = edits[edits.editor == "random-kn"].pivot_table(index=["task", "number"], columns="metric",
                                                            values="mean").reset_index()
        before = edits[(edits.editor == "kn-update") & (edits.metric == "reliability_es")].set_index(
            ["task", "number"])["before"]
        lines.append("- **KN edit of number** (rewrite to the ungrammatical token): the share of prompts where it then "
                     "beats the grammatical one (before the edit), EasyEdit locality on the other task's prompts, and "
                     "the mean perplexity change — " + "; ".join(
                         f"{k['task']} {k['number']}: {k['reliability_es']:.0%} ({before[(k['task'], k['number'])]:.0%}), "
                         f"locality {k['locality']:.2f}, perplexity {k.get('perplexity_change', np.nan):+.3g} (random "
                         f"neurons of the same norm: {x['reliability_es']:.0%}, {x['locality']:.2f}, "
                         f"{x.get('perplexity_change', np.nan):+.3g})"
                         for k, x in zip(e.to_dict("records"), r_.to_dict("records"))) + ".")
    comp = t["comparison"]
    if len(t["pararel"]):
        p = comp[comp["prompt set"] == "ParaRel facts"].iloc[0]
        sim = f"similarity (n={r.settings.subset})"
        lines.append(f"- **Syntax beside facts**: syntax sets of {loc.prompts.min()}–{loc.prompts.max()} prompts have "
                     f"{loc.neurons.min()}–{loc.neurons.max()} neurons and similarity {loc.similarity.min():.3f}–"
                     f"{loc.similarity.max():.3f} ({loc[sim].min():.3f}–{loc[sim].max():.3f} on subsets of "
                     f"{r.settings.subset}); {p['sets']} ParaRel facts have {p['neurons']} neurons and similarity "
                     f"{p['similarity (all prompts)']} ({p[sim]} on subsets; mean [95 % CI]) over their paraphrases.")
    return lines


def _classes() -> pd.DataFrame:
    return pd.DataFrame([{"task": task, "phenomenon": TASKS[task], **{c: ", ".join(w) for c, w in classes.items()}}
                         for task, classes in WORD_CLASSES.items()])


def render_markdown(r: SyntaxStudy) -> str:
    """The whole page (see the module)."""
    s, t = r.settings, r.tables
    timing = phase_minutes(r.timings)
    dropped = t["classes"][~t["classes"]["single token"]]
    supp_cols = ["task", "number", "prompts_of", "quantity", "prompts", "p_before", "change", "relative", "p_ttest",
                 "uniform_change", "p_vs_uniform", "matched_change", "p_vs_matched", "p_empirical_matched",
                 "significant"]
    lines = [
        "# Syntax through the knowledge-neuron instruments (BLiMP) — measured", "",
        f"{generated_by('knlens study syntax')}; wall time {r.timings.get('total', 0.0) / 60:.1f} min: "
        f"{timing}.", "",
        versions_line(r.versions), "",
        "## Headline", "", *_headline(r), "",
        "## Syntax beside facts", "",
        "Localisation metrics of each syntax prompt set and of ParaRel facts (mean [95 % bootstrap CI] over facts), "
        f"found and measured the same way: Niu's search (t = 0.2, p = 0.7 ± 0.05, ≤ 20 rounds, towards 2–5 neurons) "
        f"over the set's integrated gradients ({s.steps} Gauss–Legendre nodes); similarity = (σ₁² − 1)/(n − 1) of "
        f"the row-normalised attribution vectors, over all prompts and as the mean over random subsets of "
        f"{s.subset}; suppression ×0 at the last position on the prompts the set was found on (relative change of "
        "P(target); `matched random`: random sets of the same layers and activation-magnitude bins).", "",
        markdown_table(t["comparison"]), "",
        "## Prompt sets", "",
        "BLiMP pairs read as a decoder reads them (the prompt is the sentence up to the first token where the two "
        "sentences differ; targets: that token of each). Kept when both tokens are single (or only the first token "
        f"differs). Disjoint random parts (seed {s.seed}) of each number: {s.locate} prompts to locate, {s.heldout} "
        f"held out for suppression, {s.edits} to edit.", "",
        markdown_table(t["counts"]), "",
        "Word classes read at the prompt's last position (probabilities summed over each class):", "",
        markdown_table(_classes()), "",
        *([f"Left out (not one token): {', '.join(dropped.word)}.", ""] if len(dropped) else []),
        "## Localisation", "", markdown_table(t["localisation"]), "", markdown_table(t["neurons"]), "",
        "Overlap of the sets (do singular and plural, or the two tasks, share neurons?):", "",
        markdown_table(t["overlap"]), "",
        "## Suppression", "",
        f"Zero the set at the last position. Per (prompts, quantity): mean P before, mean change, relative change "
        f"(mean change / mean P before), one-sample t-test of the per-prompt change (`p_ttest`), and paired t-tests "
        f"against the mean change of {s.n_random} random sets of each control (`p_vs_uniform`: same layers; "
        "`p_vs_matched`: same layers and activation-magnitude bins); `p_empirical_matched` = share of matched random "
        "sets with a mean change at least as large in the same direction. **Significant** = all three t-tests "
        "below 0.05. `good`/`bad`: each prompt's grammatical / ungrammatical token.", "",
        markdown_table(t["suppression"][supp_cols]) if len(t["suppression"]) else "(no set to suppress)", "",
        "How often the top prediction, the singular-vs-plural preference and the grammatical-vs-ungrammatical "
        "preference change (random sets: mean over draws):", "",
        markdown_table(t["flips"]) if len(t["flips"]) else "(none)", "",
        "## Editing grammatical number", "",
        f"Dai's KN update (λ₁ = 1, λ₂ = 8) of the set's value slots rewrites each of {s.edits} other prompts from its "
        f"grammatical to its ungrammatical token; up to {s.generality} prompts with the same grammatical token are its "
        "paraphrases (generality), two prompts of the other task its neighbours (locality); `random-kn` moves random "
        f"neurons of the same layers with the same norm; perplexity on {s.n_text} sentences. Metrics as in "
        "`benchmarks/EDITING.md`.", "",
        markdown_table(t["edits"][["task", "number", "editor", "metric", "before", "mean", "ci_low", "ci_high",
                                   "n_facts"]]) if len(t["edits"]) else "(none)", "",
        "## ParaRel facts of the comparison", "",
        markdown_table(t["pararel_counts"]) if len(t["pararel_counts"]) else "(none)", "",
        markdown_table(t["pararel"]) if len(t["pararel"]) else "", "",
        "## The papers' findings beside ours", "", *PAPERS, "",
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {s}.", "",
    ]
    return "\n".join(lines)
