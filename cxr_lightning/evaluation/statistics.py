"""Statistics of saved predictions (numpy/pandas): a patient-level (cluster) bootstrap, per-label
decision thresholds, operating-point tables, calibration and subgroup AUROC.

Probabilities, not logits, go into every helper (``y_prob`` must lie in [0, 1]). A NaN in
``y_true`` masks that entry: the image does not count for that label (an uncertain label under
``data.uncertain=ignore``), so every statistic of the label is computed over its other images.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_calibration_error,
    binary_stat_scores,
)

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.labels import NO_FINDING
from cxr_lightning.progress import Progress

__all__ = [
    "age_bands",
    "bootstrap_ci",
    "choose_thresholds",
    "expected_calibration_error",
    "operating_point_metrics",
    "threshold_curve",
    "underdiagnosis",
    "reliability_curve",
    "subgroup_auroc",
]


# --------------------------------------------------------------------------------------------
# Offline evaluation helpers (numpy / pandas)
# --------------------------------------------------------------------------------------------

BootstrapMetric = Literal["auroc", "auprc"]
log = logging.getLogger(__name__)
_BOOT_CHUNK = 64  # resamples scored at once: bounds memory at ~chunk x images x 8 bytes


def _check_predictions(
    y_true: Any, y_prob: Any, label_names: Sequence[str] | None, where: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate ``(N, L)`` labels and probabilities; label names from the argument or DataFrame columns."""
    if label_names is None:
        label_names = list(y_prob.columns) if isinstance(y_prob, pd.DataFrame) else None
        if label_names is None and isinstance(y_true, pd.DataFrame):
            label_names = list(y_true.columns)
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 2 or p.ndim != 2:
        raise DataError(f"{where}: y_true and y_prob must be 2-D (images, labels), got shapes {y.shape} and {p.shape}.")
    if y.shape != p.shape:
        raise DataError(
            f"{where}: y_true has shape {y.shape} but y_prob {p.shape}; they must describe the same images and labels."
        )
    if y.shape[0] == 0:
        raise DataError(f"{where}: no images to score (0 rows).")
    names = [str(n) for n in label_names] if label_names is not None else [f"label_{i}" for i in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise DataError(f"{where}: {len(names)} label names {names} for {y.shape[1]} label columns.")
    bad = ~np.isin(y, (0.0, 1.0)) & ~np.isnan(y)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{where}: y_true must hold only 0/1 (or NaN: not counted); "
            f"row {row}, label '{names[col]}' is {y[row, col]!r} "
            f"({int(bad.sum())} bad values in all)."
        )
    bad = ~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{where}: y_prob must be probabilities in [0, 1]; row {row}, label '{names[col]}' is {p[row, col]!r} "
            f"({int(bad.sum())} bad values in all). Apply a sigmoid to logits first."
        )
    return y, p, names


def _patient_codes(patient_ids: Any, n_images: int, where: str) -> tuple[np.ndarray, int]:
    """Integer code 0..P-1 per image for its patient."""
    ids = pd.Series(np.asarray(patient_ids))
    if len(ids) != n_images:
        raise DataError(f"{where}: {len(ids)} patient ids for {n_images} images; pass one patient id per image row.")
    missing = ids.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{where}: patient id missing for {int(missing.sum())} image(s) "
            f"(first row {int(np.flatnonzero(missing)[0])}); "
            "every image must belong to a patient for a patient-level bootstrap."
        )
    codes, uniques = pd.factorize(ids, sort=False)
    return codes.astype(np.int64), len(uniques)


