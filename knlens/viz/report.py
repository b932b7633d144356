"""A self-contained HTML page for a :class:`~knlens.studies.knowledge_neurons.LocateResult` (works offline: everything inline).

The page holds a summary (model, fact, prompts, P(target), settings), the neuron table, the
integrated-gradients completeness error, the interventions (tested neurons vs uniform and magnitude-matched
random controls), the held-out prompts, the specificity control on other relations' facts, every test with
the smallest p-value it can reach, the layer × neuron heatmap of the mean scores (an inline PNG), and a
circuitsvis token view of the tested neurons' activations over every prompt (circuitsvis' inline JavaScript
bundle, never its CDN).

>>> from knlens import load_model, Fact
>>> from knlens.studies.knowledge_neurons import locate
>>> model = load_model("tiny-llama")
>>> res = locate(model, Fact(["the capital of france is", "the capital city of france is"], " paris"),
...              steps=4, n_random=3, progress=False, specificity=False)
>>> page = render_html(res)
>>> page.startswith("<!DOCTYPE html>") and "https://unpkg.com" not in page
True
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import torch

from knlens.core.versions import __version__
from knlens.methods.attribution.adaptive import describe
from knlens.studies.knowledge_neurons_result import LocateResult
from knlens.viz.html import PAGE_CSS, html_table, html_value, png_data
from knlens.viz.tokens import static_tokens, token_view

__all__ = ["render_html", "write_html"]


def _pct(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:+.1f} %"


def _heatmap(result: LocateResult) -> str:
    import matplotlib.pyplot as plt

    from knlens.results.figures import neuron_heatmap

    s = result.settings
    fig, ax = plt.subplots(figsize=(20, max(3.0, 0.2 * len(result.layers) + 1.5)))
    neuron_heatmap(result.mean_scores, layers=result.layers, mark=result.tested, ax=ax,
                   title=f"mean integrated gradients over {len(result.attributions)} prompts "
                         f"(blocks.L.mlp.{s.hook_point}); circled: {result.tested_label}")
    return png_data(fig)


def _prompt_heatmap(result: LocateResult) -> str:
    """Prompts × table neurons: the per-prompt scores of the neurons in the table."""
    import matplotlib.pyplot as plt

    t = result.table
    row_of = {l: i for i, l in enumerate(result.layers)}
    cols = [(int(l), int(n)) for l, n in zip(t["layer"], t["neuron"])]
    m = torch.stack([torch.stack([a.scores[row_of[l], n] for l, n in cols]) for a in result.attributions])
    m = m.float().numpy()
    vmax = float(np.abs(m).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(cols) + 3), 0.42 * len(result.attributions) + 1.6))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), [f"L{l}.N{n}" + ("*" if (l, n) in result.tested else "") for l, n in cols],
                  rotation=60, ha="right", fontsize=8)
    labels = [p if len(p) <= 48 else p[:45] + "…" for p in (a.prompt for a in result.attributions)]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("integrated gradients per prompt (* = tested)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return png_data(fig)


def _verdict(result: LocateResult) -> str:
    eff = result.effects()
    tests = result.tests()
    parts = []
    for action in ("suppress", "enhance"):
        sub = eff[eff.action == action]
        kn = sub[sub.neurons == "knowledge"]
        if not len(kn):
            continue
        controls = []
        for row in sub[sub.neurons == "random"].itertuples():
            t = tests[(tests.evaluation == "in-sample") & (tests.action == action)
                      & tests.comparison.str.contains(row.control) & tests.test.str.startswith("p_empirical")]
            p = f"p = {html_value(t['p'].iloc[0], 3)}" if len(t) else "no test"
            controls.append(f"{row.control} random sets {_pct(row.relative)}, {p}")
        side = "a decrease" if action == "suppress" else "an increase"
        parts.append(f"{action} (×{2 if action == 'enhance' else 0}): P(target) {_pct(kn['relative'].iloc[0])} "
                     f"({'; '.join(controls) or 'no random control'}; one-sided for {side})")
    effects = "; ".join(parts)
    names = ", ".join(f"<code>{n}</code>" for n in result.tested)
    if result.refined_empty:
        return (f'<div class="warn"><b>No refined knowledge neuron</b>: no neuron is coarse in enough of the '
                f"{len(result.attributions)} prompts under preset <code>{result.settings.preset}</code>. "
                f"Shown and tested instead: the {len(result.tested)} neurons with the highest mean score "
                f"({names}). {effects}.</div>")
    return (f'<div class="verdict"><b>{len(result.neurons)} knowledge neuron{"s" * (len(result.neurons) != 1)}</b>: '
            f"{names}. In-sample, {effects}.</div>")


def _selection_words(result: LocateResult) -> str:
    sel = result.selection
    if not sel:
        return "–"
    adapted = f" after {sel['rounds']} rounds of adaptation (for this fact alone)" if sel["rounds"] else ""
    return (f"p = {sel['p']:.2f}{adapted}: a neuron had to be coarse in ≥ {sel['min_prompts']} of "
            f"{sel['n_prompts']} prompts")


def _heldout_section(result: LocateResult) -> str:
    ho = result.heldout
    if ho is None:
        return ""
    pct = lambda x: _pct(float(x))  # noqa: E731
    folds = ho.folds[["fold", "held_out", "n_selection", "p", "min_prompts", "refined", "fallback", "neurons",
                      "jaccard_all"]]
    return f"""<h2>Held-out paraphrases</h2>
