"""Rendering of an evaluation: markdown tables, ``report.md`` and the ROC, PR and reliability figures.

Pure presentation: the numbers come from :mod:`.statistics` (via the evaluate task); this
module only lays them out. Figures use matplotlib's object API on an Agg canvas (no pyplot, no
display, no global state), one small panel per label so that fifteen curves stay readable.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.functional.classification import (
    binary_precision_recall_curve,
    binary_roc,
)

from cxr_lightning.evaluation.html.page import cell_text
from cxr_lightning.evaluation.statistics import reliability_curve
from cxr_lightning.files import atomic_path
from cxr_lightning.run_dir import FIGURES

_PANEL_INCHES = 2.4


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def markdown_table(frame: pd.DataFrame, digits: int = 3, index: bool = True) -> str:
    """A GitHub-flavoured markdown table of ``frame``; floats to ``digits`` places, NaN as ``n/a``.

    (``DataFrame.to_markdown`` would need the ``tabulate`` package for these few lines.)
    """
    table = frame.reset_index() if index else frame
    header = [md(c) for c in table.columns]
    cells = [[_cell(v, digits) for v in row] for row in table.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in table.columns]
    rule = ["---:" if is_num else "---" for is_num in numeric]
    lines = [header, rule, *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _cell(value: Any, digits: int) -> str:
    return md(cell_text(value, digits))


# What a Markdown viewer would read as HTML (a <script>, an <img onerror>), a link or an image (a
# tracking pixel), a code span's end or a table cell's end: text taken from a checkpoint, a run
# directory or a data table (label names, config values, paths) is shown, never interpreted.
_MD_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": "'", "|": "\\|", "[": "\\[", "]": "\\]", "\n": " ", "\r": " "}
)


def md(value: Any) -> str:
    """``value`` as inert Markdown text (see :data:`_MD_ESCAPES`)."""
    return str(value).translate(_MD_ESCAPES)


def md_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every string (and every string in a list) through :func:`md`; numbers stay numbers."""
    def one(v: Any) -> Any:
        if isinstance(v, str):
            return md(v)
        if isinstance(v, (list, tuple)):
            return [one(x) for x in v]
        if isinstance(v, Mapping):
            return {md(k): one(x) for k, x in v.items()}
        return v

    return {k: one(v) for k, v in values.items()}


def interval(estimate: float, lower: float, upper: float, digits: int = 3) -> str:
    """``0.812 (0.790-0.833)``; ``n/a`` for an undefined estimate."""
    if estimate is None or not np.isfinite(estimate):
        return "n/a"
    if lower is None or not (np.isfinite(lower) and np.isfinite(upper)):
        return f"{estimate:.{digits}f}"
    return f"{estimate:.{digits}f} ({lower:.{digits}f}–{upper:.{digits}f})"


def per_source_lines(summary: Mapping[str, Any], level: int) -> list[str]:
    """The competition headline and a pooled run's per-source figures, as markdown lines."""
    lines: list[str] = []
    headline = summary.get("competition") or {}
    if headline:
        lines += [f"CheXpert's five competition labels ({', '.join(headline['labels'])}): mean AUROC "
                  f"{interval(headline['auroc_mean'], headline['lower'], headline['upper'])}.", ""]
    per_source = summary.get("per_source") or {}
    if per_source:
        frame = pd.DataFrame([
            {"source": name, "images": s["n_images"], "patients": s["n_patients"],
             "mean AUROC": interval(s["auroc_mean"], s["lower"], s["upper"]), "labels scored": ", ".join(s["labels"])}
            for name, s in per_source.items()])
        lines += [
            "## Per source",
            "",
            f"Each source's test images alone: mean AUROC with {level}% patient-bootstrap intervals over the labels "
            "that source scores. Two sources' means compare only over the labels both score.",
            "",
            markdown_table(frame, index=False),
        ]
    return lines


def _settings_table(config: Mapping[str, Any]) -> str:
    settings = pd.DataFrame({"setting": list(config), "value": [str(v) for v in config.values()]})
    return markdown_table(settings, index=False)


