"""Self-contained HTML pages: a run's ``report.html`` and a sweep's ``comparison.html``.

One file a person opens in a browser, offline: figures are embedded as base64 PNG, the style and
the gallery's script are inline, nothing is fetched from the network. The pages only lay out what
evaluate, explain and compare already wrote (their CSV, JSON and PNG files); no number is
computed here except the error class of each CAM overlay (its finding's truth against its
probability and the label's threshold).

Page building is a handful of string functions over ``html.escape`` rather than a template
engine: the pages are small and fixed, and a new dependency would buy nothing.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_lightning import schema
from cxr_lightning.data import nih
from cxr_lightning.errors import DataError
from cxr_lightning.files import write_text
from cxr_lightning.run_dir import HISTORY, EvaluationDir, ExplainDir, RunDir

# The files of a run directory the report reads (each optional except the evaluation's metrics)
# are named by run_dir.py. With a post-hoc calibration the reliability figure draws the raw (grey)
# and the calibrated (blue) curves together.

# Error classes of a CAM overlay, in the gallery's default order: misses first.
FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, TRUE_NEGATIVE, UNKNOWN = (
    "false negative", "false positive", "true positive", "true negative", "no label",
)
ERROR_ORDER = (FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, TRUE_NEGATIVE, UNKNOWN)
DEMO_NOTE = (
    "This run used the generated demo dataset: a constructed demo for exercising the pipeline, "
    "not evidence about real radiographs."
)
# Below this many patients in a subgroup a bootstrap interval says little (5 patients resample to a
# zero-width interval), so the tables print "too few" in its place.
DEFAULT_MIN_PATIENTS = 30
TOO_FEW = "too few"
# history.csv and model_card.md may come from elsewhere: the page reads at most this much of them.
HISTORY_MAX_BYTES = 2_000_000
HISTORY_MAX_EPOCHS = 10_000
MODEL_CARD_MAX_BYTES = 1_000_000
# Training-curve panels: (title, history.csv columns drawn in it, log scale when positive).
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss"), False),
    ("validation mean AUROC", ("val/auroc_mean",), False),
    ("learning rate", ("lr",), True),
)

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

# Sorting and filtering the gallery; the URL fragment (#sort=probability&finding=Mass&error=...)
# presets the controls so a view can be shared as a link.
_GALLERY_SCRIPT = """
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


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
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
        "<tr>" + "".join(f"<td>{esc(_cell(v, digits))}</td>" for v in row) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _cell(value: Any, digits: int) -> str:
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
    if not _finite(estimate):
        return "n/a"
    if too_few:
        return f"{float(estimate):.{digits}f} ({TOO_FEW})"
    if not (_finite(lower) and _finite(upper)):
        return f"{float(estimate):.{digits}f}"
    return f"{float(estimate):.{digits}f} ({float(lower):.{digits}f}–{float(upper):.{digits}f})"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def cards(items: Iterable[tuple[str, str, str]]) -> str:
    """Headline figures: ``(label, value, detail)`` each in a box."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
        f'<div class="ci">{esc(d)}</div></div>'
        for k, v, d in items
    ) + "</div>"


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame | None:
    return pd.read_csv(path, **kwargs) if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    # A run directory's files may come from someone else: plain data under the schema's bounds.
    if not path.is_file():
        return {}
    check = schema.Checker(str(path), DataError)
    return schema.mapping(schema.read_json(path, check), check, "")


# --------------------------------------------------------------------------------------------
# The run report
# --------------------------------------------------------------------------------------------
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


def run_report(run_dir: str | Path) -> Path | None:
    """(Re)render ``run_dir/report.html`` from what the run holds; None when it is not evaluated yet.

    Called at the end of evaluate and of explain, so the page shows whichever parts exist.
    """
    run = RunDir(run_dir)
    if not run.evaluation.metrics.is_file():
        return None
    return render_report(run.evaluation.root, run.explain.root, run.config, run.report_html, history=run.history)


def render_report(
    evaluation_dir: str | Path,
    explain_dir: str | Path | None = None,
    config_file: str | Path | None = None,
    out: str | Path | None = None,
    history: str | Path | None = None,
    min_patients: int | None = None,
) -> Path:
    """Write the report page of one evaluation (and its explain outputs, when given) to ``out``
    (default ``evaluation_dir/report.html``); returns its path.

    ``history`` is the training run's ``history.csv`` (drawn as training curves); subgroups of
    fewer than ``min_patients`` patients (default: the evaluation's own ``min_patients`` setting,
    else DEFAULT_MIN_PATIENTS) show ``too few`` in place of their interval."""
    ev = Path(evaluation_dir)
    metrics = _read_json(EvaluationDir(ev).metrics)
    per_class = pd.read_csv(EvaluationDir(ev).per_class, index_col=0)
    explain = Path(explain_dir) if explain_dir is not None and Path(explain_dir).is_dir() else None
    ex_metrics = _read_json(ExplainDir(explain).metrics) if explain else {}
    config = metrics.get("config") or {}
    demo = config.get("data_source") == "demo"
    if min_patients is None:
        # explain re-renders the page without evaluate's config: the evaluation's metrics keep it
        written = metrics.get("min_patients", DEFAULT_MIN_PATIENTS)
        valid = isinstance(written, int) and not isinstance(written, bool) and written >= 0
        min_patients = written if valid else DEFAULT_MIN_PATIENTS

    sections = [
        ("headline", "Headline", _headline(metrics, ex_metrics, demo)),
        ("training", "Training curves", training_curves(history)),
        ("curves", "ROC and precision-recall curves", _curves(ev)),
        ("per-label", "Per-label results", _per_label(per_class, metrics)),
        ("calibration", "Calibration", _calibration(ev, metrics)),
        ("subgroups", "Subgroups and underdiagnosis", _subgroups(ev, metrics, min_patients)),
    ]
    if explain is not None:
        sections += [
            ("gallery", "Grad-CAM gallery", _gallery(explain, ev, per_class)),
            ("localisation", "Localisation", _localisation(explain, ex_metrics)),
        ]
    sections.append(("model-card", "Model card", _model_card(EvaluationDir(ev).model_card)))
    sections.append(("config", "Configuration", _config(metrics, config, config_file)))
    subtitle = (f"{esc(config.get('backbone', '?'))} + {esc(config.get('head', '?'))} · "
                f"{esc(metrics.get('split', '?'))} split: {esc(metrics.get('n_images', '?'))} images of "
                f"{esc(metrics.get('n_patients', '?'))} patients · checkpoint {esc(metrics.get('checkpoint', '?'))}")
    text = page("Evaluation report", subtitle, sections, _GALLERY_SCRIPT)
    target = Path(out) if out is not None else EvaluationDir(ev).report_html
    write_text(target, text)
    return target


def _headline(metrics: Mapping[str, Any], ex_metrics: Mapping[str, Any], demo: bool) -> str:
    level = round(100 * (1 - float(metrics.get("alpha", 0.05))))

    def ci(key: str) -> str:
        lower, upper = metrics.get(f"{key}_lower"), metrics.get(f"{key}_upper")
        if not (_finite(lower) and _finite(upper)):
            return ""
        return f"{level}% CI {lower:.3f}–{upper:.3f} (patient bootstrap)"

    items = [
        ("mean AUROC", interval(metrics.get("auroc_mean")), ci("auroc_mean")),
        ("mean AUPRC", interval(metrics.get("auprc_mean")), ci("auprc_mean")),
        ("macro F1", interval(metrics.get("f1_macro")), "at val-chosen thresholds"),
        ("mean sensitivity", interval(metrics.get("sensitivity_mean")), "at val-chosen thresholds"),
        ("mean specificity", interval(metrics.get("specificity_mean")), "at val-chosen thresholds"),
        ("mean ECE", interval(metrics.get("ece_mean")),
         f"before calibration {interval(metrics.get('ece_mean_uncalibrated'))}"
         if metrics.get("calibration_method", "none") != "none" else "uncalibrated"),
    ]
    if "localization.pointing_game" in ex_metrics:
        items.append(("pointing game", interval(ex_metrics["localization.pointing_game"]),
                      f"random baseline {interval(ex_metrics.get('localization.random_pointing_game'))}"))
    note = f'<p class="note">{esc(DEMO_NOTE)}</p>' if demo else ""
    undefined = metrics.get("undefined_labels") or []
    extra = (f"<p>Labels without a defined AUROC in this split (left out of the means): "
             f"{esc(', '.join(undefined))}.</p>" if undefined else "")
    headline = metrics.get("competition") or {}
    if headline:
        extra += (f"<p>CheXpert's five competition labels ({esc(', '.join(headline['labels']))}): mean AUROC "
                  f"{esc(interval(headline['auroc_mean'], headline['lower'], headline['upper']))}.</p>")
    per_source = metrics.get("per_source") or {}
    if per_source:
        frame = pd.DataFrame([
            {"source": name, "images": s["n_images"], "patients": s["n_patients"],
             "mean AUROC": interval(s["auroc_mean"], s["lower"], s["upper"]), "labels scored": ", ".join(s["labels"])}
            for name, s in per_source.items()])
        extra += ("<h3>Per source</h3><p>Each source's test images alone, over the labels that source scores; two "
                  "sources' means compare only over the labels both score.</p>" + table(frame))
    return note + cards(items) + extra


def _curves(ev: Path) -> str:
    return ('<div class="pair">' + figure(EvaluationDir(ev).figure("roc"), "ROC curve per label")
            + figure(EvaluationDir(ev).figure("pr"), "Precision-recall curve per label (prevalence dashed)") + "</div>")


def _per_label(per_class: pd.DataFrame, metrics: Mapping[str, Any]) -> str:
    level = round(100 * (1 - float(metrics.get("alpha", 0.05))))
    shown = pd.DataFrame(
        {
            "positives": per_class["n_pos"],
            f"AUROC ({level}% CI)": [
                interval(*v) for v in per_class[["auroc", "auroc_lower", "auroc_upper"]].to_numpy()],
            f"AUPRC ({level}% CI)": [
                interval(*v) for v in per_class[["auprc", "auprc_lower", "auprc_upper"]].to_numpy()],
            **{c: per_class[c] for c in ("threshold", "sensitivity", "specificity", "precision", "f1", "ece")
               if c in per_class},
        },
        index=per_class.index,
    )
    return ("<p>Thresholds chosen per label on the validation split "
            f"({esc(metrics.get('threshold_method', '?'))}); a case is positive if p ≥ threshold.</p>"
            + table(shown, index=True))


def _calibration(ev: Path, metrics: Mapping[str, Any]) -> str:
    if metrics.get("calibration_method", "none") != "none":
        return (f"<p>{esc(metrics.get('calibration', metrics['calibration_method']))}. Mean ECE before calibration "
                f"{esc(interval(metrics.get('ece_mean_uncalibrated')))}, "
                f"after {esc(interval(metrics.get('ece_mean')))}.</p>"
                + figure(EvaluationDir(ev).figure("reliability"),
                         "Reliability before (grey, raw) and after (blue) calibration"))
    return ("<p>The model's own probabilities (this evaluation applied no post-hoc calibration); "
            f"mean ECE {esc(interval(metrics.get('ece_mean')))} over "
            f"{esc(metrics.get('calibration_bins', '?'))} equal-width bins.</p>"
            + figure(EvaluationDir(ev).figure("reliability"), "Reliability, uncalibrated"))


def _subgroups(ev: Path, metrics: Mapping[str, Any], min_patients: int) -> str:
    level = round(100 * (1 - float(metrics.get("alpha", 0.05))))
    parts = []
    subgroups = _read_csv(EvaluationDir(ev).subgroups)
    if subgroups is not None:
        parts.append("<h3>Mean AUROC per subgroup</h3>" + table(subgroup_table(subgroups, min_patients, level)))
    under = _read_csv(EvaluationDir(ev).underdiagnosis)
    if under is not None:
        parts.append("<h3>Underdiagnosis</h3><p>Share of the images with a finding called normal, and each "
                     "finding's false-negative rate, at the chosen thresholds.</p>"
                     + table(underdiagnosis_table(under, min_patients, level)))
    if parts:
        parts.insert(0, f"<p>Each cell: the estimate with its {level}% patient-bootstrap interval; a subgroup of fewer "
                        f"than {min_patients} patients shows “{TOO_FEW}” in place of its interval.</p>")
    return "".join(parts) or '<p class="muted">No subgroup tables were written.</p>'


def _group_columns(frame: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "attribute" in frame:
        out["attribute"] = frame["attribute"].astype(str)
    if "group" in frame:
        out["group"] = frame["group"].astype(str)
    for column, name in (("n_patients", "patients"), ("n_images", "images"), ("n_with_finding", "with a finding")):
        if column in frame:
            out[name] = frame[column]
    return out


def _too_few(frame: pd.DataFrame, min_patients: int) -> list[bool]:
    # without a patient count (an older file) the interval is shown as written
    if "n_patients" not in frame:
        return [False] * len(frame)
    counts = pd.to_numeric(frame["n_patients"], errors="coerce")
    return [bool(pd.isna(n) or n < min_patients) for n in counts]


def subgroup_table(subgroups: pd.DataFrame, min_patients: int = DEFAULT_MIN_PATIENTS, level: int = 95) -> pd.DataFrame:
    """``subgroups.csv`` for reading: group, counts and ``mean AUROC (CI)`` in one cell."""
    few = _too_few(subgroups, min_patients)
    shown = _group_columns(subgroups)
    if "n_labels" in subgroups:
        shown["labels scored"] = subgroups["n_labels"]
    if {"auroc_mean", "lower", "upper"} <= set(subgroups.columns):
        shown[f"mean AUROC ({level}% CI)"] = [
            interval(e, lo, hi, too_few=f)
            for (e, lo, hi), f in zip(subgroups[["auroc_mean", "lower", "upper"]].to_numpy(), few)]
    return pd.DataFrame(shown)


def underdiagnosis_table(
    under: pd.DataFrame, min_patients: int = DEFAULT_MIN_PATIENTS, level: int = 95
) -> pd.DataFrame:
    """``underdiagnosis.csv`` for reading: one column per rate (``underdiagnosis``, ``FNR <finding>``),
    each cell the estimate with its interval, instead of three raw columns per rate."""
    few = _too_few(under, min_patients)
    shown = _group_columns(under)
    counts = {"attribute", "group", "n_images", "n_patients", "n_with_finding"}
    rates = [c for c in under.columns if c not in counts and not c.endswith(("_lower", "_upper"))]
    for rate in rates:
        name = f"FNR {rate[len('fnr.'):]}" if rate.startswith("fnr.") else rate.replace("_", " ")
        lower, upper = under.get(f"{rate}_lower"), under.get(f"{rate}_upper")
        values = pd.to_numeric(under[rate], errors="coerce")
        lows = pd.to_numeric(lower, errors="coerce") if lower is not None else [None] * len(under)
        highs = pd.to_numeric(upper, errors="coerce") if upper is not None else [None] * len(under)
        shown[name] = [interval(e, lo, hi, too_few=f) for e, lo, hi, f in zip(values, lows, highs, few)]
    return pd.DataFrame(shown)


def _gallery(explain: Path, ev: Path, per_class: pd.DataFrame) -> str:
    cams = _read_csv(ExplainDir(explain).cams)
    if cams is None or cams.empty:
        return '<p class="muted">No CAM overlays (explain wrote no cams.csv).</p>'
    thresholds = (per_class["threshold"].drop(index="mean", errors="ignore").to_dict()
                  if "threshold" in per_class else {})
    rows = gallery_table(cams, _read_csv(EvaluationDir(ev).predictions), thresholds)
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
                   f'{f" (threshold {r.threshold:.3f})" if _finite(r.threshold) else ""}<br>'
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


def _localisation(explain: Path, ex_metrics: Mapping[str, Any]) -> str:
    scores = _read_csv(ExplainDir(explain).localization, index_col=0)
    if scores is None:
        return '<p class="muted">No localisation scores (the split has no boxes, or localization=false).</p>'
    return ("<p>Pointing game, IoU and IoBB accuracy of the CAMs against the ground-truth boxes of every "
            f"boxed image of the {esc(ex_metrics.get('split') or 'given')} split, each beside its random baseline.</p>"
            + table(scores, index=True))


def _config(metrics: Mapping[str, Any], config: Mapping[str, Any], config_file: str | Path | None) -> str:
    summary = pd.DataFrame({"setting": list(config), "value": [str(v) for v in config.values()]})
    facts = {k: metrics[k] for k in ("checkpoint", "checkpoint_sha256", "data_root", "label_table", "split",
                                     "threshold_method", "thresholds_file", "n_boot", "alpha", "seed") if k in metrics}
    evaluation = pd.DataFrame({"setting": list(facts), "value": [str(v) for v in facts.values()]})
    text = table(summary) + "<h3>Evaluation</h3>" + table(evaluation)
    if config_file is not None and Path(config_file).is_file():
        text += (f"<details><summary>Full training config ({esc(Path(config_file).name)})</summary>"
                 f"<pre>{esc(Path(config_file).read_text())}</pre></details>")
    return text


# --------------------------------------------------------------------------------------------
# Training curves and the model card
# --------------------------------------------------------------------------------------------
def read_history(path: str | Path | None) -> tuple[pd.DataFrame | None, str]:
    """The numeric columns of ``history.csv`` that the curves draw, indexed by epoch, or ``(None,
    note)`` with the one line the page shows instead: the file is missing, too large, unreadable,
    or has no epoch column or nothing to draw."""
    if path is None:
        return None, "No training curves: this evaluation was not given a training run's history."
    path = Path(path)
    if not path.is_file():
        return None, f"No training curves: the run has no {HISTORY}."
    size = path.stat().st_size
    if size > HISTORY_MAX_BYTES:
        return None, (f"No training curves: {path.name} is {size} bytes, "
                      f"more than the {HISTORY_MAX_BYTES} the page reads.")
    try:
        frame = pd.read_csv(path, nrows=HISTORY_MAX_EPOCHS + 1)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, f"No training curves: cannot read {path.name} ({reason})."
    if len(frame) > HISTORY_MAX_EPOCHS:
        return None, f"No training curves: {path.name} has more than {HISTORY_MAX_EPOCHS} rows."
    if "epoch" not in frame.columns:
        return None, f"No training curves: {path.name} has no epoch column."
    wanted = [c for _, columns, _ in CURVE_PANELS for c in columns if c in frame.columns]
    epoch = pd.to_numeric(frame["epoch"], errors="coerce")
    values = frame[wanted].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    values = values[epoch.notna().to_numpy()].set_axis(epoch.dropna().astype(float), axis=0)
    values = values.dropna(axis=1, how="all")
    if values.empty or values.shape[1] == 0:
        names = ", ".join(c for _, columns, _ in CURVE_PANELS for c in columns)
        return None, f"No training curves: {path.name} has no numeric {names} values."
    return values.rename_axis("epoch").sort_index(), ""


def curves_svg(history: pd.DataFrame) -> str:
    """Inline SVG of the training curves (one panel per CURVE_PANELS entry with data), drawn by
    matplotlib; inline so the figure scales with the page and is text a test can read."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(title, [c for c in columns if c in history.columns], log) for title, columns, log in CURVE_PANELS]
    panels = [p for p in panels if p[1]]
    fig = Figure(figsize=(3.6 * len(panels), 2.8))
    FigureCanvasSVG(fig)
    for k, (title, columns, log) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for column in columns:
            series = history[column].dropna()
            ax.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=column)
        if log and (history[columns].dropna() > 0).all().all() and history[columns].notna().any().any():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def training_curves(history: str | Path | None) -> str:
    frame, note = read_history(history)
    if frame is None:
        return f'<p class="muted" id="no-curves">{esc(note)}</p>'
    return (f'<figure class="svg" id="training-curves">{curves_svg(frame)}<figcaption>Per-epoch training loss, '
            "validation loss, validation mean AUROC and learning rate from the run's history.csv."
            "</figcaption></figure>")


def _model_card(path: Path) -> str:
    if not path.is_file():
        return f'<p class="muted">No model card ({esc(path.name)} was not written).</p>'
    with path.open("rb") as handle:
        raw = handle.read(MODEL_CARD_MAX_BYTES + 1)
    cut = len(raw) > MODEL_CARD_MAX_BYTES
    text = raw[:MODEL_CARD_MAX_BYTES].decode("utf-8", errors="replace")
    more = (f'<p class="muted">The model card is cut at {MODEL_CARD_MAX_BYTES} bytes; read {esc(path.name)}.</p>'
            if cut else "")
    return (f"<p>The content of {esc(path.name)}, as evaluation wrote it.</p>"
            f'<pre class="model-card">{esc(text)}</pre>{more}')