<p class="note">{html.escape(ho.note)} <i>jaccard_all</i>: overlap of a fold's neurons with the set refined on
all prompts. Compare these effects with the in-sample ones above: the gap is what selecting on the measured
prompts adds.</p>
{html_table(folds, left=("held_out", "neurons"))}
{html_table(ho.effects(), formats={"relative": pct, "delta": pct, "relative_std": pct})}"""


def _specificity_section(result: LocateResult) -> str:
    sp = result.specificity
    if sp is None:
        return ""
    pct = lambda x: _pct(float(x))  # noqa: E731
    summary = sp.summary()
    by_rel = sp.by_relation()
    cols = ("own_delta", "others_delta", "others_mean_delta", "others_max_abs_delta")
    return f"""<h2>Specificity: the same neurons on other relations' facts</h2>
<p class="note">Dai et al.'s control: the tested neurons suppressed / enhanced on {html.escape(sp.basis)}.
<i>own_delta</i>: Δ = mean change / mean P<sub>before</sub> on this fact; <i>others_delta</i>: the same pooled
over the other facts' prompts; <i>p_specific</i>: share of other facts whose Δ is at least as extreme as this
fact's, (1 + k) / (1 + K).</p>
{html_table(summary, formats={c: pct for c in cols})}
<details><summary>Δ by relation</summary>{html_table(by_rel, left=("relation",),
                                                  formats={c: pct for c in by_rel.columns if c != "relation"})}</details>
<details><summary>per fact</summary>{html_table(sp.frame, left=("fact", "relation", "action"),
                                             formats={"delta": pct, "relative": pct})}</details>"""


def _notes(result: LocateResult) -> str:
    notes = list(result.notes)
    if result.settings.engine_note:
        notes.insert(0, f"integrated gradients: {result.settings.engine_note}")
    return "".join(f'<div class="warn">{html.escape(n)}</div>' for n in notes)


def render_html(result: LocateResult) -> str:
    """The report page as one string: inline CSS, inline PNGs, circuitsvis' inline JavaScript."""
    s, fact = result.settings, result.fact
    esc = html.escape
    title = f"{fact.prompts[0]} → {fact.target}"
    prompts = result.completeness[["prompt", "p_target"]].rename(columns={"p_target": "P(target)"})
    settings_rows = [
        ("model", s.model), ("layers × neurons", f"{s.n_layers} × {s.d_mlp}"), ("dtype", s.dtype),
        ("hook point", f"blocks.L.mlp.{s.hook_point}"), ("target quantity", s.quantity),
        ("integration", f"{describe(result.attributions)}; zero baseline, engine '{s.engine_label}'"),
        ("multi-token target", s.multi_token), ("selection preset", s.preset),
        ("selection", _selection_words(result)),
        ("random controls", f"{s.n_random} sets of each: {s.controls} (uniform: same number of neurons per layer; "
                            f"matched: also the same {s.n_bins}-quantile bin of |activation| at the target), "
                            f"seed {s.seed}"),
        ("held-out paraphrases", "leave one prompt out" if s.held_out else "off"),
        ("specificity control", result.specificity.basis if result.specificity is not None else "off"),
        ("knlens", s.knlens_version),
    ]
    if result.timings:
        settings_rows.append(("time", ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in result.timings.items())))
    kv = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in settings_rows)
    fact_rows = [("fact", fact.name or "(custom)"), ("relation", getattr(fact, "relation", None) or "–"),
                 ("subject", getattr(fact, "subject", None) or "–"), ("target", repr(fact.target)),
                 ("mean P(target)", f"{result.p_target:.4f}")]
    fact_kv = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in fact_rows)
    comp = result.completeness
    table = result.table
    eff = result.effects()
    pct = lambda x: _pct(float(x))  # noqa: E731
    per_prompt = result.per_prompt()
    fig_iv = png_data(result.plot_interventions())
    try:
        tokens_js = token_view(result).src
    except Exception as err:  # noqa: BLE001 - the static view below still shows the numbers
        tokens_js = f'<p class="warn">circuitsvis view unavailable: {esc(str(err))}</p>'
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>knlens: {esc(title)}</title>
<style>{PAGE_CSS}</style></head>
<body>
<h1>Knowledge neurons of “{esc(fact.prompts[0])}” → “{esc(fact.target)}”</h1>
<p class="sub">{len(fact.prompts)} prompts · model {esc(s.model)} · knlens {esc(__version__)}</p>
{_verdict(result)}
{_notes(result)}

