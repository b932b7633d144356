"""What knlens' offline HTML pages share: the style sheet, values and tables as HTML, figures as inline PNG,
and the check that a page fetches nothing from the network.

>>> html_value(0.123456), html_value(float("nan")), html_value(True)
('0.1235', '–', '✓')
>>> remote_sources('<img src="data:image/png;base64,AA">'), remote_sources('<script src="https://x.org/a.js">')
([], ['https://x.org/a.js'])
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PAGE_CSS", "remote_sources", "html_value", "html_table", "png_data"]


PAGE_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d1d1f; padding: 0 16px; line-height: 1.45; }
h1 { font-size: 1.45em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 3px; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f6; } td.l, th.l { text-align: left; }
tr.hl td { background: #fff6d8; }
.kv td:first-child { text-align: left; color: #555; } .kv td { text-align: left; }
.verdict { background: #eef6ee; border-left: 4px solid #3a3; padding: 8px 12px; margin: 12px 0; }
.warn { background: #fff3e0; border-left: 4px solid #e80; padding: 8px 12px; margin: 12px 0; }
.note { color: #555; font-size: 0.88em; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f6; padding: 0 3px; border-radius: 3px; }
.tok { display: inline-block; padding: 1px 2px; margin: 1px 0; border-radius: 2px; white-space: pre;
       font-family: Menlo, Consolas, monospace; font-size: 0.85em; }
details { margin: 8px 0; }
"""


def remote_sources(page: str) -> list[str]:
    """``src``/``href`` attributes and CSS ``@import``/``url()`` that point at http(s) or protocol-relative URLs.

    A self-contained page returns ``[]``.
    """
    attr = re.findall(r"""<(?:script|link|img|iframe|source|embed|object|style)\b[^>]*?\b(?:src|href|data)\s*=\s*["']?"""
                      r"""((?:https?:)?//[^"'\s>]+)""", page, flags=re.I)
    css = re.findall(r"""(?:@import\s+(?:url\()?|url\()\s*["']?((?:https?:)?//[^"')\s]+)""", page, flags=re.I)
    es = re.findall(r"""\bimport\b[^;'"]*?from\s*["']((?:https?:)?//[^"']+)""", page)
    return attr + css + es


def html_value(x: Any, digits: int = 4) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "✓" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return "–"
        return f"{float(x):.{digits}g}"
    return html.escape(str(x))


def html_table(frame: pd.DataFrame, *, left: tuple[str, ...] = (), highlight: pd.Series | None = None,
           formats: dict[str, Any] | None = None) -> str:
    formats = formats or {}
    head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in frame.columns)
    body = []
    for i, (_, row) in enumerate(frame.iterrows()):
        cls = ' class="hl"' if highlight is not None and bool(highlight.iloc[i]) else ""
        cells = "".join(f'<td class="{"l" if c in left else ""}">{formats.get(c, html_value)(row[c])}</td>'
                        for c in frame.columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_data(fig: Any, dpi: int = 100) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
