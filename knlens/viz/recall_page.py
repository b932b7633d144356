"""The recall study as a Markdown page: headline numbers, the filter counts, recall scores beside matched random
sets, accuracy under enhance / suppress with and without chain of thought, the conflict prompt, the paper's
claims beside ours, limitations.

``knlens study recall --page benchmarks/RECALL.md`` writes it; statements are computed from the tables, never
fixed wording.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from knlens.data.two_hop import CHAINS
from knlens.methods.recall import RECALL_RULE
from knlens.studies.recall_study import RecallStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, phase_minutes, versions_line

__all__ = ["render_markdown", "PAPER"]

PAPER = [
    "- Wang et al. (EMNLP 2024) **[paper]**: on their 4,450 two-hop questions, over a third of the reasoning errors "
    "come with a failed recall of the first hop's knowledge neurons; chain-of-thought prompting raises the recall "
    "score; enhancing the first hop's neurons raises two-hop accuracy and suppressing them lowers it, more than "
    "random neurons do; a context that states a conflicting first hop can raise retrieval.",
    "- Their models are 7B–13B chat models (LLaMA-2, etc.) answering free-form with a generated chain of thought; "
    "the exact score definition and threshold are **[unverified]** here (docs/methods.md, factual recall in reasoning).",
]

LIMITATIONS = [
    "- One model of 135M parameters (SmolLM2): it answers few first hops of ParaRel chains (place, citizenship "
    "and origin hardly ever); the questions that survive the known filter have famous bridges (capitals, large "
    "countries). Where the first hop is unknown the composed question is still often answered (the `two-hop "
    "correct` column): continents and capitals can be guessed from the subject without the first hop.",
    "- The chain of thought is scaffolded, not free: the model completes the first hop's first answered ParaRel "
    "prompt (its bridge) and then answers the second hop's first answered prompt about the bridge it stated. At the step that emits the "
    "bridge it reads a first-hop prompt, so `peak cot emit` is close to 1 by construction when that prompt was "
    "one of the reference prompts; `peak cot after` (the positions after the bridge) is the informative one.",
    "- Composed questions come from one hand-written template per chain (knlens/data/two_hop.py), not paraphrased; "
    "the conflict prompt of every question of a chain states the same false bridge (the first other question's).",
    "- Few questions (a budget-capped run) and few random draws per question: the confidence intervals are wide, "
    "and a difference between knowledge and random sets within them is not a finding.",
    "- ParaRel joins hops on labels, not Wikidata ids; ambiguous bridges (several second-hop objects) are dropped.",
    "- Every set's score is normalised by its own single-hop activation. Knowledge neurons are chosen for being "
    "active there, random neurons mostly are not, so a random set's normalised peak elsewhere is easily above 1: "
    "compare the sets through the specific rule (the same set on another question) rather than the raw peak.",
]


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.0%}"


def _headline(r: RecallStudy) -> list[str]:
    n, acc = r.numbers, r.tables["accuracy"]

    def row(cot: bool, action: str, kind: str) -> pd.Series | None:
        m = acc[(acc.cot == cot) & (acc.action == action) & (acc.neurons == kind)]
        return None if m.empty else m.iloc[0]

    rule = RECALL_RULE.replace("threshold (0.5)", str(r.settings.threshold))
    lines = [f"- **Questions studied**: {int(n['questions'])} (both hops known); recall rate {_pct(n['recall rate'])} "
             f"of the questions (rule: {rule}); matched random sets pass the same rule on "
             f"{_pct(n['recall rate, matched random sets'])}"
             + (" — so the rule does not single out the first hop's neurons here." if
                n["recall rate, matched random sets"] >= 0.5 * n["recall rate"] else "."),
             f"- **Specific recall** (recalled, and the peak is above the same set's peak over another question of the "
             f"chain, with another subject and bridge): {_pct(n['specific recall rate'])} (matched random sets "
             f"{_pct(n['specific recall rate, matched random sets'])}); mean peak over the other question "
             f"{n['mean peak, other question']:.2f}.",
             f"- **Mean peak recall score** of the first hop's neurons: question {n['mean peak, question']:.2f}, chain of "
             f"thought after the bridge {n['mean peak, CoT after the bridge']:.2f} (at the emitting step "
             f"{n['mean peak, CoT emitting step']:.2f}, see limitations), question after a false first hop "
             f"{n['mean peak, conflict']:.2f}.",
             f"- **Accuracy**: {_pct(n['accuracy without CoT'])} without chain of thought, {_pct(n['accuracy with CoT'])} "
             f"with it (bridge stated correctly in {_pct(n['bridge correct in CoT'])}).",
             f"- **Shortcut share** (answered correctly without CoT but not recalled): {_pct(n['shortcut share'])} "
             f"({_pct(n['shortcut share, specific rule'])} by the specific rule); **failed recall among the errors**: "
             f"{_pct(n['failed recall among errors'])} ({_pct(n['failed specific recall among errors'])} by the "
             "specific rule; paper: over a third)."]
    for cot in (False, True):
        parts = []
        for action in ("enhance", "suppress"):
            k, m = row(cot, action, "knowledge"), row(cot, action, "matched")
            if k is not None and m is not None:
                parts.append(f"{action} → accuracy {_pct(k.accuracy)} (matched random {_pct(m.accuracy)}), relative "
                             f"ΔP(answer) {k['relative ΔP']:+.2f} [{k['ΔP CI low']:+.2f}, {k['ΔP CI high']:+.2f}] "
                             f"(random {m['relative ΔP']:+.2f} [{m['ΔP CI low']:+.2f}, {m['ΔP CI high']:+.2f}])")
        base = row(cot, "none", "none")
        if base is not None and parts:
            lines.append(f"- **{'With' if cot else 'Without'} CoT** (no intervention {_pct(base.accuracy)}): "
                         + "; ".join(parts) + ".")
    lines.append(f"- **Conflict** (the question after a sentence stating another question's bridge): true answer "
                 f"{_pct(n['conflict accuracy (true answer)'])}, the false bridge's answer "
                 f"{_pct(n['conflict: false answer given'])}.")
    return lines


def render_markdown(r: RecallStudy) -> str:
    """The whole page (see the module)."""
    s, t = r.settings, r.tables
    timing = phase_minutes(r.timings)
    rec = t["recall"]
    rec_means = rec.groupby("neurons", sort=False)[[c for c in rec.columns if c.startswith("peak ")]
                                                   + ["recalled", "recalled, specific", "recalled in conflict"]
                                                   ].mean().reset_index()
    chains = pd.DataFrame([{"chain": f"{a}->{b}", "composed question": tpl} for (a, b), tpl in CHAINS.items()])
    conflict = t["answers"][t["answers"].action == "conflict"]
    lines = [
        "# Factual recall in two-hop reasoning (ParaRel) — measured", "",
        f"{generated_by('knlens study recall')}; wall time {r.timings.get('total_s', 0.0) / 60:.1f} min "
        f"(minutes: {timing}).", "",
        versions_line(r.versions), "",
        "## Headline", "", *_headline(r), "",
        "## Questions and filters", "",
        f"Two-hop questions chain ParaRel facts (s, r₁, o₁), (o₁, r₂, o₂) on the bridge label o₁; {s.candidates} "
        f"random candidates per chain (seed {s.seed}); a hop is known when the model's greedy answer is its object on "
        f"at least {s.min_prompts} of its first {s.max_prompts} ParaRel prompts; `two-hop correct` is the composed "
        "question answered greedily by every candidate, known or not. Questions are studied chain by chain in turn "
        f"while the budget of {s.budget_minutes} min lasts (at most {s.max_questions}).", "",
        markdown_table(t["counts"]), "",
        "Composed-question templates:", "", markdown_table(chains), "",
        "## Recall scores", "",
        f"The first hop's neurons: integrated gradients ({s.steps} Gauss–Legendre nodes) on up to "
        f"{s.attribute_prompts} answered first-hop prompts, Dai's coarse sets (t = 0.2) refined to the neurons in ≥ 70 % "
        "of them (no minimum count: with two prompts, their intersection), the 5 best by mean score when it keeps none. Score at a position = Σ sign(a*)·a / Σ|a*| over the set (a* its activation at the "
        "single-hop prompt's last token): 1 = as active as when the model answers the first hop. Peaks over the "
        "question, over the chain of thought at the bridge-emitting step and after it, over the question part "
        "of the conflict prompt, and over another question of the same chain (another subject and bridge: how much "
        f"the set fires without its fact); {s.n_random} matched random sets per question (same layers and activation-"
        "magnitude deciles), each against its own single-hop level. Means over questions (random: over draws):", "",
        markdown_table(rec_means), "",
        "## Accuracy under enhance and suppress", "",
        "×2 (enhance) or ×0 (suppress) of the set at every position of the question, and at every generated step "
        "of the chain of thought and over its answer; `relative ΔP` is the change of P(answer) against no "
        "intervention per question, averaged, with a 95 % bootstrap CI over questions; random rows pool the draws.",
        "", markdown_table(t["accuracy"]), "",
        "## Contextual conflict", "",
        "The question preceded by `{first-hop prompt} {another question's bridge}.` (no intervention): P and "
        "correctness of the true answer and of the false bridge's answer.", "",
        markdown_table(conflict[["question", "bridge", "p", "correct", "p false", "false answered"]])
        if len(conflict) else "(none)", "",
        "## Questions", "", markdown_table(t["questions"].drop(columns=["cot prompt"])), "",
        "## The paper's claims beside ours", "", *PAPER, "",
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {s}.", "",
    ]
    return "\n".join(lines)
