"""The evaluation's result sections: ROC and precision-recall figures, the per-label table,
calibration, and the subgroup and underdiagnosis tables, each read from what evaluate wrote."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_lightning.evaluation.html.page import TOO_FEW, esc, figure, interval, optional_csv, table
from cxr_lightning.run_dir import EvaluationDir

# Below this many patients in a subgroup a bootstrap interval says little (5 patients resample to a
# zero-width interval), so the tables print "too few" in its place.
DEFAULT_MIN_PATIENTS = 30


def confidence_level(metrics: Mapping[str, Any]) -> int:
    """The evaluation's interval level in percent (95 for ``alpha`` 0.05)."""
    return round(100 * (1 - float(metrics.get("alpha", 0.05))))


def roc_pr_section(ev: Path) -> str:
    """The ROC and precision-recall figures side by side."""
    return ('<div class="pair">' + figure(EvaluationDir(ev).figure("roc"), "ROC curve per label")
            + figure(EvaluationDir(ev).figure("pr"), "Precision-recall curve per label (prevalence dashed)") + "</div>")


def per_label_section(per_class: pd.DataFrame, metrics: Mapping[str, Any]) -> str:
    """``per_class.csv`` with each AUROC and AUPRC beside its interval, and the chosen thresholds."""
    level = confidence_level(metrics)
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


def calibration_section(ev: Path, metrics: Mapping[str, Any]) -> str:
    """The reliability figure and the mean ECE, before and after a post-hoc calibration when there is one."""
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


def subgroups_section(ev: Path, metrics: Mapping[str, Any], min_patients: int) -> str:
    """The subgroup and underdiagnosis tables, intervals of groups under ``min_patients`` patients as too few."""
    level = confidence_level(metrics)
    parts = []
    subgroups = optional_csv(EvaluationDir(ev).subgroups)
    if subgroups is not None:
        parts.append("<h3>Mean AUROC per subgroup</h3>" + table(subgroup_table(subgroups, min_patients, level)))
    under = optional_csv(EvaluationDir(ev).underdiagnosis)
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