def render_report(
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    per_class: pd.DataFrame,
    subgroups: pd.DataFrame,
    underdiagnosis: pd.DataFrame | None = None,
    figures: Mapping[str, str] = FIGURES,
) -> str:
    """The text of ``report.md``.

    ``summary`` holds the run's facts (checkpoint, split, label table, counts, bootstrap and
    threshold settings); ``config`` the checkpoint's training-config summary; ``per_class`` and
    ``subgroups`` the tables ``evaluate`` writes as CSV.
    """
    settings = _settings_table(config)
    summary = md_values(summary)
    level = round(100 * (1 - float(summary["alpha"])))
    lines = [
        *_report_facts(summary, level),
        "## Model",
        "",
        settings,
        *_report_results(summary, level, per_class, subgroups),
        *per_source_lines(summary, level),
        *_report_notes(summary, level, underdiagnosis),
        *_report_figures(figures),
    ]
    return "\n".join(lines)


def _report_facts(summary: Mapping[str, Any], level: int) -> list[str]:
    """The title and what was evaluated how: checkpoint, data, split, thresholds, calibration, intervals."""
    boot = f"{summary['n_boot']} patient-level bootstrap resamples (seed {summary['seed']})"
    return [
        "# Evaluation report",
        "",
        f"- Checkpoint: `{summary['checkpoint']}` (sha256 `{str(summary['checkpoint_sha256'])[:12]}…`)",
        _data_line(summary),
        f"- Evaluated split: **{summary['split']}**: {summary['n_images']} images of "
        f"{summary['n_patients']} patients" + _left_out(summary),
        _threshold_line(summary),
        f"- Calibration: {summary['calibration']}"
        + (f", saved to `{summary['calibration_file']}`" if summary.get("calibration_file") else "")
        + ". Every probability below (and the thresholds) is on the calibrated scale; `ECE raw` is the "
        "model's output before calibration.",
        f"- Intervals: {level}% percentile intervals over {boot}: all images of a drawn patient are "
        "resampled together.",
        "",
    ]


def _report_results(
    summary: Mapping[str, Any], level: int, per_class: pd.DataFrame, subgroups: pd.DataFrame
) -> list[str]:
    return [
        "## Per-label results",
        "",
        f"AUROC and AUPRC with {level}% intervals; sensitivity, specificity, precision and F1 at the "
        "label's threshold (positive if p >= threshold); ECE over equal-width probability bins. "
        "`n/a`: undefined in this split (no positives, or no negatives, for that label).",
        "",
        markdown_table(_per_class_display(per_class)),
        "## Subgroups",
        "",
        f"Mean AUROC over the labels defined in each subgroup, with {level}% patient-bootstrap intervals.",
        "",
        markdown_table(_subgroup_display(subgroups), index=False),
    ]


def _report_notes(summary: Mapping[str, Any], level: int, underdiagnosis: pd.DataFrame | None) -> list[str]:
    """Labels the checkpoint has but the data lacks, the underdiagnosis table, labels without an AUROC
    and labels given the fallback threshold; each only when there is something to say."""
    lines: list[str] = []
    unavailable = summary.get("unavailable_labels") or []
    if unavailable:
        lines += [f"Labels of the checkpoint without a counterpart in {summary.get('data_source')} (unavailable, not "
                  f"scored; see the harmonisation table): {', '.join(unavailable)}.", ""]
    if underdiagnosis is not None:
        lines += [
            "## Underdiagnosis",
            "",
            "As CheXclusion (Seyyed-Kalantari et al. 2021): among the images with at least one finding, the share "
            "called \"No Finding\" at the chosen thresholds, and the false-negative rate (mean over findings; per "
            f"finding in `underdiagnosis.csv`), with {level}% patient-bootstrap intervals. `sex_x_age` is the "
            "intersection of sex and age band.",
            "",
            markdown_table(_underdiagnosis_display(underdiagnosis), index=False),
        ]
    undefined = summary.get("undefined_labels") or []
    if undefined:
        lines += [f"Labels without a defined AUROC in this split (left out of the mean): {', '.join(undefined)}.", ""]
    fallback = summary.get("fallback_threshold_labels") or []
    if fallback:
        lines += [
            f"Labels without positives or negatives in the val split, given the fallback threshold "
            f"0.5: {', '.join(fallback)}.",
            "",
        ]
    return lines


def _report_figures(figures: Mapping[str, str]) -> list[str]:
    return [
        "## Figures",
        "",
        f"![ROC curves]({figures['roc']})",
        "",
        f"![Precision-recall curves]({figures['pr']})",
        "",
        f"![Reliability diagrams]({figures['reliability']})",
        "",
    ]


