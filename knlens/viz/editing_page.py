"""The editing study as a Markdown page: headline, the editors × metrics table, the facts counted at each filter,
the papers' numbers beside ours, limitations.

``knlens study editing --page benchmarks/EDITING.md`` writes it; verdicts follow paired permutation tests over
facts (α = 0.05), never fixed wording.
"""

from __future__ import annotations

import pandas as pd

from knlens.studies.editing_study import EDITORS, NOT_DEFINED, EditingStudy
from knlens.viz.editing_criteria_page import criteria_headline, criteria_section
from knlens.viz.query_localization_page import ALPHA, generated_by, markdown_table, versions_line

__all__ = ["render_markdown", "PAPERS", "METRIC_TEXT"]

METRIC_TEXT = {
    "reliability": "EasyEdit accuracy of the new object on the edit prompt (share of its tokens that are the argmax)",
    "reliability_es": "CounterFact efficacy: P(new) > P(old) on the edit prompt (per-token NLL)",
    "reliability_old": "EasyEdit accuracy of the old object on the edit prompt after the edit (1 before: known facts)",
    "generality": "EasyEdit accuracy of the new object on the paraphrases",
    "generality_ps": "CounterFact paraphrase score: share of paraphrases with P(new) > P(old)",
    "locality": "EasyEdit locality: share of the neighbours' argmax tokens (along their true object) unchanged",
    "locality_gold": "accuracy of the neighbours' true objects after the edit (1 before: known facts)",
    "locality_ns": "CounterFact neighbourhood score: share of neighbour prompts with P(true) > P(new)",
    "perplexity_change": "perplexity after / before − 1 on the text sample",
}
"""The field's metrics; the criteria's are in :data:`knlens.viz.editing_criteria_page.CRITERIA_TEXT`."""

PAPERS = pd.DataFrame([
    {"source": "Meng et al. 2022 (ROME), CounterFact", "model": "GPT-2 XL", "editor": "ROME",
     "reliability": "ES 100.0", "generality": "PS 96.4", "locality": "NS 75.4", "tag": "[unverified]"},
    {"source": "EasyEdit README, KnowEdit WikiData_counterfact", "model": "Llama-2-7b-chat", "editor": "ROME",
     "reliability": "83.2 (edit success)", "generality": "38.7 (portability)", "locality": "65.4", "tag": "[code]"},
    {"source": "Niu et al. 2024 (ICLR), project page", "model": "BERT, GPT-2, LLaMA-2", "editor": "KN edit, ROME",
     "reliability": "KN edits shift the output distribution but rarely change the categorical prediction",
     "generality": "symmetry and synonymy low: neither editor is robust to bijective symmetry or synonymous "
                   "invariance (no numbers quoted here)", "locality": "—", "tag": "[paper]"},
    {"source": "Wei et al. 2024 (CIKM), entity vs relation", "model": "GPT-2 XL, GPT-J", "editor": "ROME, MEMIT, KN, FT",
     "reliability": "relation edits: success = NLL(relation) < NLL(None)",
     "generality": "relational knowledge is encoded largely in attention, not only MLP neurons", "locality": "—",
     "tag": "[code] / [unverified]"},
    {"source": "Dai et al. 2022 (ACL)", "model": "BERT-base", "editor": "KN update / erase",
     "reliability": "update success below one half; erasing raises the erased relation's perplexity",
     "generality": "—", "locality": "small effect on other relations", "tag": "[unverified]"},
])

LIMITATIONS = [
    "- A 135M-parameter model knows few ParaRel facts (most relations have almost none answered on two paraphrases); "
    "the sample is small and leans on a few relations, and results may not carry to larger models.",
    "- Generic neurons are counted among the facts located in phase 1, a few per relation: the rule (more than "
    "10 % of them and two at least) is coarse with so few facts, and a neuron generic across relations but seen "
    "once per relation is kept.",
    "- Dai's refinement keeps a neuron coarse in ≥ max(0.7·n, 3) prompts; with two or three answered paraphrases it "
    "often keeps none, and the top mean-attribution neurons stand in (counted per fact).",
    "- Neighbours are other facts of the same relation (EasyEdit-style locality), not CounterFact's prompts about "
    "subjects that share the old object.",
    "- The rank-one edit uses the bare edit prompt as its only context (ROME averages over ~20 sampled prefixes) and "
    "knlens' default layer (a quarter of the way up), not a layer chosen by causal tracing for this model.",
    "- One edit at a time, undone before the next: no sequential or batched editing.",
    "- Bijective symmetry rests on the bijective capital relations (P36, P1376): the model answers none of the "
    "read facts of the symmetric P47 and P530 (many objects are true there, ParaRel keeps one), so their rows are "
    "counted but empty. The reverse prompts' reference object is the counterpart's subject; other answers may be "
    "true as well.",
    "- Synonymous invariance rests on P101 alone (the only relation with a synonymous reading), which the model "
    "seldom knows; its cells stand on few facts (n in each cell).",
    "- The relation question's wording and the relation words are knlens' own, and on SmolLM2-135M it does not tell "
    "true pairs from false ones (\" None\" wins on every country–city pair tried, docs/methods.md): `relation` "
    "after an edit shows the edit's spill-over onto the question, not knowledge of the relation.",
    "- The relation-key rank-one edit reads its key at the prompt's last token when the subject comes first "
    "(object-last templates), i.e. the position the KN neurons are read at.",
]