def _iter_patient_counts(n_patients: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``(chunk, P)`` arrays: how often each patient is drawn in each resample.

    A resample draws ``P`` patients with replacement; every image of a drawn patient comes along,
    once per draw. Counting draws instead of listing indices lets the scorer weight images.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        draws = rng.integers(0, n_patients, size=(size, n_patients))
        offsets = (np.arange(size) * n_patients)[:, None]
        yield np.bincount((draws + offsets).ravel(), minlength=size * n_patients).reshape(size, n_patients)


def _resample_indices(patient_ids: Any, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """The image rows of each bootstrap resample (the same resamples :func:`bootstrap_ci` scores).

    Each array is a union of whole patients: all rows of a drawn patient, repeated once per draw.
    """
    codes, n_patients = _patient_codes(patient_ids, len(np.asarray(patient_ids)), "_resample_indices")
    rows = np.arange(len(codes))
    return [
        np.repeat(rows, counts[codes]) for chunk in _iter_patient_counts(n_patients, n_boot, seed) for counts in chunk
    ]


class _SortedLabel:
    """One label's images split into positives and negatives, each sorted by score once.

    Scoring a resample then needs only gathers and one cumulative sum over weights (how often each
    image is drawn); ties in score are resolved by searchsorted positions precomputed here.
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, codes: np.ndarray) -> None:
        pos, neg = y == 1, y == 0
        pos_order, neg_order = np.argsort(p[pos], kind="stable"), np.argsort(p[neg], kind="stable")
        pos_scores, neg_scores = p[pos][pos_order], p[neg][neg_order]
        self.pos_codes = codes[pos][pos_order]  # patient of each positive, ascending score
        self.neg_codes = codes[neg][neg_order]
        # for each positive: negatives scored strictly below it / at most equal to it
        self.neg_below = np.searchsorted(neg_scores, pos_scores, side="left")
        self.neg_upto = np.searchsorted(neg_scores, pos_scores, side="right")
        # for each positive: positives scored strictly below it (start of its tie group)
        self.pos_below = np.searchsorted(pos_scores, pos_scores, side="left")

    def score(self, patient_counts: np.ndarray, metric: BootstrapMetric) -> np.ndarray:
        """Metric per resample for ``(B, P)`` patient draw counts; NaN where undefined."""
        w_pos = np.take(patient_counts, self.pos_codes, axis=1)  # (B, Npos) image weights
        neg_cum = _exclusive_cumsum(np.take(patient_counts, self.neg_codes, axis=1))  # (B, Nneg + 1)
        n_pos, n_neg = w_pos.sum(axis=1), neg_cum[:, -1]
        below = np.take(neg_cum, self.neg_below, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if metric == "auroc":
                # Mann-Whitney U with weights: negatives below count 1, tied negatives 1/2
                upto = np.take(neg_cum, self.neg_upto, axis=1)
                pairs = (w_pos * (below + upto)).sum(axis=1) / 2
                return np.where((n_pos > 0) & (n_neg > 0), pairs / (n_pos * n_neg), np.nan)
            # average precision: mean over positives of the precision at their own score's threshold
            tp = n_pos[:, None] - np.take(_exclusive_cumsum(w_pos), self.pos_below, axis=1)
            fp = n_neg[:, None] - below
            precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=tp > 0)
            return np.where(n_pos > 0, (w_pos * precision).sum(axis=1) / n_pos, np.nan)


def _exclusive_cumsum(weights: np.ndarray) -> np.ndarray:
    out = np.zeros((weights.shape[0], weights.shape[1] + 1), dtype=weights.dtype)
    np.cumsum(weights, axis=1, out=out[:, 1:])
    return out


def bootstrap_ci(
    y_true: Any,
    y_prob: Any,
    groups: Any,
    metric: BootstrapMetric = "auroc",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-label and mean AUROC (or AUPRC) with percentile bootstrap intervals over **patients**.

    ``groups`` holds the patient id of every image row: each resample draws patients with
    replacement and takes all their images, so correlated images of one patient never split
    across the resample the way an image-level bootstrap would.

    Returns a DataFrame indexed by label name plus ``"mean"`` with columns ``estimate`` (on all
    data), ``lower``/``upper`` (the ``alpha/2`` and ``1-alpha/2`` quantiles over resamples),
    ``n_pos`` (positive images; for the mean, positive labels over all labels), ``n_resamples``
    (resamples where the metric was defined) and ``n_skipped``
    (resamples without positives, or for AUROC without negatives, for that label). The mean of a
    resample averages the labels defined in it; ``estimate`` of the mean averages the labels
    defined on all data. A label undefined on all data has NaN everywhere.
    """
    where = "bootstrap_ci"
    if metric not in ("auroc", "auprc"):
        raise ConfigError(f"{where}: metric must be 'auroc' or 'auprc', got {metric!r}.")
    if n_boot < 1:
        raise ConfigError(f"{where}: n_boot must be at least 1, got {n_boot}.")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"{where}: alpha must lie strictly between 0 and 1, got {alpha}.")
    y, p, names = _check_predictions(y_true, y_prob, label_names, where)
    codes, n_patients = _patient_codes(groups, len(y), where)

    labels = [_SortedLabel(y[:, j], p[:, j], codes) for j in range(len(names))]
    ones = np.ones((1, n_patients), dtype=np.int64)
    estimate = np.array([label.score(ones, metric)[0] for label in labels])
    progress = Progress(f"bootstrap {metric} ({n_patients} patients)", n_boot, log)
    chunks = []
    for counts in _iter_patient_counts(n_patients, n_boot, seed):
        chunks.append(np.stack([label.score(counts, metric) for label in labels], axis=1))
        progress.advance(len(counts))
    progress.done()
    boot = np.concatenate(chunks)  # (n_boot, L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows/columns -> NaN, by design
        boot_mean = np.nanmean(boot, axis=1)
        estimate_mean = np.nanmean(estimate)
    table = np.column_stack([boot, boot_mean])
    valid = ~np.isnan(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lower, upper = np.nanquantile(table, [alpha / 2, 1 - alpha / 2], axis=0)
    frame = pd.DataFrame(
        {
            "estimate": np.r_[estimate, estimate_mean],
            "lower": lower,
            "upper": upper,
            "n_pos": np.r_[np.nansum(y, axis=0), np.nansum(y)].astype(np.int64),
            "n_resamples": valid.sum(axis=0),
            "n_skipped": n_boot - valid.sum(axis=0),
        },
        index=pd.Index([*names, "mean"], name="label"),
    )
    undefined = np.isnan(frame["estimate"].to_numpy())
    frame.loc[undefined, ["lower", "upper"]] = np.nan
    frame.attrs.update(
        metric=metric, n_boot=n_boot, alpha=alpha, seed=seed, n_images=len(y), n_patients=n_patients
    )
    return frame


def _column_tensors(y: np.ndarray, p: np.ndarray, j: int) -> tuple[Tensor, Tensor]:
    """Label ``j``'s probabilities and integer targets, over the images that count for it (y not
    NaN), as contiguous tensors for torchmetrics."""
    counted = ~np.isnan(y[:, j])
    return (torch.from_numpy(np.ascontiguousarray(p[counted, j])),
            torch.from_numpy(np.ascontiguousarray(y[counted, j])).long())


def _both_classes(y: np.ndarray) -> np.ndarray:
    return (np.nansum(y, axis=0) > 0) & (np.nansum(1 - y, axis=0) > 0)


def threshold_curve(y_true_c: np.ndarray, y_prob_c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate cut of one label with its confusion counts: ``(cuts, tp, fp)``.

    ``cuts`` are the distinct observed scores, ascending, in float64; ``tp``/``fp`` count the
    positives/negatives with ``p >= cut``. Written here rather than taken from torchmetrics'
    ``binary_roc``/``binary_precision_recall_curve`` because those return float32 curves even for
    float64 input: equally good cuts then differ in the last bit (the wrong one wins a tie) and
    the returned cut need not be an observed score (``binary_roc`` adds an artificial 1.0).
    """
    cuts, inverse = np.unique(np.asarray(y_prob_c, dtype=np.float64), return_inverse=True)
    y = np.asarray(y_true_c, dtype=np.float64)
    pos = np.bincount(inverse, weights=y, minlength=len(cuts))
    neg = np.bincount(inverse, weights=1.0 - y, minlength=len(cuts))
    # counts at or above each cut: reversed cumulative sums (exact integers in float64)
    tp = np.cumsum(pos[::-1])[::-1].astype(np.int64)
    fp = np.cumsum(neg[::-1])[::-1].astype(np.int64)
    return cuts, tp, fp


def choose_thresholds(
    y_true: Any,
    y_prob: Any,
    method: Literal["f1", "youden"] = "f1",
    fallback: float = 0.5,
    label_names: Sequence[str] | None = None,
) -> np.ndarray:
    """One decision threshold per label from validation predictions (call positive if ``p >= t``).

    ``"f1"`` maximises F1, ``"youden"`` maximises J = sensitivity + specificity - 1. The candidate
    cuts are the observed scores (:func:`threshold_curve`, float64) and the threshold is always one
    of them; among equally good cuts the **highest** wins (fewest positive calls). Ties are decided
    exactly: F1 = 2tp / (2tp + fp + fn) is a ratio of integers (equal ratios give the same double)
    and J is compared through its integer numerator ``tp * n_neg - fp * n_pos``. When no cut is
    useful (best J <= 0: no cut separates positives from negatives better than chance) the rule
    still picks an observed score, the highest one with the best J, and a warning names the label.
    A label without positives or without negatives has no optimum: it gets ``fallback`` and a
    warning names it.
    """
    where = "choose_thresholds"
    if method not in ("f1", "youden"):
        raise ConfigError(f"{where}: method must be 'f1' or 'youden', got {method!r}.")
    y, p, names = _check_predictions(y_true, y_prob, label_names, where)
    usable = _both_classes(y)
    thresholds = np.full(y.shape[1], float(fallback))
    useless = []
    for j in np.flatnonzero(usable):
        keep = ~np.isnan(y[:, j])  # an ignored (uncertain) label does not count for that label
        cuts, tp, fp = threshold_curve(y[keep, j], p[keep, j])
        n_pos, n_neg = int(tp[0]), int(fp[0])
        if method == "f1":
            # the lowest cut calls everything positive, so tp > 0 there and the best F1 is > 0
            score = 2 * tp / (2 * tp + fp + (n_pos - tp))
        else:
            score = tp * n_neg - fp * n_pos  # J * n_pos * n_neg, an exact integer
        best = len(cuts) - 1 - int(np.argmax(score[::-1]))  # last maximum in ascending order = highest cut
        thresholds[j] = cuts[best]
        if score[best] <= 0:
            useless.append(names[j])
    if useless:
        warnings.warn(
            f"{where}: no cut separates positives from negatives for {useless} (best Youden J <= 0); "
            "their threshold is the highest observed score with the best J.",
            stacklevel=2,
        )
    if not usable.all():
        missing = [names[j] for j in np.flatnonzero(~usable)]
        warnings.warn(
            f"{where}: labels {missing} lack positives or negatives in these predictions; "
            f"their threshold is the fallback {fallback}.",
            stacklevel=2,
        )
    return thresholds


def operating_point_metrics(
    y_true: Any, y_prob: Any, thresholds: Any, label_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per label at its threshold (positive if ``p >= t``): sensitivity, specificity, precision, F1.

    Columns ``threshold, sensitivity, specificity, precision, f1, support`` (positives) and
    ``n_neg``; a ratio with a zero denominator is NaN, not 0.
    """
    where = "operating_point_metrics"
    y, p, names = _check_predictions(y_true, y_prob, label_names, where)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (y.shape[1],) or not np.isfinite(t).all():
        raise ConfigError(f"{where}: need {y.shape[1]} finite thresholds (one per label {names}), got {t.tolist()}.")
    called = torch.from_numpy((p >= t).astype(np.int64))
    target = torch.from_numpy(np.where(np.isnan(y), -1, y)).long()  # -1: not counted for that label
    # Label by label: torchmetrics' multilabel form needs at least two labels, an external source may score one.
    stats = torch.stack([binary_stat_scores(called[:, j], target[:, j], ignore_index=-1) for j in range(y.shape[1])])
    tp, fp, tn, fn = (stats[:, k].numpy().astype(np.float64) for k in range(4))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)

    return pd.DataFrame(
        {
            "threshold": t,
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "support": (tp + fn).astype(np.int64),
            "n_neg": (tn + fp).astype(np.int64),
        },
        index=pd.Index(names, name="label"),
    )


def _check_n_bins(n_bins: int, where: str) -> None:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ConfigError(f"{where}: n_bins must be a positive integer, got {n_bins!r}.")


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 15) -> np.ndarray:
    """ECE per label: sum over equal-width probability bins of (bin share) x |positive rate - mean p|."""
    where = "expected_calibration_error"
    _check_n_bins(n_bins, where)
    y, p, _ = _check_predictions(y_true, y_prob, None, where)
    return np.array(
        [
            float(binary_calibration_error(*_column_tensors(y, p, j), n_bins=n_bins, norm="l1"))
            for j in range(y.shape[1])
        ]
    )


def reliability_curve(
    y_true_c: Any, y_prob_c: Any, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data for one label: ``(bin_centers, accuracy, confidence, counts)``.

    Bins are ``[k/n, (k+1)/n)`` with 1.0 in the last bin; ``accuracy`` is the positive rate and
    ``confidence`` the mean probability of a bin, NaN for an empty bin.
    """
    where = "reliability_curve"
    _check_n_bins(n_bins, where)
    y1, p1 = np.asarray(y_true_c), np.asarray(y_prob_c)
    if y1.ndim != 1 or p1.ndim != 1:
        raise DataError(f"{where}: pass one label's 1-D y_true and y_prob, got shapes {y1.shape} and {p1.shape}.")
    y, p, _ = _check_predictions(y1[:, None], p1[:, None], ["label"], where)
    counted = ~np.isnan(y[:, 0])
    y, p = y[counted, 0], p[counted, 0]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        accuracy = np.bincount(bins, weights=y, minlength=n_bins) / counts
        confidence = np.bincount(bins, weights=p, minlength=n_bins) / counts
    return (edges[:-1] + edges[1:]) / 2, accuracy, confidence, counts


def subgroup_auroc(
    y_true: Any,
    y_prob: Any,
    groups: pd.Series,
    patient_ids: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    label_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean AUROC with a patient-bootstrap interval within each value of ``groups``.

    ``groups`` has one value per image row (positional); a missing value forms the group
    ``"unknown"``. Returns one row per group (in category order for a categorical, else sorted):
    ``n_images, n_patients, n_labels`` (labels with a defined AUROC in the group),
    ``auroc_mean, lower, upper``.
    """
    where = "subgroup_auroc"
    y, p, names = _check_predictions(y_true, y_prob, label_names, where)
    values = pd.Series(groups).reset_index(drop=True)
    if len(values) != len(y):
        raise DataError(f"{where}: {len(values)} group values for {len(y)} images; pass one value per image row.")
    patients = np.asarray(patient_ids)
    _patient_codes(patients, len(y), where)  # validate once, before splitting
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.dropna())
        order = [c for c in values.cat.categories if c in present]
        values = values.astype(object)
    else:
        order = sorted(values.dropna().unique(), key=str)
    if values.isna().any():
        values = values.where(values.notna(), "unknown")
        if "unknown" not in order:
            order.append("unknown")
    rows = []
    for value in order:
        mask = (values == value).to_numpy()
        ci = bootstrap_ci(y[mask], p[mask], patients[mask], "auroc", n_boot, alpha, seed, names)
        rows.append(
            {
                "n_images": int(mask.sum()),
                "n_patients": ci.attrs["n_patients"],
                "n_labels": int(ci["estimate"].drop(index="mean").notna().sum()),
                "auroc_mean": ci.at["mean", "estimate"],
                "lower": ci.at["mean", "lower"],
                "upper": ci.at["mean", "upper"],
            }
        )
    return pd.DataFrame(rows, index=pd.Index(order, name=values.name or "group"))


def age_bands(ages: pd.Series, edges: Sequence[int] = (0, 20, 40, 60, 80, 200)) -> pd.Series:
    """Age in years -> ordered categorical band ``"40-59"`` (``"80+"`` for the last), missing -> ``"unknown"``.

    Bands are ``[lo, hi)``; an age outside all bands raises :class:`DataError` rather than being
    counted as unknown.
    """
    edges = [int(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"age_bands: edges must be at least two strictly increasing integers, got {edges}.")
    ages = pd.Series(ages)
    numeric = pd.to_numeric(ages, errors="coerce")
    not_numeric = numeric.isna() & ages.notna()
    out_of_range = numeric.notna() & ((numeric < edges[0]) | (numeric >= edges[-1]))
    bad = not_numeric | out_of_range
    if bad.any():
        first = bad[bad].index[:5].tolist()
        raise DataError(
            f"age_bands: {int(bad.sum())} age(s) are not numbers in [{edges[0]}, {edges[-1]}) "
            f"(first rows {first}: {ages[bad].head(5).tolist()}); fix the ages or widen the edges."
        )
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"{edges[-2]}+"]
    bands = pd.cut(numeric, bins=edges, right=False, labels=names)
    bands = bands.cat.add_categories("unknown").fillna("unknown")
    return bands.rename("age_band")



def underdiagnosis(
    y_true: Any,
    y_prob: Any,
    thresholds: Any,
    groups: pd.Series,
    patient_ids: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    label_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Underdiagnosis per subgroup at the chosen thresholds (positive if ``p >= t``), as
    CheXclusion (Seyyed-Kalantari et al. 2021) audited it on this dataset.

    ``underdiagnosis``: among the images with at least one finding (``No Finding`` negative where the
    labels include it, else any label positive; a NaN label counts for neither), the share called "No Finding"
    (the ``No Finding`` label called positive when the model predicts it, else no finding called
    at all). ``fnr.<label>``: among the label's positives, the share called negative. Every rate
    has a ``_lower``/``_upper`` percentile interval over patient-bootstrap resamples (the resamples
    of :func:`bootstrap_ci`) drawn within the group; a rate without images to count is NaN.
    Returns one row per group value (missing -> ``"unknown"``) with ``n_images``, ``n_patients``,
    ``n_with_finding``.
    """
    where = "underdiagnosis"
    y, p, names = _check_predictions(y_true, y_prob, label_names, where)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (y.shape[1],):
        raise ConfigError(f"{where}: need {y.shape[1]} thresholds (one per label {names}), got {t.tolist()}.")
    values = pd.Series(groups).reset_index(drop=True).astype(object)
    if len(values) != len(y):
        raise DataError(f"{where}: {len(values)} group values for {len(y)} images; pass one value per image row.")
    values = values.where(values.notna(), "unknown")
    patients = np.asarray(patient_ids)
    _patient_codes(patients, len(y), where)
    called = p >= t
    findings = [j for j, n in enumerate(names) if n != NO_FINDING]
    if NO_FINDING in names:
        # The source gives No Finding: an image has a finding where No Finding is negative, whether
        # its findings are in the label space, outside it, or uncertain.
        has_finding = y[:, names.index(NO_FINDING)] == 0
    else:
        has_finding = (y[:, findings] == 1).any(axis=1)
    if NO_FINDING in names:
        called_normal = called[:, names.index(NO_FINDING)]
    else:
        called_normal = ~called[:, findings].any(axis=1)
    # (numerator, denominator) indicator columns, one pair per rate
    rates = {"underdiagnosis": (has_finding & called_normal, has_finding)}
    rates |= {f"fnr.{names[j]}": ((y[:, j] == 1) & ~called[:, j], y[:, j] == 1) for j in findings}
    num = np.column_stack([v[0] for v in rates.values()]).astype(np.float64)
    den = np.column_stack([v[1] for v in rates.values()]).astype(np.float64)
    order = list(pd.unique(values)) if not isinstance(groups.dtype, pd.CategoricalDtype) else [
        c for c in [*groups.cat.categories, "unknown"] if (values == c).any()
    ]
    if not isinstance(groups.dtype, pd.CategoricalDtype):
        order = sorted(order, key=str)
    rows = []
    for value in order:
        mask = (values == value).to_numpy()
        codes, n_patients = _patient_codes(patients[mask], int(mask.sum()), where)
        # per patient sums, so a resample's rate is a count-weighted ratio of patient totals
        pn = np.zeros((n_patients, num.shape[1]))
        pd_ = np.zeros((n_patients, num.shape[1]))
        np.add.at(pn, codes, num[mask])
        np.add.at(pd_, codes, den[mask])
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = pn.sum(axis=0) / pd_.sum(axis=0)
            boot = np.concatenate(
                [(counts @ pn) / (counts @ pd_) for counts in _iter_patient_counts(n_patients, n_boot, seed)]
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a rate never defined in resamples -> NaN
            lower, upper = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
        row: dict[str, Any] = {"group": str(value), "n_images": int(mask.sum()), "n_patients": int(n_patients),
                               "n_with_finding": int(has_finding[mask].sum())}
        for k, name in enumerate(rates):
            row |= {name: estimate[k], f"{name}_lower": lower[k], f"{name}_upper": upper[k]}
        rows.append(row)
    return pd.DataFrame(rows)


def per_source_auroc(
    y_true: Any,
    y_prob: Any,
    patient_ids: Any,
    sources: Any,
    scored: Mapping[str, Sequence[str]],
    label_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """A pooled run's test figures per source: mean AUROC with a patient-bootstrap interval over
    the labels that source scores (``scored[source]``), on that source's images only.

    Returns ``{source: {n_images, n_patients, labels, auroc_mean, lower, upper}}``; a source's mean
    is comparable to another's only over the labels both score (listed in ``labels``)."""
    y, p, names = _check_predictions(y_true, y_prob, label_names, "per_source_auroc")
    sources = np.asarray(sources).astype(str)
    patients = np.asarray(patient_ids)
    out: dict[str, dict[str, Any]] = {}
    for source, labels in scored.items():
        rows = sources == source
        columns = [names.index(n) for n in labels if n in names]
        if not rows.any() or not columns:
            continue
        ci = bootstrap_ci(y[rows][:, columns], p[rows][:, columns], patients[rows], "auroc", n_boot, alpha, seed,
                          [names[j] for j in columns])
        out[source] = {
            "n_images": int(rows.sum()),
            "n_patients": int(ci.attrs["n_patients"]),
            "labels": [names[j] for j in columns],
            "auroc_mean": float(ci.at["mean", "estimate"]),
            "lower": float(ci.at["mean", "lower"]),
            "upper": float(ci.at["mean", "upper"]),
        }
    return out
