"""The QRNCA study as a Markdown page: counts per filter, PCR of QRNCA, KN and random sets beside the paper's numbers,
per domain, the sets and the localised regions, limitations.

``knlens study qrnca --page benchmarks/QRNCA.md`` writes it; the statements follow the measured numbers.
"""

from __future__ import annotations

from knlens.studies.qrnca_study import QRNCAStudy
from knlens.viz.query_localization_page import generated_by, markdown_table, versions_line

__all__ = ["render_markdown"]

PAPER_LINES = [
    "- Chen, Dejl and Toni (2024) **[paper]**, Llama-2-7B-chat, domain neurons: PCR of boost / suppress is 4.4 / 5.6 "
    "for QRNCA, 1.0 / 1.0 for Dai's KN and 1.0 / 0.55 for random neurons (language neurons: 41.2 / 36.0, 6.7 / 1.8, "
    "2.0 / 1.0). Their claim: QRNCA neurons are specific to their domain, KN neurons are not.",
    "- Their released code's common-neuron filter compares a string with a list and never removes anything; knlens' "
    "filter removes neurons in more than 30 % of the clusters (tested on a planted common neuron).",
]

LIMITATIONS = [
    "- One model of 135M parameters, answering 4-option questions near chance (the accuracy table): the letter's "
    "probability carries little of the fact, so its attributions may say more about the format than the domain.",
    "- Domains are ParaRel relations with a handful of queries each; PCR is a ratio of two means, so an unrelated "
    "mean near 0 inflates it. Both means are given beside it.",
    "- Integrated gradients on a fixed grid of few nodes (see the settings) to fit the budget; the median completeness "
    "error is reported.",
    "- No language neurons: the model is English-only (mParaRel languages would need Gemma).",
]


def _f(x: float) -> str:
    return f"{x:.3g}"


def render_markdown(r: QRNCAStudy) -> str:
    """The page for one study result."""
    s, t, n = r.settings, r.tables, r.numbers
    pooled = t["pcr"].set_index(["method", "action"])

    def pc(method: str, action: str) -> str:
        return _f(pooled.loc[(method, action), "pcr"]) if (method, action) in pooled.index else "—"

    head = [
        f"- {int(n['queries'])} known facts (queries) over {int((t['counts'].queries > 0).sum())} relations (of "
        f"{len(t['counts'])} read), {int(n['mc prompts'])} "
        f"multiple-choice prompts; the model picks the right letter on {n['mc accuracy']:.0%} of them (chance 25 %).",
        f"- PCR boost / suppress, pooled over domains: QRNCA {pc('QRNCA', 'boost')} / {pc('QRNCA', 'suppress')}, "
        f"KN {pc('KN', 'boost')} / {pc('KN', 'suppress')}, random {pc('random', 'boost')} / {pc('random', 'suppress')}, "
        f"matched random {pc('random (matched)', 'boost')} / {pc('random (matched)', 'suppress')} (paper: 4.4 / 5.6, "
        "1.0 / 1.0, 1.0 / 0.55).",
        f"- {int(n['common neurons'])} common neuron(s) removed (in more than {s.common_share:.0%} of the clusters).",
        "- Suppressing a domain's QRNCA set changes P(answer letter) on the other domains' prompts about as much as on "
        "its own when the two Δp% are close (PCR near 1): the set is then not specific to its domain.",
    ]
    lines = [
        "# QRNCA: query-relevant neurons by NA-ICA (Chen, Dejl, Toni, 2024)", "",
        generated_by("knlens study qrnca --page benchmarks/QRNCA.md") + f", {r.timings.get('total', 0) / 60:.1f} min.",
        versions_line(r.versions), "",
        f"Model `{s.model}`; relations {', '.join(s.relations)}; {s.n_templates} templates per query; IG {s.steps} "
        f"nodes; cluster threshold {s.threshold} × max; top-v {s.top_v}; common share {s.common_share}; seed {s.seed}.",
        "", "## Headline", "", *head, "",
        "## Facts surviving each filter", "", markdown_table(t["counts"]), "",
        "## PCR (pooled over domains) beside the paper", "",
        "Δp% = mean relative change of P(answer letter) in percent, on the domain's own prompts (related) and on the "
        "other domains' prompts (unrelated).", "", markdown_table(t["pcr"]), "",
        "## PCR per domain", "", markdown_table(t["pcr_by_domain"]), "",
        "## The domain sets", "", markdown_table(t["sets"]), "",
        "## Localised regions", "",
        "Counts of each query's QRNCA neurons per layer third (the full layer × neuron-bin density is `plot()` of the "
        "result and `regions.png` with `--out`):", "",
    ]
    for rel, d in r.density.items():
        per_layer = d.sum(1)
        thirds = [int(per_layer[i * len(per_layer) // 3:(i + 1) * len(per_layer) // 3].sum()) for i in range(3)]
        lines.append(f"- {rel}: lower / middle / upper third of the layers {thirds[0]} / {thirds[1]} / {thirds[2]}.")
    lines += ["", "## Multiple-choice accuracy", "",
              markdown_table(t["mc_accuracy"].groupby("template", as_index=False)[["p_answer", "correct"]].mean()), "",
              f"Median relative completeness error of the IG runs: {n['median relative completeness error']:.3g}.", "",
              "## The papers' claims", "", *PAPER_LINES, "", "## Limitations", "", *LIMITATIONS, "",
              "## Timings (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in r.timings.items()), ""]
    return "\n".join(lines)
