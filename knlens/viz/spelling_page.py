"""The spelling-out study as a Markdown page: headline, probes by layer and character with selectivity, the
breakthrough, the model's own spelling, attention to the source token, character neurons, the paper's claims beside
ours, limitations. ``knlens study spelling --page benchmarks/SPELLING.md`` writes it."""

from __future__ import annotations

import pandas as pd

from knlens.studies.spelling_study import SpellingStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, phase_minutes, versions_line

__all__ = ["render_markdown", "PAPERS"]

PAPERS = [
    "- Hiraoka & Inui, \"Spelling-out is not Straightforward\" **[paper, unverified numbers]**: on ~7B models, "
    "probes on the embedding recover the first character well and later characters poorly; accuracy for later "
    "characters rises sharply in middle layers (a \"breakthrough\"): the spelling is rebuilt, not read from the "
    "embedding. Character neurons by IG; attention from the spelling steps back to the token.",
    "- Hewitt & Liang (2019) **[paper]**: a probe is meaningful only beside a control task; selectivity = task "
    "accuracy − control accuracy.",
]

LIMITATIONS = [
    "- One model of 135M parameters (the paper's are ~7B); its few-shot spelling is weak (see the accuracy table), "
    "so the probes read what the residual holds, not what the model uses to spell.",
    "- Features are read at the source token of the spelling prompt (after the few shots), the embedding without "
    "context; each word appears once, so train and test tokens are disjoint.",
    "- The control task (one random label per token type) cannot be memorised into a token-disjoint test set: its "
    "accuracy is what a probe reaches from the class balance, close to the majority rate by design of the split.",
    "- Classes (letters) with fewer than `min_per_class` words at a character index are left out of that probe "
    "(`dropped`); accuracies are on a test share of a few hundred words, so differences of a few points are noise.",
    "- Character neurons: integrated gradients on few words per character, only words the model spells right there.",
]


def _headline(r: SpellingStudy) -> list[str]:
    t, lines = r.tables, []
    c = t["counts"].iloc[0]
    lines.append(f"- **Tokens**: {c['spellable']} of {c['vocabulary']} vocabulary entries are spellable "
                 f"(leading space, ≥ {r.settings.min_chars} lowercase letters); {c['read']} of {c['sampled']} "
                 f"sampled were read ({c['skipped']} skipped).")
    a = t["accuracy"]
    lines.append("- **The model's own spelling** (teacher forced, top-1): " + ", ".join(
        f"character {int(x.character)} {x['top-1 accuracy']:.0%}" for _, x in a.iterrows()) + ".")
    p = t["probes"]
    if len(p):
        emb = p[p.feature_index == 0].set_index("k")
        best = p.loc[p.groupby("k")["accuracy"].idxmax()].set_index("k")
        lines.append("- **Probes** (accuracy / selectivity): embedding " + ", ".join(
            f"char {k + 1} {emb.accuracy[k]:.2f} / {emb.selectivity[k]:+.2f}" for k in emb.index) + "; best layer " +
            ", ".join(f"char {k + 1} {best.accuracy[k]:.2f} / {best.selectivity[k]:+.2f} ({best.feature[k]})"
                      for k in best.index) + ".")
    if len(t["breakthrough"]):
        b = t["breakthrough"].iloc[0]
        verdict = (f"**{b['layer']}**" if b["clear"] else
                   f"**none clear**: the rise ({b['rise']:+.2f}) is within two standard errors ({b['noise']:.2f}) of "
                   f"the test accuracy, so the rule's answer ({b['layer']}) is noise")
        lines.append(f"- **Breakthrough** ({b['rule']}): {verdict}; mean accuracy of characters ≥ 2 goes from "
                     f"{b['embedding']:.2f} (embedding) to {b['best']:.2f} ({b['best_feature']}); the largest single "
                     f"rise is {b['jump']:+.2f} at {b['largest_jump']}.")
    att = t["attention"]
    if len(att):
        peak = att.loc[att.groupby("k")["attention to the source"].idxmax()]
        lines.append("- **Attention** from the step emitting each character to the source token peaks at " + ", ".join(
            f"char {int(x.k) + 1}: layer {int(x.layer)} ({x['attention to the source']:.2f})" for _, x in peak.iterrows())
            + " (mean over heads and words).")
    n = t["neurons"]
    if len(n):
        ks = n.groupby("neuron")["k"].nunique()
        shared = sorted(ks[ks > 1].index)
        lines.append(f"- **Character neurons**: top neurons of {n.k.nunique()} character indices; "
                     + (f"{', '.join(shared)} rank among the top 5 of several characters (shared across "
                        "characters, so not specific to one)" if shared else
                        "no neuron is among the top 5 of two characters") + ".")
    return lines + [f"- Note: {n}" for n in r.notes]


