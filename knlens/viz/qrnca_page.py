"""The QRNCA study as a Markdown page: counts per filter, PCR of QRNCA, KN and random sets beside the paper's numbers,
per domain, the sets and the localised regions, limitations.

``knlens study qrnca --page benchmarks/QRNCA.md`` writes it; the statements follow the measured numbers.
"""

from __future__ import annotations

import pandas as pd

from knlens.studies.qrnca_languages import QRNCALanguageSettings
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
    "- No language neurons here: the model is English-only; the language domains are `knlens study qrnca-languages` "
    "on Gemma-3-270M (benchmarks/QRNCA_LANGUAGES.md).",
]

LANGUAGE_LIMITATIONS = [
    "- One model of 270M parameters (Gemma-3-270M, GGUF Q4_K_M dequantised), a few questions per language; PCR is a "
    "ratio of two means, so an unrelated mean near 0 inflates it. Both means are given beside it.",
    "- The languages share facts only where the model knows a fact in every language (the counts say how many); "
    "elsewhere a language's questions are other facts, so a language set mixes language and content.",
    "- The templates' frame was translated by knlens (TEMPLATES_BY_LANGUAGE); the option letters A-D are the same in "
    "every language, so the answer token itself carries no language.",
    "- Integrated gradients on a fixed grid of few nodes (see the settings) to fit the budget; the median completeness "
    "error is reported.",
]


def _f(x: float) -> str:
    return f"{x:.3g}"


def _accuracy(acc: pd.DataFrame) -> pd.DataFrame:
    """Mean P(answer letter) and accuracy per template, and the letter the model picks most (its share): a model
    that answers by position picks one letter whatever the options."""
    table = acc.groupby("template", as_index=False)[["p_answer", "correct"]].mean()
    if "chosen" in acc:
        top = acc.groupby("template")["chosen"].agg(lambda c: f"{c.mode()[0]} ({(c == c.mode()[0]).mean():.0%})")
        table["most chosen letter"] = table["template"].map(top)
    return table


def render_markdown(r: QRNCAStudy) -> str:
    """The page for one study result (domains are relations, or languages for ``qrnca-languages``)."""
    s, t, n = r.settings, r.tables, r.numbers
    by_language = isinstance(s, QRNCALanguageSettings)
    pooled = t["pcr"].set_index(["method", "action"])
    paper = t["pcr"].groupby("method")["paper (Llama-2-7B-chat)"].apply(lambda v: " / ".join(_f(x) for x in v))

    def pc(method: str, action: str) -> str:
        return _f(pooled.loc[(method, action), "pcr"]) if (method, action) in pooled.index else "—"

    kind = "languages" if by_language else "relations"
    domains = t["counts"].groupby("language" if by_language else "relation").queries.sum()
    command = ("knlens study qrnca-languages --page benchmarks/QRNCA_LANGUAGES.md" if by_language
               else "knlens study qrnca --page benchmarks/QRNCA.md")
    scope = (f"relations {', '.join(s.relations)} in the languages {', '.join(s.languages)}" if by_language
             else f"relations {', '.join(s.relations)}")
    head = [
        f"- {int(n['queries'])} known facts (queries) over {int((domains > 0).sum())} {kind} (of {len(domains)} read), "
        f"{int(n['mc prompts'])} multiple-choice prompts; the model picks the right letter on {n['mc accuracy']:.0%} "
        "of them (chance 25 %).",
        f"- PCR boost / suppress, pooled over the {kind}: QRNCA {pc('QRNCA', 'boost')} / {pc('QRNCA', 'suppress')}, "
        f"KN {pc('KN', 'boost')} / {pc('KN', 'suppress')}, random {pc('random', 'boost')} / {pc('random', 'suppress')}, "
        f"matched random {pc('random (matched)', 'boost')} / {pc('random (matched)', 'suppress')} (paper: QRNCA "
        f"{paper.get('QRNCA', '—')}, KN {paper.get('KN', '—')}, random {paper.get('random', '—')}).",
        f"- {int(n['common neurons'])} common neuron(s) removed (in more than {s.common_share:.0%} of the clusters).",
        f"- Suppressing a domain's QRNCA set changes P(answer letter) on the other {kind}' prompts about as much as on "
        "its own when the two Δp% are close (PCR near 1): the set is then not specific to its domain.",
    ]
    lines = [
        f"# QRNCA{' by language' if by_language else ''}: query-relevant neurons by NA-ICA (Chen, Dejl, Toni, 2024)",
        "", generated_by(command) + f", {r.timings.get('total', 0) / 60:.1f} min.", versions_line(r.versions), "",
        f"Model `{s.model}`; {scope}; {s.n_templates} templates per query; IG {s.steps} nodes ({s.grid}); cluster threshold "
        f"{s.threshold} × max; top-v {s.top_v}; common share {s.common_share}; seed {s.seed}.",
        "", "## Headline", "", *head, "",
        "## Facts surviving each filter", "", markdown_table(t["counts"]), "",
        f"## PCR (pooled over the {kind}) beside the paper", "",
        "Δp% = mean relative change of P(answer letter) in percent, on the domain's own prompts (related) and on the "
        "other domains' prompts (unrelated).", "", markdown_table(t["pcr"]), "",
        "## PCR per domain", "", markdown_table(t["pcr_by_domain"]), "",
        "## The domain sets", "", markdown_table(t["sets"]), "",
        "QRNCA neurons shared by the sets of two domains:", "", markdown_table(t["overlap"]), "",
        "## Localised regions", "",
        "Counts of each query's QRNCA neurons per layer third (the full layer × neuron-bin density is `plot()` of the "
        "result and `regions.png` with `--out`):", "",
    ]
    for dom, d in r.density.items():
        per_layer = d.sum(1)
        thirds = [int(per_layer[i * len(per_layer) // 3:(i + 1) * len(per_layer) // 3].sum()) for i in range(3)]
        lines.append(f"- {dom}: lower / middle / upper third of the layers {thirds[0]} / {thirds[1]} / {thirds[2]}.")
    engines = ", ".join(f"{e} {int(k)} rows" for e, k in zip(t["engines"].engine, t["engines"].rows))
    lines += ["", "## Multiple-choice accuracy", "",
              markdown_table(_accuracy(t["mc_accuracy"])), "",
              f"Median relative completeness error of the IG runs: {n['median relative completeness error']:.3g}. "
              f"Boost and suppress ran on: {engines} (each group of rows checked against plain forwards).", "",
              "## The papers' claims", "", *PAPER_LINES, "", "## Limitations", "",
              *(LANGUAGE_LIMITATIONS if by_language else LIMITATIONS), "",
              "## Timings (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in r.timings.items()), ""]
    return "\n".join(lines)
