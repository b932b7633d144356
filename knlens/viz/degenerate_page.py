"""The page of ``knlens study degenerate`` (benchmarks/DEGENERATE.md): facts surviving each filter, clusters and
degenerate components per clustering method, robustness to typos, fact checking, beside the papers' claims."""

from __future__ import annotations

import pandas as pd

from knlens.stats.intervals import bootstrap_ci
from knlens.studies.degenerate_study import DegenerateStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, phase_minutes, versions_line

__all__ = ["render_markdown", "robustness_summary"]

CLAIMS = (
    "Chen et al. (2024) report that degenerate knowledge neurons exist for many facts in GPT-2 and LLaMA-2 and that "
    "their topology-based clustering finds components that pass the functional filter more often than average "
    "linkage, DBSCAN or k-means; that suppressing a fact's DKNs makes its recall less robust to perturbed queries; "
    "and (with Chen et al., AAAI 2024) that a relation's frequent DKNs separate true from false objects. These are "
    "the papers' qualitative claims; their numbers were not verified here (docs/methods.md lists none), so none is "
    "set beside the measurements as a target.")


def robustness_summary(rob: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per neuron set kind and condition: facts, mean P on the original and the perturbed prompts, mean retained
    share with a 95 % bootstrap interval over facts.

    >>> rob = pd.DataFrame({"fact": ["a", "b"], "condition": ["intact"] * 2, "neuron_set": ["dkn"] * 2,
    ...                     "p_original": [0.5, 0.4], "p_perturbed": [0.25, 0.4], "retained": [0.5, 1.0]})
    >>> robustness_summary(rob)[["facts", "retained"]].values.tolist()
    [[2.0, 0.75]]
    """
    rows = []
    for (kind, cond), g in rob.groupby(["neuron_set", "condition"], sort=False):
        lo, hi = bootstrap_ci(g["retained"].to_numpy(dtype=float), seed=seed)
        rows.append({"neuron_set": kind, "condition": cond, "facts": len(g), "p_original": g["p_original"].mean(),
                     "p_perturbed": g["p_perturbed"].mean(), "retained": g["retained"].mean(),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def _paired(rob: pd.DataFrame) -> list[str]:
    """Intact minus DKN-suppressed retained share, per fact (the robustness difference)."""
    if rob.empty:
        return ["No fact was measured."]
    wide = rob.pivot_table(index=["neuron_set", "fact"], columns="condition", values="retained").reset_index()
    out = []
    for kind, g in wide.groupby("neuron_set"):
        diff = (g["intact"] - g["set_suppressed"]).to_numpy(dtype=float)
        ctrl = (g["intact"] - g["random_suppressed"]).to_numpy(dtype=float)
        lo, hi = bootstrap_ci(diff)
        out.append(f"- {kind}: retained(intact) − retained(suppressed) = {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
                   f"over {len(diff)} facts; against matched random suppression {ctrl.mean():+.3f}. Positive = the "
                   f"fact survives typos better with the set intact.")
    return out


def _more_headline(r: DegenerateStudy) -> list[str]:
    """How close the clusters came to the filter, and the fact-checking test rows."""
    s, comps, checks = r.settings, r.tables["components"], r.tables["fact_check"]
    out = []
    if len(comps):
        below = int((comps["drop_alone"] < s.single_max).sum())
        out.append(f"- Clusters (all methods) whose own suppression lowers P by < {s.single_max:.0%}: {below} of "
                   f"{len(comps)}; the smallest single drop is {comps['drop_alone'].min():.1%} (persistence: "
                   f"{comps[comps.method == 'persistence']['drop_alone'].min():.1%}).")
    test = checks[checks.split == "test"] if len(checks) else checks
    for row in test.itertuples() if len(test) else ():
        out.append(f"- Fact checking, {row.relation}, {row.neuron_set} sets, test half: precision {row.precision:.2f}, "
                   f"recall {row.recall:.2f} ({row.n_pairs} pairs, {row.n_false} false; {row.n_frequent} frequent "
                   f"neurons).")
    return out


def render_markdown(r: DegenerateStudy) -> str:
    """The whole page (see the module)."""
    s, t = r.settings, r.tables
    timing = phase_minutes(r.timings)
    methods = t["methods"]
    pers = methods[methods.method == "persistence"]
    share = float(pers["share_facts_with_dkn"].iloc[0]) if len(pers) else float("nan")
    dkn_sizes = t["facts"][(t["facts"].method == "persistence") & t["facts"].has_dkn]["dkn_size"] if len(t["facts"]) \
        else pd.Series(dtype=float)
    comps = t["components"]
    sizes = comps[comps.method == "persistence"]["size"] if len(comps) else pd.Series(dtype=float)
    lines = [
        "# Degenerate knowledge neurons by weight topology (ParaRel) — measured", "",
        f"{generated_by('knlens study degenerate --page benchmarks/DEGENERATE.md')}; wall time "
        f"{r.timings.get('total', 0.0) / 60:.1f} min: {timing}.", "",
        versions_line(r.versions), "",
        "## Headline", "",
        f"- Facts studied: {int(t['counts']['studied'].sum())} (of {int(t['counts']['known'].sum())} known, "
        f"{int(t['counts']['read'].sum())} read).",
        f"- Share of studied facts with degenerate components (persistence clusters, suppressing one alone lowers P "
        f"by < {s.single_max:.0%}, all together by ≥ {s.removes_min:.0%}): {share:.2f}.",
        f"- Persistence cluster sizes: {' '.join(map(str, sorted(sizes.tolist()))) or 'none'}; DKN set sizes: "
        f"{' '.join(map(str, sorted(dkn_sizes.tolist()))) or 'none'}.", *_more_headline(r), *_paired(t["robustness"]), "",
        "## The papers' claims", "", CLAIMS, "",
        "## Facts", "",
        f"ParaRel, {s.candidates} random facts per relation (seed {s.seed}); known = the greedy answer is the object on "
        f"at least {s.min_prompts} paraphrases (those kept, at most {s.max_prompts}); studied = located within the "
        f"budget ({s.budget_minutes:g} min from the start, {s.locate_share:.0%} of what the filter leaves for phase 1, at most {s.max_facts} facts, round robin "
        "over the relations).", "", markdown_table(t["counts"]), "",
        "## Clusters and the functional filter, per method", "",
        f"The top {s.top} neurons by mean integrated gradients ({s.steps} Gauss–Legendre nodes) over the fact's "
        f"prompts, structural distances (mode `{s.mode}`: the first-order sensitivity of the later neuron's output to "
        "the earlier one's activation at the clean point, through the norm, gate and up columns; span ≤ 3 layers, "
        "chains for gaps 2–3). `clustered`: facts whose distances could be clustered; `removed_by_all`: facts where "
        f"suppressing all clusters lowers P by ≥ {s.removes_min:.0%}; `single_below`: clusters whose own "
        f"suppression lowers P by < {s.single_max:.0%}; `degenerate_clusters` pass both (with two clusters or more).",
        "", markdown_table(methods), "",
        "Per fact:", "", markdown_table(t["facts"].drop(columns=["removes_min"], errors="ignore")), "",
        "Clusters:", "", markdown_table(comps.drop(columns=["removes_min", "single_max"], errors="ignore")), "",
        "## Robustness to one-word typos", "",
        "Typos: two adjacent inner letters of one non-subject word (not the last) swapped, up to 3 per prompt. P on "
        f"the original and the typo prompts with the set intact, suppressed (×0 at the target position), and "
        f"{s.n_random} matched random sets (same layers and activation-magnitude bins) suppressed; retained = "
        "P(typos)/P(original), a ratio: a set whose suppression lowers P more on the original prompts than on the typos "
        "raises it, so read it beside the two P columns. Facts without DKNs are measured with all their clustered "
        "neurons, labelled so (facts without any cluster are left out).", "",
        markdown_table(robustness_summary(t["robustness"], s.seed)) if len(t["robustness"]) else "Not measured.", "",
        "## Fact checking", "",
        "Per relation, studied facts split at random into calibration and test halves; frequent neurons = in the "
        "calibration facts' sets more than 0.7 × the largest count; each fact paired with its object and one object "
        "of another fact of the relation; score = mean IG of the candidate over the frequent neurons "
        f"({s.check_steps} nodes); flagged false when below the threshold that maximises F1 on the calibration half. "
        "`dkn`: the DKN sets; `clustered`: all clustered neurons of each fact (beside them, since few facts have DKNs).",
        "", markdown_table(t["fact_check"]) if len(t["fact_check"]) else "Not measured (see the notes).", "",
        "## Limitations", "",
        "- A 135M-parameter model and a few facts per relation, within a 15-minute CPU budget: the shares and "
        "differences are descriptive, with wide intervals; fact checking has a handful of test pairs per relation.",
        "- “Removes the fact” is read as P halved; the paper's exact criterion may differ. The persistence rules "
        "(quantiles 0.2 / 0.5 / 0.5) are the paper's, read from its code description; clusters depend on them.",
        "- Evolvability (fine-tuning with DKN weights frozen) is not measured.", "",
        "## Notes", "", *([f"- {n}" for n in r.notes] or ["- none"]), "",
    ]
    return "\n".join(lines)