def _data_line(summary: Mapping[str, Any]) -> str:
    data = f"`{summary['data_root']}`, label table `{summary['label_table']}`"
    if not summary.get("external"):
        return f"- Data: {data}"
    return (f"- Data: **external**: the checkpoint was trained on **{summary.get('trained_on')}** and is scored on "
            f"**{summary.get('data_source')}** ({data}); uncertain labels: `{summary.get('uncertain')}`")


def _left_out(summary: Mapping[str, Any]) -> str:
    left_out = summary.get("left_out") or {}
    if not left_out:
        return ""
    reasons = ", ".join(f"{why}: {n}" for why, n in left_out.items())
    return f" (frontal views only; left out of the source: {reasons})"


def _threshold_line(summary: Mapping[str, Any]) -> str:
    if summary.get("external") and not summary.get("n_images_val"):
        return f"- Thresholds: {summary['threshold_source']}: `{summary['thresholds_file']}`"
    saved = f", saved to `{summary['thresholds_file']}`" if summary.get("thresholds_file") else " (not saved)"
    if summary.get("run_files_kept"):
        saved += (" (this evaluation's own: the checkpoint keeps the thresholds and calibration predict applies, "
                  "and `write_to_run=true` replaces them with these)")
    return (
        f"- Thresholds: chosen per label on the **val** split ({summary['n_images_val']} images of "
        f"{summary['n_patients_val']} patients) by `{summary['threshold_method']}`{saved}"
    )


def _per_class_display(per_class: pd.DataFrame) -> pd.DataFrame:
    rows = per_class
    return pd.DataFrame(
        {
            "n_pos": rows["n_pos"],
            "AUROC": [interval(*v) for v in rows[["auroc", "auroc_lower", "auroc_upper"]].to_numpy()],
            "AUPRC": [interval(*v) for v in rows[["auprc", "auprc_lower", "auprc_upper"]].to_numpy()],
            "threshold": rows["threshold"],
            "sensitivity": rows["sensitivity"],
            "specificity": rows["specificity"],
            "precision": rows["precision"],
            "F1": rows["f1"],
            "ECE": rows["ece"],
            "ECE raw": rows["ece_uncalibrated"],
        },
        index=rows.index,
    )


def render_model_card(
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    data: pd.DataFrame,
    per_class: pd.DataFrame,
    subgroups: pd.DataFrame,
    underdiagnosis: pd.DataFrame,
) -> str:
    """The text of ``model_card.md``: intended use and limits, data, results, training, and the
    TRIPOD+AI / CLAIM items the framework knows. ``data`` has one row per label plus ``images``
    and ``patients`` rows, one column per split (counts) and ``<split> prevalence`` columns."""
    settings = _settings_table(config)
    summary, config = md_values(summary), md_values(config)
    lines = [
        "# Model card",
        "",
        f"Checkpoint `{summary['checkpoint']}` (sha256 `{summary['checkpoint_sha256']}`).",
        "",
        *_card_intended_use(demo=str(config.get("data_source")) == "demo"),
        "",
        *_card_data(summary, config, data),
        *_card_results(summary, per_class, subgroups, underdiagnosis),
        "## Training",
        "",
        settings,
        *CARD_CHECKLIST,
    ]
    return "\n".join(lines)


def _card_intended_use(demo: bool) -> list[str]:
    lines = [
        "## Intended use and limits",
        "",
        '- Research use only: multi-label screening scores for 14 findings and "No Finding" on **frontal** (PA/AP) '
        "chest radiographs of adults and children as in NIH ChestX-ray14. Not a medical device; not for diagnosis.",
        "- Lateral films are refused by predict; other modalities, body parts and paediatric-only"
        " populations are out of scope.",
        "- The NIH labels were text-mined from radiology reports (NLP, estimated accuracy around 90%), so every figure "
        "below is measured against noisy labels, not a radiologist's reading.",
        "- Performance outside the population of the training data (other hospitals, scanners, ages) is unknown until "
        "measured on an external set.",
    ]
    if demo:
        lines += [
            "- **These figures come from the constructed demo dataset: they exercise the pipeline and are not "
            "evidence of clinical performance.**"
        ]
    return lines


def _card_data(summary: Mapping[str, Any], config: Mapping[str, Any], data: pd.DataFrame) -> list[str]:
    return [
        "## Data",
        "",
        f"Label table `{summary['label_table']}` under `{summary['data_root']}`; patient-level split (seed "
        f"{config.get('split_seed')}): no patient appears in two splits. Counts and label prevalences:",
        "",
        markdown_table(data),
    ]


