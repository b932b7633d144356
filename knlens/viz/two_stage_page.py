"""The two-stage study as a Markdown page: counts per filter, the two-stage filter beside IG (overlap of top-k, effect
of suppression per neuron against matched random sets, cost), per fact, the method's claims and limitations.

``knlens study twostage --page benchmarks/TWO_STAGE.md`` writes it; the statements follow the measured numbers.
"""

from __future__ import annotations

from knlens.studies.two_stage_study import TwoStageStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, versions_line

__all__ = ["render_markdown"]

CLAIMS = [
    "- Sato and Takagi **[paper, multimodal]**: knowledge neurons of a vision-language model are found by (1) the "
    "activation difference between an image and its inpainted copy (the concept removed), then (2) gradient-weighted "
    "activation (GradCAM-like); thresholds were set by hand per concept. The text version here corrupts the subject "
    "instead (docs/methods.md, Two-stage filter; **[unverified]** transcription).",
    "- Dai et al. (2022) **[paper]**: integrated gradients find knowledge neurons whose suppression lowers P(object).",
    "- What the comparison can show: whether two cheap passes (2 forwards + 1 backward a prompt, plus noise samples) "
    "pick neurons that IG (L × m cells a prompt) also picks, and whether they matter as much when suppressed.",
]

LIMITATIONS = [
    "- One model of 135M parameters and a few facts; the image path is not run (it needs a vision-language model "
    "that TransformerLens can wrap; knlens raises ModalityError when given an image).",
    "- Suppression of 20 neurons at the answer position only; relative changes of small probabilities are noisy, "
    "so the matched random sets are given beside each.",
    "- IG on a fixed grid of few nodes to fit the budget (median completeness error in the facts table).",
    "- Stage 1 keeps neurons whose activation *rises* with the subject (Δ > 0); a neuron the subject switches off is "
    "not a candidate, as in the paper's inpainting version.",
]


def render_markdown(r: TwoStageStudy) -> str:
    """The page for one study result."""
    s, t, n = r.settings, r.tables, r.numbers
    c = t["comparison"].set_index("quantity")["mean"] if len(t["comparison"]) else {}

    def m(q: str, fmt: str = "{:.3g}") -> str:
        return fmt.format(c[q]) if q in c else "—"

    head = [
        f"- {int(n['compared'])} of {int(n['facts'])} facts compared ({int(n['empty'])} with an empty stage).",
        f"- Stage 1 kept {m('stage 1', '{:.0f}')} neurons on average, stage 2 {m('stage 2', '{:.0f}')}; of the top-{s.k} "
        f"sets, {m('shared', '{:.1f}')} neurons are shared with IG's (Jaccard {m('jaccard')}).",
        f"- Suppressing the top-{s.k} set changes P(object) by {m('two-stage suppress', '{:+.1%}')} (two-stage) and "
        f"{m('IG suppress', '{:+.1%}')} (IG); matched random sets {m('matched random suppress (two-stage)', '{:+.1%}')} "
        f"/ {m('matched random suppress (IG)', '{:+.1%}')}; per neuron {m('two-stage per neuron', '{:+.2%}')} vs "
        f"{m('IG per neuron', '{:+.2%}')} (the two-stage set holds the stage-2 neurons, at most {s.k}; the per-neuron "
        "effect divides by each set's own size).",
        f"- Cost per fact: two-stage {m('two-stage s', '{:.1f}')} s, IG {m('IG s', '{:.1f}')} s (same machine, same run).",
    ]
    facts = t["facts"].drop(columns=["prompt"], errors="ignore")
    return "\n".join([
        "# The two-stage filter against integrated gradients", "",
        generated_by("knlens study twostage --page benchmarks/TWO_STAGE.md") + f", {r.timings.get('total', 0) / 60:.1f} min.",
        versions_line(r.versions), "",
        f"Model `{s.model}`; relations {', '.join(s.relations)}; corruption `{s.corruption}`"
        + (f" ({s.noise_samples} samples)" if s.corruption == "noise" else "")
        + f"; tau_a {s.tau_a} × max Δ; tau_g {s.tau_g}; k {s.k}; IG {s.steps} nodes; {s.n_random} matched random sets; "
        f"seed {s.seed}.", "", "## Headline", "", *head, "",
        "## Facts surviving each filter", "", markdown_table(t["counts"]), "",
        "## Comparison (over facts)", "", markdown_table(t["comparison"]), "",
        "## Per fact", "", markdown_table(facts), "",
        "## The claims", "", *CLAIMS, "", "## Limitations", "", *LIMITATIONS, "",
        "## Timings (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in r.timings.items()), ""])
