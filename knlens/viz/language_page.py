"""A self-contained HTML page of a fact's neurons in many languages: a language × layer view (works offline: the
style and the figure are inline).

For each fact, a grid with one row per language and one for the language-independent set (LIKN), one column per
layer holding neurons; each cell lists that language's neurons of that layer, LIKN neurons in bold. Above the
grids: the settings, the heatmap of neuron counts (all facts), the sizes per language, the overlap of language
pairs and, when given, the suppress / enhance effects per language. ``knlens locate --languages ... --out DIR`` and
``knlens study multilingual --out DIR`` write it as ``languages.html``.

>>> import pandas as pd
>>> from knlens.methods.multilingual.likn_result import LanguageNeurons
>>> frame = pd.DataFrame({"fact": ["f", "f", "f"], "language": ["en", "en", "fr"], "layer": [3, 5, 3],
...                       "neuron": [7, 9, 7], "independent": [True, False, True]})
>>> sizes = pd.DataFrame({"fact": ["f", "f"], "language": ["en", "fr"], "n_neurons": [2, 1],
...                       "n_independent": [1, 1], "n_specific": [1, 0]})
>>> page = render_language_html(LanguageNeurons(frame, sizes, ("en", "fr")), figure=False)
>>> page.startswith("<!DOCTYPE html>") and remote_sources(page) == [] and "<b>7</b>" in page
True
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from knlens.core.versions import __version__
from knlens.methods.multilingual.likn_result import LanguageNeurons
from knlens.viz.html import PAGE_CSS, html_table, png_data, remote_sources

__all__ = ["render_language_html", "write_language_html", "language_grid", "remote_sources"]


def language_grid(neurons: LanguageNeurons, fact: str) -> pd.DataFrame:
    """One row per language and a last row ``LIKN``, one column per layer holding a neuron of ``fact``; a cell is
    the space-separated neuron indices (empty when none).

    >>> frame = pd.DataFrame({"fact": ["f", "f"], "language": ["en", "fr"], "layer": [3, 3], "neuron": [7, 8],
    ...                       "independent": [False, False]})
    >>> sizes = pd.DataFrame({"fact": ["f", "f"], "language": ["en", "fr"], "n_neurons": [1, 1],
    ...                       "n_independent": [0, 0], "n_specific": [1, 1]})
    >>> language_grid(LanguageNeurons(frame, sizes, ("en", "fr")), "f").to_dict("records")
    [{'language': 'en', 'L3': '7'}, {'language': 'fr', 'L3': '8'}, {'language': 'LIKN', 'L3': ''}]
    """
    f = neurons.frame[neurons.frame.fact == fact]
    layers = sorted(set(f.layer))
    rows = []
    for lang in [*neurons.languages, "LIKN"]:
        mine = f[(f.language == neurons.languages[0]) & f.independent] if lang == "LIKN" else f[f.language == lang]
        rows.append({"language": lang, **{f"L{l}": " ".join(map(str, sorted(mine[mine.layer == l].neuron)))
                                          for l in layers}})
    return pd.DataFrame(rows, columns=["language", *[f"L{l}" for l in layers]])


def _grid_html(neurons: LanguageNeurons, fact: str) -> str:
    independent = {(int(r.layer), int(r.neuron)) for r in neurons.frame[(neurons.frame.fact == fact)
                                                                        & neurons.frame.independent].itertuples()}
    grid = language_grid(neurons, fact)
    if len(grid.columns) == 1:
        return f"<h3>{html.escape(fact)}</h3><p class=\"note\">No neuron in any language.</p>"

    def cell(col: str) -> object:
        layer = int(col[1:])
        return lambda v: " ".join(f"<b>{i}</b>" if (layer, int(i)) in independent else i for i in str(v).split())

    return f"<h3>{html.escape(fact)}</h3>" + html_table(grid, left=("language",),
                                                        formats={c: cell(c) for c in grid.columns[1:]})


def _figure(neurons: LanguageNeurons) -> str:
    try:
        return f'<img alt="neurons per language and layer" src="{png_data(neurons.plot())}">'
    except ImportError:  # matplotlib missing: the grids say it all
        return '<p class="note">matplotlib is not installed: no figure.</p>'


def render_language_html(neurons: LanguageNeurons, effects: pd.DataFrame | None = None, *,
                         title: str = "knlens: neurons per language", notes: tuple[str, ...] = (),
                         figure: bool = True) -> str:
    """The page as a string (see the module); ``notes`` are shown as a list under the settings (skips, ...)."""
    s = neurons.settings
    kv = {"model": s.model, "attribution": f"{s.attribution}, {s.steps} {s.grid} steps, hook {s.hook_point}",
          "a language's neurons": f"coarse (>= {s.threshold} x max) in more than {s.p} of its prompts",
          "LIKN": f"intersection over {', '.join(s.across or neurons.languages)}",
          "languages": ", ".join(neurons.languages), "facts": str(len(neurons.facts)), "knlens": __version__}
    body = [f"<h1>{html.escape(title)}</h1>",
            '<table class="kv">' + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                                           for k, v in kv.items()) + "</table>"]
    if notes:
        body.append('<div class="warn"><ul>' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul></div>")
    body += ["<h2>Neurons per language and layer</h2>", _figure(neurons) if figure else "",
             "<h2>Sizes (mean per fact)</h2>", html_table(neurons.summary(), left=("language",)),
             "<h2>Overlap of language pairs</h2>", html_table(neurons.overlap(), left=("language_a", "language_b"))]
    if effects is not None and len(effects):
        body += ["<h2>Suppress (×0) / enhance (×2) the LIKN set, per language</h2>",
                 html_table(effects, left=tuple(c for c in ("language", "action", "source") if c in effects))]
    body += ["<h2>Per fact: language × layer</h2>",
             '<p class="note">Each cell lists the neuron indices of that language in that layer; bold: '
             "language-independent (in every language's set). Definitions: "
             "docs/methods.md, language-independent neurons.</p>"]
    body += [_grid_html(neurons, fact) for fact in neurons.facts]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_language_html(neurons: LanguageNeurons, path: str | Path, effects: pd.DataFrame | None = None, *,
                        title: str = "knlens: neurons per language", notes: tuple[str, ...] = ()) -> Path:
    """Write :func:`render_language_html` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render_language_html(neurons, effects, title=title, notes=notes), encoding="utf-8")
    return path
