"""A self-contained HTML page for an :class:`~knlens.methods.editing.result.EditEvaluation` (works offline:
the style and the figure are inline).

The page holds the settings, the size of every edit, the editors × metrics table with its intervals, the
metrics' bar chart, the perplexity change, and, per fact and editor, the before/after probabilities of every
prompt group: the edit prompt, its paraphrases, the neighbours, and the criteria's probes (symmetry, synonym,
relation). P is the per-token geometric mean probability of the object, exp(−NLL), teacher forced; a
highlighted row is one where the new object beats the true one after the edit.

>>> from knlens import load_model, Fact, NeuronSet
>>> from knlens.methods.editing.editors import EditRequest, kn_update_editor
>>> from knlens.methods.editing.evaluate import evaluate_edits
>>> model = load_model("tiny-llama")
>>> req = EditRequest(Fact(["the capital of france is"], " paris", name="capital-france"), " berlin",
...                   neighbours=[Fact(["the capital of italy is"], " rome")])
>>> ev = evaluate_edits(model, [req], {"kn": kn_update_editor(lambda r: NeuronSet([(1, 3)]))}, n_text=0)
>>> page = render_edit_html(ev)
>>> page.startswith("<!DOCTYPE html>") and remote_sources(page) == [] and "edit prompt (reliability)" in page
True
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from knlens.core.versions import __version__
from knlens.methods.editing.result import GROUPS, EditEvaluation
from knlens.viz.html import PAGE_CSS, html_table, png_data, remote_sources

__all__ = ["GROUP_TITLES", "render_edit_html", "write_edit_html", "remote_sources"]

GROUP_TITLES: dict[str, str] = {
    "reliability": "edit prompt (reliability)",
    "generality": "paraphrases (generality)",
    "locality": "neighbouring facts (locality: their own objects should stay)",
    "symmetry": "reverse prompts of the new object (bijective symmetry: the edited subject should follow now)",
    "symmetry_old": "reverse prompts of the old object (the old reverse fact)",
    "synonym": "synonymous prompts (synonymous invariance: the new object's synonym should follow now)",
    "relation": "relation question on the subject and the new object (the relation's word against None)",
    "relation_old": "relation question on the subject and the old object",
}


def _prob(nll: pd.Series) -> pd.Series:
    return np.exp(-nll.astype(float))


def _group_table(rows: pd.DataFrame) -> str:
    t = pd.DataFrame({
        "prompt": rows.prompt, "true object": rows.target_true,
        "P(true) before": _prob(rows.nll_true_before), "P(true) after": _prob(rows.nll_true_after),
        "new object": rows.target_new.fillna("–"),
        "P(new) before": _prob(rows.nll_new_before), "P(new) after": _prob(rows.nll_new_after),
        "argmax = new, after": rows.acc_new_after, "argmax unchanged": rows.agreement})
    beats = (rows.nll_new_after < rows.nll_true_after).reset_index(drop=True)
    return html_table(t.reset_index(drop=True), left=("prompt", "true object", "new object"), highlight=beats)


def _fact_section(ev: EditEvaluation, fact: str) -> str:
    f = ev.frame[ev.frame.fact == fact]
    order = [g for g in GROUPS if g in set(f.group)] + sorted(set(f.group) - set(GROUPS))
    parts = [f"<h2>{html.escape(fact)}</h2>"]
    for editor in dict.fromkeys(f.editor):
        e = f[f.editor == editor]
        parts.append(f"<details open><summary><b>{html.escape(str(editor))}</b></summary>")
        for group in order:
            rows = e[e.group == group]
            if len(rows):
                parts.append(f"<h3>{html.escape(GROUP_TITLES.get(group, group))}</h3>{_group_table(rows)}")
        parts.append("</details>")
    return "\n".join(parts)


def _metrics_table(ev: EditEvaluation) -> str:
    m = ev.metrics()[["editor", "metric", "convention", "before", "mean", "ci_low", "ci_high", "n_facts"]]
    return html_table(m.rename(columns={"mean": "after"}), left=("editor", "metric", "convention"))


def _figure(ev: EditEvaluation) -> str:
    try:
        return f'<img alt="metrics" src="{png_data(ev.plot())}">'
    except ImportError:  # matplotlib missing: the tables say it all
        return '<p class="note">matplotlib is not installed: no figure.</p>'


def render_edit_html(ev: EditEvaluation, title: str = "knlens edit evaluation") -> str:
    """The page as a string (see the module docstring)."""
    s = ev.settings
    facts = list(dict.fromkeys(ev.frame.fact))
    interval = f"{s.level:.0%} bootstrap over facts, {s.n_boot} resamples" if len(facts) > 1 else "none (one fact)"
    kv = {"model": s.model, "weights (SHA-256)": s.fingerprint[:16] + "…", "editors": ", ".join(s.editors),
          "facts": str(len(facts)), "perplexity text": f"{s.text} ({s.n_text} sentences)", "interval": interval,
          "knlens": __version__}
    settings = '<table class="kv">' + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                              for k, v in kv.items()) + "</table>"
    fluency = ""
    if len(ev.fluency):
        fl = ev.fluency.assign(change=ev.fluency.ppl_after / ev.fluency.ppl_before - 1)
        fluency = "<h2>Perplexity on the text sample</h2>" + html_table(
            fl[["fact", "editor", "n_tokens", "ppl_before", "ppl_after", "change"]], left=("fact", "editor"))
    sizes = ev.edits[["fact", "editor", "editor_kind", "n_changed", "delta_norm", "parameters"]]
    body = [f"<h1>{html.escape(title)}</h1>",
            '<p class="sub">Every edit was applied, measured and undone; the weights ended as they started.</p>',
            settings,
            "<h2>Edits</h2>", html_table(sizes, left=("fact", "editor", "editor_kind", "parameters")),
            "<h2>Metrics</h2>", _metrics_table(ev), _figure(ev), fluency,
            '<p class="note">Per prompt: P = exp(−mean per-token NLL) of the object, teacher forced. Highlighted: '
            'the new object is more probable than the true one after the edit. Definitions: docs/methods.md, '
            'editing evaluation and editing criteria.</p>']
    body += [_fact_section(ev, fact) for fact in facts]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_edit_html(ev: EditEvaluation, path: str | Path, title: str = "knlens edit evaluation") -> Path:
    """Write :func:`render_edit_html` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render_edit_html(ev, title), encoding="utf-8")
    return path