def _interval(row: pd.Series) -> str:
    return f"{row['mean']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"


def _headline(r: EditingStudy) -> list[str]:
    ev, n = r.evaluation, r.numbers
    m = ev.metrics().set_index(["editor", "metric"])
    counts = r.tables["counts"]
    lines = [f"- **{int(n['facts'])} facts** edited ({', '.join(f'{a} {b}' for a, b in zip(counts.relation, counts.studied) if b)}) "
             f"of {int(n['cases'])} that passed every filter, in {r.timings['total'] / 60:.1f} min "
             f"({n['mean_seconds_per_fact']:.0f} s per fact, all editors)."]
    for a, b, metric in (("rank-one", "random-rank-one", "reliability"), ("kn-update", "random-kn", "reliability_es"),
                         ("kn-update", "random-kn", "reliability"), ("kn-update", "kn-update-generic-kept", "locality"),
                         ("kn-consistency-aware", "kn-update", "generality_ps"),
                         ("rank-one", "kn-update", "generality"), ("rank-one", "kn-update", "locality")):
        if (a, metric) not in m.index or (b, metric) not in m.index:
            continue
        t = ev.compare(a, b, metric)
        verdict = ("higher" if t["difference"] > 0 else "lower") if t["p"] < ALPHA else "no significant difference"
        lines.append(f"- **{a}** vs **{b}**, {metric}: {_interval(m.loc[(a, metric)])} vs "
                     f"{_interval(m.loc[(b, metric)])}; paired difference {t['difference']:+.3f}, p = {t['p']:.2g} "
                     f"({verdict}).")
    g = r.tables["generic"]
    if len(g):
        lines.append(f"- **Generic neurons** (in the KN sets of more than {r.settings.generic_share:.0%} of a relation's "
                     f"{int(n['located'])} located facts, and of two at least): "
                     + "; ".join(f"{a} {b} ({c or 'none'})" for a, b, c in zip(g.relation, g["generic neurons"],
                                                                              g["most frequent"]))
                     + f". Before their removal {n['shared_neurons']:.0%} of the edited facts' KN neurons were shared "
                     "with another edited fact of the relation.")
    fl = ev.fluency.assign(ratio=ev.fluency.ppl_after / ev.fluency.ppl_before)
    robust = fl.groupby("editor", sort=False).ratio.agg(median="median", doubled=lambda x: float((x >= 2).mean()))
    if len(robust):
        lines.append("- **Perplexity** after / before, median over facts (share of facts where it at least doubled): "
                     + "; ".join(f"{e} {v['median']:.3g} ({v['doubled']:.0%})" for e, v in robust.iterrows())
                     + ". The mean of `perplexity_change` below is dominated by the few edits that break the model.")
    if ("kn-erase", "reliability_old") in m.index:
        lines.append(f"- **kn-erase** leaves the old object the answer to the edit prompt in "
                     f"{m.loc[('kn-erase', 'reliability_old'), 'mean']:.0%} of facts; kn-update in "
                     f"{m.loc[('kn-update', 'reliability_old'), 'mean']:.0%}.")
    return lines


