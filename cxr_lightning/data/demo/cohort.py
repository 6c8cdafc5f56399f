"""The demo's cohort: patients, their visits, demographics and findings, and the test split."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cxr_lightning.data import nih
from cxr_lightning.data.demo import streams
from cxr_lightning.errors import ConfigError
from cxr_lightning.labels import FINDINGS, NO_FINDING, encode_labels

# Values that occur in the real table, including a float-repr artefact it really contains.
PIXEL_SPACINGS = (0.143, 0.14300000000000002, 0.139, 0.168, 0.171)

VISIT_COUNT_WEIGHTS = (0.25, 0.2, 0.17, 0.14, 0.12, 0.12)  # 1..6 visits, mean about 3
MALE_FRACTION = 0.56
AGE_MEAN, AGE_SD, AGE_RANGE = 47.0, 17.0, (1, 94)
PERSISTENCE = 0.4  # chance that a finding seen at one visit is still there at the next
FRAILTY_WEIGHT = 1.0  # shared per-patient log-odds: findings cluster, so about half are healthy
FOLLOW_UP_QUIRK_FRACTION = 0.08  # patients whose file numbers are a rotation of their visit order
TEST_FRACTION = 0.2
SPLIT_CANDIDATES = 256  # random patient splits tried; the most class-balanced one is kept


class FindingOdds(NamedTuple):
    """Probability of a new finding for a 47-year-old woman, PA view, average frailty, and the
    log-odds shifts per decade of age, for male sex and for an AP (bedside) view."""

    rate: float
    per_decade: float = 0.0
    male: float = 0.0
    ap: float = 0.0


# Rates are tuned so that image-level frequencies follow the real ranking (Infiltration first,
# Hernia last) while the rare classes are oversampled about 10-20x so the test split of the
# default demo holds enough positives of each to measure an AUROC.
FINDING_ODDS: dict[str, FindingOdds] = {
    "Atelectasis": FindingOdds(0.043, per_decade=0.10, ap=1.0),
    "Cardiomegaly": FindingOdds(0.03, per_decade=0.35, male=-0.2),
    "Effusion": FindingOdds(0.045, per_decade=0.15, ap=1.0),
    "Infiltration": FindingOdds(0.094, ap=0.2),
    "Mass": FindingOdds(0.03, per_decade=0.20, male=0.2),
    "Nodule": FindingOdds(0.034, per_decade=0.10),
    "Pneumonia": FindingOdds(0.02, male=0.1, ap=0.5),
    "Pneumothorax": FindingOdds(0.019, per_decade=-0.20, male=0.9, ap=0.2),
    "Consolidation": FindingOdds(0.027, ap=0.5),
    "Edema": FindingOdds(0.016, per_decade=0.10, ap=1.2),
    "Emphysema": FindingOdds(0.018, per_decade=0.40, male=0.4),
    "Fibrosis": FindingOdds(0.024, per_decade=0.30, male=0.1),
    "Pleural_Thickening": FindingOdds(0.026, per_decade=0.20, male=0.1),
    "Hernia": FindingOdds(0.019, per_decade=0.40, male=-1.0),
}
assert tuple(FINDING_ODDS) == FINDINGS


def sample_table(patients: int = 500, seed: int = 0) -> pd.DataFrame:
    """Draw the label table: one row per image, sorted by patient and follow-up.

    Columns use the normalised names of ``nih.read_label_table`` (``OriginalImage Width`` ...),
    ``Patient Age`` is an int, and the table is a pure function of ``(patients, seed)``.
    """
    check_positive("patients", patients)
    rng = streams.rng(seed, streams.TABLE)
    visits = rng.choice(np.arange(1, len(VISIT_COUNT_WEIGHTS) + 1), size=patients, p=VISIT_COUNT_WEIGHTS)
    male = rng.random(patients) < MALE_FRACTION
    first_age = np.clip(np.rint(rng.normal(AGE_MEAN, AGE_SD, patients)), *AGE_RANGE)
    frailty = rng.normal(size=patients)
    spacing = rng.choice(PIXEL_SPACINGS, size=patients)

    patient = np.repeat(np.arange(patients), visits)
    follow_up = np.arange(len(patient)) - np.repeat(np.cumsum(visits) - visits, visits)
    age = np.minimum(first_age[patient] + _years_since_first_visit(rng, follow_up), 99).astype(int)
    ap = rng.random(len(patient)) < _sigmoid(-0.8 + 0.25 * (age - AGE_MEAN) / 10 + 0.3 * frailty[patient])
    findings = _sample_findings(rng, follow_up, age, male[patient], ap, frailty[patient])
    file_number = _file_numbers(rng, visits, follow_up)

    patient_id = patient + 1  # NIH numbers patients from 1
    return pd.DataFrame(
        {
            "Image Index": [nih.image_name(p, n) for p, n in zip(patient_id, file_number)],
            "Finding Labels": _finding_strings(findings),
            "Follow-up #": follow_up,
            "Patient ID": patient_id,
            "Patient Age": age,
            "Patient Gender": np.where(male[patient], "M", "F"),
            "View Position": np.where(ap, "AP", "PA"),
            "OriginalImage Width": nih.ORIGINAL_SIZE,
            "OriginalImage Height": nih.ORIGINAL_SIZE,
            "OriginalImagePixelSpacing x": spacing[patient],
            "OriginalImagePixelSpacing y": spacing[patient],
        }
    )


def _years_since_first_visit(rng: np.random.Generator, follow_up: np.ndarray) -> np.ndarray:
    # About a third of the gaps between visits cross a birthday.
    step = (rng.random(len(follow_up)) < 0.35) & (follow_up > 0)
    total = np.cumsum(step)
    return total - np.maximum.accumulate(np.where(follow_up == 0, total, 0))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _sample_findings(
    rng: np.random.Generator,
    follow_up: np.ndarray,
    age: np.ndarray,
    male: np.ndarray,
    ap: np.ndarray,
    frailty: np.ndarray,
) -> np.ndarray:
    """(n_images, 14) bool: new findings from a logistic model, old ones persisting."""
    odds = pd.DataFrame(FINDING_ODDS, index=FindingOdds._fields).T
    logit = (
        np.log(odds["rate"] / (1 - odds["rate"])).to_numpy()[None, :]
        + np.outer((age - AGE_MEAN) / 10, odds["per_decade"])
        + np.outer(male, odds["male"])
        + np.outer(ap, odds["ap"])
        + FRAILTY_WEIGHT * frailty[:, None]
    )
    new = rng.random(logit.shape) < _sigmoid(logit)
    persists = rng.random(logit.shape) < PERSISTENCE
    findings = new.copy()
    # Rows are sorted by patient then visit, so a visit's previous visit is the row above.
    for visit in range(1, int(follow_up.max(initial=0)) + 1):
        rows = np.flatnonzero(follow_up == visit)
        findings[rows] |= findings[rows - 1] & persists[rows]
    return findings


def _finding_strings(findings: np.ndarray) -> np.ndarray:
    # NIH lists a row's findings alphabetically, joined by "|".
    order = np.argsort(FINDINGS)
    names = pd.Index(np.asarray(FINDINGS)[order]) + "|"
    joined = pd.DataFrame(findings[:, order], columns=names).dot(names).str.rstrip("|")
    return joined.where(joined != "", NO_FINDING).to_numpy()


def _file_numbers(rng: np.random.Generator, visits: np.ndarray, follow_up: np.ndarray) -> np.ndarray:
    """File numbers equal the follow-up number, except for a few patients whose files are
    numbered in a rotated order (the real v2020 table has such patients, e.g. patient 3)."""
    quirky = (visits >= 2) & (rng.random(len(visits)) < FOLLOW_UP_QUIRK_FRACTION)
    rotation = np.where(quirky, rng.integers(1, np.maximum(visits, 2)), 0)
    n = np.repeat(visits, visits)
    return (follow_up + np.repeat(rotation, visits)) % n


def split_test_patients(table: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """Patient IDs of the official-style test split: 20% of patients.

    Of ``SPLIT_CANDIDATES`` random patient splits, the one whose test share of each class's
    positive images is closest to 20% for its worst class, so that every class keeps enough
    test positives even when a handful of patients hold them all.
    """
    images = encode_labels(table["Finding Labels"], FINDINGS, source="demo table")
    per_patient = pd.DataFrame(images).groupby(table["Patient ID"].to_numpy()).sum()
    counts = per_patient.to_numpy()
    n_test = max(round(TEST_FRACTION * len(counts)), 1)
    picks = streams.rng(seed, streams.SPLIT).random((SPLIT_CANDIDATES, len(counts))).argsort(axis=1)[:, :n_test]
    in_test = np.zeros((SPLIT_CANDIDATES, len(counts)), bool)
    np.put_along_axis(in_test, picks, True, axis=1)
    share = (in_test.astype(float) @ counts) / np.maximum(counts.sum(axis=0), 1)
    best = np.abs(share - TEST_FRACTION).max(axis=1).argmin()
    return np.sort(per_patient.index[in_test[best]].to_numpy())


def check_integer(name: str, value: Any) -> None:
    try:
        integral = int(value) == value
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise ConfigError(f"demo {name}={value!r}: must be an integer.")


def check_positive(name: str, value: Any) -> None:
    check_integer(name, value)
    if value < 1:
        raise ConfigError(f"demo {name}={value!r}: must be a positive integer.")