def _card_results(
    summary: Mapping[str, Any], per_class: pd.DataFrame, subgroups: pd.DataFrame, underdiagnosis: pd.DataFrame
) -> list[str]:
    level = round(100 * (1 - float(summary["alpha"])))
    mean = per_class.loc["mean"]
    return [
        "## Results",
        "",
        f"On the **{summary['split']}** split ({summary['n_images']} images, {summary['n_patients']} patients), "
        f"{level}% patient-bootstrap intervals ({summary['n_boot']} resamples):",
        "",
        f"- Mean AUROC {interval(mean['auroc'], mean['auroc_lower'], mean['auroc_upper'])}, "
        f"mean AUPRC {interval(mean['auprc'], mean['auprc_lower'], mean['auprc_upper'])}, macro F1 {mean['f1']:.3f}.",
        f"- Calibration: {summary['calibration']}. ECE {mean['ece']:.3f} after, {mean['ece_uncalibrated']:.3f} before.",
        f"- Thresholds: per label on the val split by `{summary['threshold_method']}`, on the calibrated scale "
        f"(`{summary['thresholds_file']}`).",
        "",
        markdown_table(_per_class_display(per_class)),
        "### Subgroups",
        "",
        markdown_table(_subgroup_display(subgroups), index=False),
        "### Underdiagnosis",
        "",
        markdown_table(_underdiagnosis_display(underdiagnosis), index=False),
    ]


# The TRIPOD+AI and CLAIM items this framework records, and where the card or the run holds each.
CARD_CHECKLIST = (
    "## Reporting checklists (TRIPOD+AI, CLAIM): items this framework records",
    "",
    "| item | where |",
    "| --- | --- |",
    "| Source of data, eligibility (frontal views), label definition (text-mined NIH labels) | Data"
    " above; `label_table` |",
    "| Data partitions at the patient level, no overlap | Data above (patients per split) |",
    "| Sample size per split and outcome prevalence | Data above |",
    "| Handling of missing predictors (age imputed with the training median, flagged) | training config"
    " `age_fill` |",
    "| Model type, architecture, pretraining, input size, preprocessing | Training above |",
    "| Training procedure: loss, optimizer, epochs, seed, selection metric | Training above; run"
    " `metrics.json` `selection` |",
    "| Performance measures with confidence intervals (discrimination) | Results above |",
    "| Calibration before and after post-hoc recalibration | Results above; `reliability.png` |",
    "| Operating points and how thresholds were chosen (validation split only) | Results above |",
    "| Fairness: performance and underdiagnosis by sex, age, view, sex x age | Subgroups, Underdiagnosis above |",
    "| Explainability (Grad-CAM) and localisation against boxes, beside a fair random baseline | `python"
    " -m cxr_lightning.explain` |",
    "| Not recorded here: external validation, clinical setting and users, reader studies, failure"
    " analysis | to be reported by the study |",
    "",
)


def _underdiagnosis_display(audit: pd.DataFrame) -> pd.DataFrame:
    fnr = [c for c in audit.columns if c.startswith("fnr.") and not c.endswith(("_lower", "_upper"))]
    return pd.DataFrame(
        {
            "attribute": audit["attribute"],
            "group": audit["group"],
            "images": audit["n_images"],
            "with a finding": audit["n_with_finding"],
            "called No Finding": [
                interval(*v)
                for v in audit[["underdiagnosis", "underdiagnosis_lower", "underdiagnosis_upper"]].to_numpy()
            ],
            "mean FNR": audit[fnr].mean(axis=1, skipna=True),
        }
    )


def _subgroup_display(subgroups: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "attribute": subgroups["attribute"],
            "group": subgroups["group"],
            "images": subgroups["n_images"],
            "patients": subgroups["n_patients"],
            "labels": subgroups["n_labels"],
            "mean AUROC": [interval(*v) for v in subgroups[["auroc_mean", "lower", "upper"]].to_numpy()],
        }
    )


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def _panels(n: int, title: str, xlabel: str, ylabel: str) -> tuple[Figure, list[Any]]:
    """A grid of ``n`` unit-square panels sharing axes; unused grid cells are hidden."""
    cols = min(4, n)
    rows = math.ceil(n / cols)
    height = _PANEL_INCHES * rows + 0.9
    fig = Figure(figsize=(_PANEL_INCHES * cols, height))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel().tolist()
    # Fixed margins and shared, outer-only tick labels: constrained layout and per-panel labels
    # measure every text box and cost seconds per figure.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.55 / height, top=1 - 0.85 / height, wspace=0.1, hspace=0.45)
    for i, ax in enumerate(axes):
        ax.set_xticks([0.0, 0.5, 1.0])
        ax.set_yticks([0.0, 0.5, 1.0])
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        # tick labels on the lowest panel of each column and the first of each row
        ax.tick_params(labelsize=7, labelbottom=i + cols >= n, labelleft=i % cols == 0)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    return fig, axes[:n]


