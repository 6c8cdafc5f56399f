"""The page and its building blocks: the HTML document, escaped text, tables, cells, headline
cards, intervals and embedded figures, shared by the run report, the probe report and the sweep
comparison.

Page building is a handful of string functions over ``html.escape`` rather than a template
engine: the pages are small and fixed, and a new dependency would buy nothing.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_lightning import schema
from cxr_lightning.errors import DataError

DEMO_NOTE = (
    "This run used the generated demo dataset: a constructed demo for exercising the pipeline, "
    "not evidence about real radiographs."
)
# What an interval cell says in place of its interval when the group is too small for it to mean anything.
TOO_FEW = "too few"

# One stylesheet for every page, the run report's gallery cards included.
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2d44;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85;overflow-wrap:anywhere}
nav{margin-top:10px}nav a{color:#cfe0ff;margin-right:14px;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}section{background:#fff;border:1px solid #dde1e7;border-radius:6px;
padding:14px 18px;margin:16px 0}h2{font-size:18px;margin:0 0 10px}h3{font-size:15px;margin:14px 0 6px}
.note{background:#fff6d6;border:1px solid #e8d48a;padding:8px 12px;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;
min-width:150px;background:#fafbfc}.card .v{font-size:22px;font-weight:600}.card .k{color:#5a6474;font-size:12px}
.card .ci{color:#5a6474;font-size:12px}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e3e6ea;padding:3px 9px;text-align:right}th{background:#f0f2f5}
td:first-child,th:first-child{text-align:left}img.fig{max-width:100%;height:auto;border:1px solid #eee}
.pair{display:flex;flex-wrap:wrap;gap:14px}.pair figure{margin:0;flex:1 1 520px}
figcaption{color:#5a6474;font-size:12px}.controls{margin:6px 0 12px}.controls label{margin-right:16px}
#cam-grid{display:flex;flex-wrap:wrap;gap:10px}.cam{margin:0;width:260px;border:1px solid #dde1e7;
border-radius:6px;padding:6px;background:#fafbfc}.cam img{width:100%}.cam[hidden]{display:none}
.err-false-negative{border-color:#c62828;border-width:2px}.err-false-positive{border-color:#ef6c00;border-width:2px}
.tag{display:inline-block;padding:0 6px;border-radius:3px;font-size:11px;color:#fff;background:#607d8b}
.tag.false-negative{background:#c62828}.tag.false-positive{background:#ef6c00}.tag.true-positive{background:#2e7d32}
pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:12px;max-height:480px}.muted{color:#5a6474}
.scroll{max-width:100%;overflow-x:auto}.svg svg{max-width:100%;height:auto}
pre.model-card{white-space:pre-wrap;overflow-wrap:anywhere;max-height:none;font-size:13px}
"""

# Marks each figure as shown or broken once the page has loaded, and says so on the page.
_FIGURE_CHECK_SCRIPT = """
window.addEventListener('load',function(){
  var imgs=document.querySelectorAll('img'), broken=0;
  imgs.forEach(function(i){var ok=i.complete&&i.naturalWidth>0;i.dataset.shown=ok?'yes':'no';if(!ok)broken++;});
  var s=document.getElementById('figure-status');
  if(s&&broken) s.textContent=broken+' of '+imgs.length+' images failed to load';
  document.body.dataset.figuresChecked='yes';
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], script: str = "") -> str:
    """A complete HTML document: header with a table of contents, then ``(id, heading, body)`` sections."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(heading)}</a>' for sid, heading, _ in sections)
    body = "".join(f'<section id="{esc(sid)}"><h2>{esc(heading)}</h2>{content}</section>'
                   for sid, heading, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body><header><h1>{esc(title)}</h1><p>{subtitle}</p>"
        f"<nav>{nav}</nav></header><main>{body}<p class=\"muted\" id=\"figure-status\"></p></main>"
        f"<script>{_FIGURE_CHECK_SCRIPT}{script}</script></body></html>\n"
    )


def table(frame: pd.DataFrame, digits: int = 3, index: bool = False) -> str:
    """``frame`` as an HTML table; floats to ``digits`` places, NaN as ``n/a``."""
    shown = frame.reset_index() if index else frame
    head = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(cell_text(v, digits))}</td>" for v in row) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def cell_text(value: Any, digits: int) -> str:
    """A table cell's text, in report.html and report.md alike: ``n/a`` for a missing value, floats
    to ``digits`` places."""
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(path: str | Path, caption: str, css: str = "fig") -> str:
    """An embedded PNG with its caption; a visible note instead when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return f'<p class="muted">{esc(caption)}: no figure ({esc(path.name)} was not written).</p>'
    return (f'<figure><img class="{css}" alt="{esc(caption)}" src="{png_data_uri(path)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def interval(estimate: Any, lower: Any = None, upper: Any = None, digits: int = 3, too_few: bool = False) -> str:
    """``0.812 (0.790–0.833)``; ``n/a`` for an undefined estimate; ``0.812 (too few)`` when the
    group is too small for its interval to mean anything."""
    if not finite(estimate):
        return "n/a"
    if too_few:
        return f"{float(estimate):.{digits}f} ({TOO_FEW})"
    if not (finite(lower) and finite(upper)):
        return f"{float(estimate):.{digits}f}"
    return f"{float(estimate):.{digits}f} ({float(lower):.{digits}f}–{float(upper):.{digits}f})"


def finite(value: Any) -> bool:
    """A finite number: not a bool, None, a string or a NaN read from a file."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def cards(items: Iterable[tuple[str, str, str]]) -> str:
    """Headline figures: ``(label, value, detail)`` each in a box."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
        f'<div class="ci">{esc(d)}</div></div>'
        for k, v, d in items
    ) + "</div>"


# A run directory's files the pages read: each may be absent (the page says so) and may come from
# someone else.
def optional_csv(path: Path, **kwargs: Any) -> pd.DataFrame | None:
    """The table at ``path``, or None when the run has no such file."""
    return pd.read_csv(path, **kwargs) if path.is_file() else None


def optional_json(path: Path) -> dict[str, Any]:
    """The mapping at ``path`` as plain data under the schema's bounds; empty when there is no such file."""
    if not path.is_file():
        return {}
    check = schema.Checker(str(path), DataError)
    return schema.mapping(schema.read_json(path, check), check, "")