<h2>Summary</h2>
<table class="kv">{fact_kv}</table>
{html_table(prompts, left=("prompt",))}
<table class="kv">{kv}</table>

<h2>Neurons</h2>
<p class="note">Mean integrated-gradients score over the prompts; <i>n_coarse</i>: in how many of the
{len(result.attributions)} prompts the neuron is coarse (score ≥ threshold × the prompt's maximum);
highlighted: refined knowledge neurons. The table also lists the top {s.top_k} neurons by mean score.</p>
{html_table(table, highlight=table["refined"])}
<img alt="per-prompt scores" src="{_prompt_heatmap(result)}">

<h2>Completeness of integrated gradients</h2>
<p class="note">For each layer, Σ<sub>i</sub> IG<sub>i</sub> should equal Δ = P(target | a) − P(target | 0)
(only that layer's row moved to the baseline). <i>abs_error</i> = Σ<sub>layers</sub> |Σ IG − Δ|,
<i>relative_error</i> = abs_error / Σ<sub>layers</sub> |Δ|. A prompt above the tolerance is integrated again on
more Gauss–Legendre nodes; <i>grid</i> and <i>steps</i> are those of the pass kept.</p>
{html_table(comp, left=("prompt",))}

<h2>Interventions: suppress (×0) and enhance (×2) vs random controls</h2>
<p class="note">Tested: {esc(result.tested_label)}, at the target position, in-sample (selected and measured on
the same {len(result.attributions)} prompts). Suppress sets a neuron to the baseline b (0), enhance to
b + 2(a − b): its write into the residual stream removed or doubled, whatever its sign. Random controls:
{s.n_random} sets of each kind, <i>uniform</i> (the same number of neurons in each layer) and <i>matched</i> (also the
same {s.n_bins}-quantile bin of |activation| at the target within the layer: knowledge neurons are often among
the most active, and scaling a large activation moves the output more). <i>relative</i>: mean of
(P<sub>after</sub> − P<sub>before</sub>) / P<sub>before</sub>; <i>delta</i>: Dai et al.'s
mean change / mean P<sub>before</sub>; <i>relative_std</i>: spread of the random draws' means.</p>
{html_table(eff, formats={"relative": pct, "delta": pct, "relative_std": pct})}
<img alt="interventions" src="{fig_iv}">
<details><summary>per prompt</summary>{html_table(per_prompt, left=("prompt", "action"))}</details>
{_heldout_section(result)}
{_specificity_section(result)}

<h2>Tests</h2>
<p class="note"><i>p_empirical</i>: share of random sets whose change is at least as large in the expected
direction (a decrease for suppress, an increase for enhance), (1 + k) / (1 + N), so it cannot go below
1 / (1 + N) and is near 1 when the effect goes the other way; <i>p_wilcoxon</i>: two-sided Wilcoxon signed-rank
test, paired over prompts, tested set vs the control's mean; <i>p_specific</i>: see above. <i>p_floor</i>: the
smallest p the test can give with its <i>n</i>; the note says when it cannot reach 0.05.</p>
{html_table(result.tests(), left=("evaluation", "action", "comparison", "test", "note"))}

<h2>Where the neurons sit: layer × neuron heatmap</h2>
<img alt="heatmap" src="{_heatmap(result)}">

<h2>Activations over the prompts' tokens</h2>
<p class="note">Activation of each tested neuron (blocks.L.mlp.{esc(s.hook_point)}) at every token; prompts
separated by “‖”. Pick a neuron with its button; hover a token for all values. Integrated gradients used the
activation at the last token (the target position).</p>
{tokens_js}
<details><summary>the same numbers without JavaScript</summary>{static_tokens(result)}</details>

<p class="note">Generated by knlens {esc(__version__)}. Self-contained: no network access needed.</p>
</body></html>
"""
    return page


def write_html(result: LocateResult, path: str | Path) -> Path:
    """Write :func:`render_html` to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result), encoding="utf-8")
    return path