def render_markdown(r: SpellingStudy) -> str:
    """The whole page (see the module)."""
    s, t = r.settings, r.tables
    timing = phase_minutes(r.timings)
    probes = t["probes"]
    wide = (probes.pivot_table(index=["feature_index", "feature"], columns="k", values=["accuracy", "selectivity"])
            if len(probes) else pd.DataFrame())
    if len(wide):
        wide.columns = [f"{v} c{k + 1}" for v, k in wide.columns]
        wide = wide.reset_index().drop(columns="feature_index")
    att = t["attention"].pivot_table(index="layer", columns="k", values="attention to the source")
    att.columns = [f"char {k + 1}" for k in att.columns]
    shots = " / ".join(f"` {w} : {' '.join(w)}`" for w in s.shots)
    lines = [
        "# Spelling-out (Hiraoka & Inui) — measured", "",
        f"{generated_by('knlens study spelling')}; wall time {r.timings.get('total', 0.0) / 60:.1f} min: {timing}.", "",
        versions_line(r.versions), "",
        "## Headline", "", *_headline(r), "",
        "## Probes by layer and character", "",
        f"26-way logistic regression (scikit-learn, standardised features, C = 0.1) predicting character k of a token "
        f"from its embedding (`hook_embed`) or from `hook_resid_post` of each layer at the token, in the spelling "
        f"prompt; {s.test_share:.0%} of the words held out (token-disjoint); letters with fewer than "
        f"{s.min_per_class} words left out. Control task: the labels permuted over token types (Hewitt & Liang); "
        "selectivity = accuracy − control accuracy.", "",
        markdown_table(wide) if len(wide) else "(no probes: see the notes)", "",
        "Every probe (with control accuracy, majority rate, sizes and dropped words):", "",
        markdown_table(probes.drop(columns="feature_index")) if len(probes) else "(none)", "",
        "## The model's own spelling", "",
        f"Few-shot prompt: {shots}, then ` word :` and the characters so far (teacher forced); top-1 = the model's "
        "top next token is the character (95 % bootstrap interval over words).", "",
        markdown_table(t["accuracy"]), "",
        "## Attention to the source token", "",
        "Attention weight (mean over heads and words) from the step that emits character k to the token being "
        "spelled, by layer:", "",
        markdown_table(att.reset_index()), "",
        "## Character neurons", "",
        f"Integrated gradients ({s.steps} Gauss–Legendre nodes, P(character) as target, `hook_post`) on up to "
        f"{s.neuron_words} words per character index that the model spells right there. Top 5 neurons by mean score, "
        f"with the share of words holding each in their own top {s.top}:", "",
        markdown_table(t["neurons"].assign(k=t["neurons"].k + 1).rename(columns={"k": "character"}))
        if len(t["neurons"]) else "(none)", "",
        "Share of the positive attribution per layer, by character (mean over words):", "",
        (markdown_table(t["neuron_layers"].assign(k=(t["neuron_layers"].k + 1).map("char {}".format)).pivot_table(
            index="layer", columns="k", values="share of positive attribution").reset_index())
         if len(t["neuron_layers"]) else "(none)"), "",
        "## Counts", "", markdown_table(t["counts"]), "",
        "## The papers' claims beside ours", "", *PAPERS, "",
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {s}.", "",
    ]
    return "\n".join(lines)