def _undefined(ax: Any, name: str, why: str) -> None:
    ax.set_title(name, fontsize=9)
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=8, transform=ax.transAxes)


def _column(y: np.ndarray, p: np.ndarray, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    counted = ~np.isnan(y[:, j])  # NaN: the image does not count for this label
    return (
        torch.from_numpy(np.ascontiguousarray(p[counted, j])),
        torch.from_numpy(np.ascontiguousarray(y[counted, j])).long(),
    )


def roc_figure(y_true: np.ndarray, y_prob: np.ndarray, label_names: Sequence[str], auroc: Sequence[float]) -> Figure:
    """One ROC panel per label with its AUROC, chance diagonal dashed."""
    fig, axes = _panels(len(label_names), "ROC curves", "1 - specificity", "sensitivity")
    for j, (ax, name) in enumerate(zip(axes, label_names)):
        if not np.isfinite(auroc[j]):
            _undefined(ax, name, "undefined:\nno positives or\nno negatives")
            continue
        fpr, tpr, _ = binary_roc(*_column(y_true, y_prob, j))
        ax.plot(fpr.numpy(), tpr.numpy(), lw=1.5)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set_title(f"{name}\nAUROC {auroc[j]:.3f}", fontsize=9)
    return fig


def pr_figure(y_true: np.ndarray, y_prob: np.ndarray, label_names: Sequence[str], auprc: Sequence[float]) -> Figure:
    """One precision-recall panel per label with its AUPRC, prevalence (chance level) dashed."""
    fig, axes = _panels(len(label_names), "Precision-recall curves", "recall", "precision")
    for j, (ax, name) in enumerate(zip(axes, label_names)):
        if not np.isfinite(auprc[j]):
            _undefined(ax, name, "undefined:\nno positives")
            continue
        precision, recall, _ = binary_precision_recall_curve(*_column(y_true, y_prob, j))
        ax.plot(recall.numpy(), precision.numpy(), lw=1.5)
        ax.axhline(float(np.nanmean(y_true[:, j])), ls="--", lw=0.8, color="grey")
        ax.set_title(f"{name}\nAUPRC {auprc[j]:.3f}", fontsize=9)
    return fig


def reliability_figure(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    label_names: Sequence[str],
    ece: Sequence[float],
    n_bins: int,
    raw: tuple[np.ndarray, Sequence[float]] | None = None,
) -> Figure:
    """One reliability diagram per label: observed positive rate against mean probability per bin
    (marker area ~ images in the bin), perfect calibration dashed, ECE in the title. ``raw``
    (uncalibrated probabilities and their ECE) adds the curve before calibration, in grey."""
    fig, axes = _panels(
        len(label_names), "Reliability diagrams", "mean predicted probability", "observed positive rate"
    )
    curves = [("calibrated" if raw is not None else None, y_prob, ece, "C0")]
    if raw is not None:
        curves.append(("raw", raw[0], raw[1], "C7"))
    for j, (ax, name) in enumerate(zip(axes, label_names)):
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        for kind, probs, _, colour in curves:
            _, accuracy, confidence, counts = reliability_curve(y_true[:, j], probs[:, j], n_bins)
            filled = counts > 0
            ax.plot(confidence[filled], accuracy[filled], lw=1.0, color=colour, label=kind)
            ax.scatter(
                confidence[filled], accuracy[filled], s=6 + 50 * counts[filled] / counts.max(), zorder=3, color=colour
            )
        title = f"ECE {ece[j]:.3f}" if raw is None else f"ECE {ece[j]:.3f} (raw {raw[1][j]:.3f})"
        ax.set_title(f"{name}\n{title}", fontsize=9)
        if raw is not None and j == 0:
            ax.legend(fontsize=7, loc="upper left")
    return fig
