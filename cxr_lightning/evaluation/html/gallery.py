"""The Grad-CAM gallery: explain's overlays, each with its error class (its finding's truth in the
evaluated split against its probability and the label's threshold), sorted and filtered in the
browser. The error class is the one number the pages compute themselves."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_lightning.data import nih
from cxr_lightning.evaluation.html.page import esc, finite, optional_csv, png_data_uri
from cxr_lightning.run_dir import EvaluationDir, ExplainDir

# Error classes of a CAM overlay, in the gallery's default order: misses first.
FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, TRUE_NEGATIVE, UNKNOWN = (
    "false negative", "false positive", "true positive", "true negative", "no label",
)
ERROR_ORDER = (FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, TRUE_NEGATIVE, UNKNOWN)

# Sorting and filtering the gallery; the URL fragment (#sort=probability&finding=Mass&error=...)
# presets the controls so a view can be shared as a link.
GALLERY_SCRIPT = """
(function(){
  var gallery=document.getElementById("cam-grid"); if(!gallery) return;
  var cards=Array.prototype.slice.call(gallery.querySelectorAll('.cam'));
  var sort=document.getElementById('sort'), finding=document.getElementById('finding'),
      error=document.getElementById('error'), count=document.getElementById('shown-count');
  var keys={
    errors:function(a,b){return a.dataset.rank-b.dataset.rank||b.dataset.probability-a.dataset.probability;},
    probability:function(a,b){return b.dataset.probability-a.dataset.probability;},
    probability_low:function(a,b){return a.dataset.probability-b.dataset.probability;},
    finding:function(a,b){return a.dataset.finding.localeCompare(b.dataset.finding)||a.dataset.rank-b.dataset.rank;}
  };
  function apply(){
    var order=cards.slice().sort(function(a,b){return keys[sort.value](a,b)||a.dataset.index-b.dataset.index;});
    var n=0;
    order.forEach(function(c){
      var show=(finding.value==='all'||c.dataset.finding===finding.value)
               &&(error.value==='all'||c.dataset.error===error.value);
      c.hidden=!show; if(show) n++; gallery.appendChild(c);
    });
    count.textContent=n+' of '+cards.length+' overlays shown';
    gallery.dataset.sorted=sort.value;
  }
  var preset={};
  location.hash.replace(/^#/,'').split('&').forEach(function(kv){
    var p=kv.split('=');if(p[1])preset[p[0]]=decodeURIComponent(p[1]);
  });
  [['sort',sort],['finding',finding],['error',error]].forEach(function(e){
    if(preset[e[0]]!==undefined&&e[1].querySelector('option[value="'+preset[e[0]]+'"]')) e[1].value=preset[e[0]];
    e[1].addEventListener('change',apply);
  });
  apply();
})();
"""


def error_class(truth: Any, probability: float, threshold: float) -> str:
    """The overlay's outcome at the label's threshold (positive if p >= threshold)."""
    if truth is None or pd.isna(truth) or pd.isna(threshold):
        return UNKNOWN
    positive = probability >= threshold
    if truth:
        return TRUE_POSITIVE if positive else FALSE_NEGATIVE
    return FALSE_POSITIVE if positive else TRUE_NEGATIVE


def gallery_table(
    cams: pd.DataFrame, predictions: pd.DataFrame | None, thresholds: Mapping[str, float]
) -> pd.DataFrame:
    """``cams.csv`` with each overlay's truth, threshold, error class and its rank in ERROR_ORDER.

    Truth comes from the evaluated split's ``predictions.csv`` (columns ``Image Index`` and
    ``label:<finding>``); an image outside it (another split, a file) gets ``no label``.
    """
    truth = []
    by_image = predictions.set_index(nih.IMAGE) if predictions is not None else None
    for image, finding in zip(cams["image"], cams["finding"]):
        column = f"label:{finding}"
        known = by_image is not None and image in by_image.index and column in by_image.columns
        value = by_image.at[image, column] if known else None
        truth.append(None if value is None or pd.isna(value) else bool(value))
    out = cams.assign(truth=truth, threshold=[thresholds.get(f, math.nan) for f in cams["finding"]])
    out["error"] = [error_class(t, p, th) for t, p, th in zip(out["truth"], out["probability"], out["threshold"])]
    out["rank"] = out["error"].map(ERROR_ORDER.index)
    return out


def gallery_section(explain: Path, ev: Path, per_class: pd.DataFrame) -> str:
    """Every overlay explain drew, captioned with its outcome, and the controls that sort and filter them
    (:data:`GALLERY_SCRIPT` must be on the page)."""
    cams = optional_csv(ExplainDir(explain).cams)
    if cams is None or cams.empty:
        return '<p class="muted">No CAM overlays (explain wrote no cams.csv).</p>'
    thresholds = (per_class["threshold"].drop(index="mean", errors="ignore").to_dict()
                  if "threshold" in per_class else {})
    rows = gallery_table(cams, optional_csv(EvaluationDir(ev).predictions), thresholds)
    controls = (
        '<div class="controls"><label>Sort <select id="sort">'
        '<option value="errors">errors first (false negatives first)</option>'
        '<option value="probability">probability, high to low</option>'
        '<option value="probability_low">probability, low to high</option>'
        '<option value="finding">finding</option></select></label>'
        f'<label>Finding <select id="finding">{_options(sorted(rows["finding"].unique()), "all findings")}'
        '</select></label><label>Outcome <select id="error">'
        f'{_options([e for e in ERROR_ORDER if e in set(rows["error"])], "all outcomes")}</select></label>'
        '<span id="shown-count" class="muted"></span></div>'
    )
    items = []
    for i, r in enumerate(rows.itertuples(index=False)):
        slug = r.error.replace(" ", "-")
        caption = (f'<span class="tag {slug}">{esc(r.error)}</span> <b>{esc(r.finding)}</b> p={r.probability:.3f}'
                   f'{f" (threshold {r.threshold:.3f})" if finite(r.threshold) else ""}<br>'
                   f'<span class="muted">{esc(r.image)} · {int(r.n_boxes)} box(es)</span>')
        items.append(
            f'<figure class="cam err-{slug}" data-index="{i}" data-finding="{esc(r.finding)}" '
            f'data-error="{esc(r.error)}" '
            f'data-rank="{int(r.rank)}" data-probability="{r.probability:.6f}" data-image="{esc(r.image)}">'
            f'{_overlay(explain / r.overlay, r.title)}<figcaption>{caption}</figcaption></figure>'
        )
    return ("<p>Grad-CAM heatmap of each (image, finding) explain drew, ground-truth boxes in green. Outcome: "
            "the finding's label in the evaluated split against the probability at the label's threshold.</p>"
            + controls + f'<div id="cam-grid">{"".join(items)}</div>')


def _overlay(path: Path, title: str) -> str:
    if not path.is_file():
        return f'<p class="muted">overlay {esc(path.name)} is missing</p>'
    return f'<img alt="{esc(title)}" src="{png_data_uri(path)}">'


def _options(values: Iterable[str], every: str) -> str:
    return f'<option value="all">{esc(every)}</option>' + "".join(
        f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