def render_markdown(r: EditingStudy) -> str:
    """The whole page (see the module)."""
    s, ev, t = r.settings, r.evaluation, r.tables
    m = ev.metrics()
    wide = ev.table().set_index("editor").reindex([e for e in EDITORS if e in set(m.editor)])
    for (editor, metric) in NOT_DEFINED:
        if editor in wide.index and metric in wide.columns:
            wide.loc[editor, metric] = "not defined"
    wide = wide.reset_index()
    long = m.assign(interval=[f"[{a:.3g}, {b:.3g}]" for a, b in zip(m.ci_low, m.ci_high)])[
        ["editor", "metric", "convention", "before", "mean", "interval", "n_facts"]]
    sizes = ev.edits.groupby("editor", sort=False)[["n_changed", "delta_norm"]].mean().reset_index()
    facts = t["facts"]
    done = facts[facts.skipped == ""]
    text_note = ev.settings.text if s.n_text else "none"
    lines = [
        "# Knowledge editing on ParaRel — measured", "",
        f"{generated_by('knlens study editing')}; wall time {r.timings['total'] / 60:.1f} min (filters "
        f"{r.timings['filter'] / 60:.1f}); budget {s.budget_minutes:g} min.", "",
        versions_line(r.versions), "",
        "## Headline", "", *_headline(r), *criteria_headline(r), "",
        "Mean over facts [95 % bootstrap interval over facts] after the edit (before the edit: next table):", "",
        markdown_table(wide), "",
        "## Facts", "",
        f"Model `{s.model}`. Per relation, `knlens.data.load_pararel` reads a random subset (seed {s.seed}) of "
        f"{s.candidates} facts ({s.synonym_candidates} for a relation with a synonymous reading, P101; object-last "
        "templates); a fact is **known** when the model's greedy continuation is "
        f"the whole object on at least {s.min_prompts} paraphrases, and only those are kept (at most {s.max_prompts}: "
        "the first is the edit prompt, the others its paraphrases). The object must be **one token** (Dai's update "
        "adds one token's vector); the **new object** is the object of the next known fact of the relation that has "
        "a different one and another subject (the case's counterpart); **neighbours** are up to "
        f"{s.neighbours} other known facts of the relation whose object is not the new one ({s.neighbour_prompts} "
        "prompts each). Facts are taken round robin over the relations until "
        f"the budget of {s.budget_minutes:g} min (counted from the start) would be overrun.", "",
        markdown_table(t["counts"]), "",
        "## Editors", "",
        f"- `kn-update`: Dai et al.'s update of the fact's neurons' value slots (λ₁ = 1, λ₂ = 8, signs from the "
        f"neurons' activations). Neurons: integrated gradients ({s.steps} Gauss–Legendre nodes) on the fact's "
        f"paraphrases, Dai's refinement (t = 0.2, p = 0.7 ± 0.05), without the relation's generic neurons; when "
        f"nothing is left (or refinement kept none), the top {s.fallback_k} non-generic neurons by mean normalised "
        f"attribution ({int(r.numbers['refined'])} of {int(r.numbers['facts'])} facts refined; mean "
        f"{r.numbers['mean_neurons']:.1f} neurons). Generic neurons are found among the facts located first: "
        f"{s.locate_share:.0%} of the budget left after the filters locates {int(r.numbers['located'])} facts, of "
        "which the first ones are edited.",
        "- `kn-update-generic-kept`: the same update on the set before the generic neurons were removed.",
        "- `kn-erase`: the `kn-update` value slots set to zero (Dai et al.'s code).",
        "- `kn-consistency-aware`: the update on the top k non-generic neurons of mean − std of the paraphrases' "
        "normalised attributions (Chen et al., ICLR 2025), k = the `kn-update` set's size.",
        "- `random-kn`: random neurons in the same layers as the `kn-update` set, moved in a random direction with the "
        "same Frobenius norm.",
        f"- `rank-one`: the rank-one edit of the edit prompt at layer "
        f"{s.rank_one_layer if s.rank_one_layer is not None else 'n_layers // 4'} ({s.rank_one_steps} optimisation "
        f"steps, key statistics from {s.covariance_texts} sentences of part 0 of the text sample), key at the subject's "
        "last token (the entity edit).",
        "- `rank-one-relation`: the same edit with the key at the relation's last token (Wei et al.'s relation edit).",
        f"- `random-rank-one`: {s.control_neurons} random neurons of that layer moved with the rank-one edit's norm.", "",
        "Generic neurons per relation (count of located facts whose set holds each):", "",
        markdown_table(t["generic"]), "", "Mean size of the edits:", "", markdown_table(sizes), "",
        "## Metrics", "",
        *[f"- `{k}`: {v}" for k, v in METRIC_TEXT.items()], "",
        f"Perplexity sample: {text_note}. Each edit is built on the unedited model, applied, measured and undone; the "
        "model's weights are checked to be the ones it started with at the end of every fact. The neighbours are facts "
        "the model knows (their pre-edit argmax is the gold object), so EasyEdit's `locality` (agreement with the "
        "pre-edit predictions) and `locality_gold` coincide here; they differ on neighbours the model gets wrong.", "",
        markdown_table(long), "",
        *criteria_section(r),
        "## The papers' numbers beside ours", "",
        "Different models, data and conventions: for orientation, not as targets.", "",
        markdown_table(PAPERS), "",
        "## Per fact", "", markdown_table(done.drop(columns=["skipped"])), "",
        *([f"Skipped: {', '.join(f'{a} ({b})' for a, b in zip(facts.fact, facts.skipped) if b)}.", ""]
          if (facts.skipped != "").any() else []),
        "## Limitations", "", *LIMITATIONS, "",
        f"Settings: {s}.", "",
    ]
    return "\n".join(lines)
