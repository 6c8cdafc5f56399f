"""Demo dataset generator: a miniature, synthetic ChestX-ray14 in NIH's exact file layout.

This is a demo for exercising the pipeline, not evidence about real X-rays. The pictures are
procedural cartoons of a chest (body outline, dark lung fields, bright heart and mediastinum,
ribs, smooth noise) and each of the 14 findings is a hand-made, localised sign painted where it
belongs. A model that does well here has learned these cartoons; nothing it does here says
anything about real radiographs.

What it does reproduce faithfully is the *shape* of the NIH release, so that every code path of
the real loader runs on it:

- ``Data_Entry_2017_v2020.csv`` with NIH's header (whose bracketed ``[Width,Height]`` and
  ``[x,y]`` columns split into four under ``pd.read_csv``), image names ``%08d_%03d.png``, and a
  ``Follow-up #`` that differs from the file number for some patients, as in the real table;
- ``train_val_list.txt`` / ``test_list.txt`` (patient-disjoint, about 20% of patients in test);
- ``BBox_List_2017.csv`` with NIH's header (``Bbox [x,y,w,h],,,``) and spelling (``Infiltrate``),
  boxes in the ORIGINAL 1024-pixel space although the demo PNGs are smaller;
- ``images_001/images/*.png`` spilling into ``images_002/`` ... like NIH's twelve folders.

Labels are imbalanced and multi-label like the real data (about half ``No Finding``,
Infiltration the most common finding, Hernia the rarest, rare classes oversampled so the test
split can still measure AUROC); findings persist between a patient's visits, and age, sex and
view position shift the odds of some findings, so demographics and prior visits carry signal.

Everything is a pure function of ``seed``: each image's randomness is derived from
``(seed, patient, visit)``, so the files are byte-identical whatever the number of workers.

    python -m cxr_lightning.data.demo --out DIR [--patients 500 --image-size 256 --seed 0 --workers N]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from cxr_lightning.errors import ConfigError, CXRError, DataError
from cxr_lightning.files import atomic_path, write_json, write_text
from cxr_lightning.labels import FINDINGS, NO_FINDING, encode_labels

# --------------------------------------------------------------------------------------------
# The NIH layout

LABEL_TABLE_NAME = "Data_Entry_2017_v2020.csv"
LABEL_TABLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_TABLE_NAME = "BBox_List_2017.csv"
BBOX_TABLE_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
TRAIN_VAL_LIST_NAME = "train_val_list.txt"
TEST_LIST_NAME = "test_list.txt"
MARKER_NAME = "demo.json"
ORIGINAL_SIZE = 1024
# NIH drew boxes for these eight findings only, and spells one of them differently.
BOX_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"
)
BOX_SPELLING = {"Infiltration": "Infiltrate"}
# Values that occur in the real table, including a float-repr artefact it really contains.
PIXEL_SPACINGS = (0.143, 0.14300000000000002, 0.139, 0.168, 0.171)

# Bump when the generated content changes, so cached demo datasets are regenerated.
DEMO_VERSION = 1
DEMO_DEFAULTS: dict[str, int] = {"patients": 500, "image_size": 256, "seed": 0, "images_per_folder": 1000}

# --------------------------------------------------------------------------------------------
# The cohort: how labels, demographics and visits are drawn

VISIT_COUNT_WEIGHTS = (0.25, 0.2, 0.17, 0.14, 0.12, 0.12)  # 1..6 visits, mean about 3
MALE_FRACTION = 0.56
AGE_MEAN, AGE_SD, AGE_RANGE = 47.0, 17.0, (1, 94)
PERSISTENCE = 0.6  # chance that a finding seen at one visit is still there at the next
FRAILTY_WEIGHT = 1.5  # shared per-patient log-odds: findings cluster, so about half are healthy
FOLLOW_UP_QUIRK_FRACTION = 0.08  # patients whose file numbers are a rotation of their visit order
TEST_FRACTION = 0.2
SPLIT_CANDIDATES = 256  # random patient splits tried; the most class-balanced one is kept
BOX_FRACTION = 0.5


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
    "Atelectasis": FindingOdds(0.034, per_decade=0.10, ap=1.0),
    "Cardiomegaly": FindingOdds(0.024, per_decade=0.35, male=-0.2),
    "Effusion": FindingOdds(0.036, per_decade=0.15, ap=1.0),
    "Infiltration": FindingOdds(0.075, ap=0.2),
    "Mass": FindingOdds(0.024, per_decade=0.20, male=0.2),
    "Nodule": FindingOdds(0.027, per_decade=0.10),
    "Pneumonia": FindingOdds(0.016, male=0.1, ap=0.5),
    "Pneumothorax": FindingOdds(0.015, per_decade=-0.20, male=0.9, ap=0.2),
    "Consolidation": FindingOdds(0.022, ap=0.5),
    "Edema": FindingOdds(0.013, per_decade=0.10, ap=1.2),
    "Emphysema": FindingOdds(0.014, per_decade=0.40, male=0.4),
    "Fibrosis": FindingOdds(0.019, per_decade=0.30, male=0.1),
    "Pleural_Thickening": FindingOdds(0.021, per_decade=0.20, male=0.1),
    "Hernia": FindingOdds(0.015, per_decade=0.40, male=-1.0),
}
assert tuple(FINDING_ODDS) == FINDINGS

# Random streams: every draw is keyed by (seed, stream, ...), so no stream shifts or repeats another.
(
    _TABLE, _SPLIT, _BOXES, _ANATOMY, _VISIT, _GRAIN, _SHADING, _LUNG_TEXTURE, _PLACE, _JITTER, _SIGN_TEXTURE
) = range(11)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


# --------------------------------------------------------------------------------------------
# Tables


def sample_table(patients: int = 500, seed: int = 0) -> pd.DataFrame:
    """Draw the label table: one row per image, sorted by patient and follow-up.

    Columns use the normalised names of ``nih.read_label_table`` (``OriginalImage Width`` ...),
    ``Patient Age`` is an int, and the table is a pure function of ``(patients, seed)``.
    """
    _check_positive("patients", patients)
    rng = _rng(seed, _TABLE)
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
            "Image Index": [f"{p:08d}_{n:03d}.png" for p, n in zip(patient_id, file_number)],
            "Finding Labels": _finding_strings(findings),
            "Follow-up #": follow_up,
            "Patient ID": patient_id,
            "Patient Age": age,
            "Patient Gender": np.where(male[patient], "M", "F"),
            "View Position": np.where(ap, "AP", "PA"),
            "OriginalImage Width": ORIGINAL_SIZE,
            "OriginalImage Height": ORIGINAL_SIZE,
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
    picks = _rng(seed, _SPLIT).random((SPLIT_CANDIDATES, len(counts))).argsort(axis=1)[:, :n_test]
    in_test = np.zeros((SPLIT_CANDIDATES, len(counts)), bool)
    np.put_along_axis(in_test, picks, True, axis=1)
    share = (in_test.astype(float) @ counts) / np.maximum(counts.sum(axis=0), 1)
    best = np.abs(share - TEST_FRACTION).max(axis=1).argmin()
    return np.sort(per_patient.index[in_test[best]].to_numpy())


def sample_boxes(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Boxes for about half of the positive (image, finding) pairs of NIH's eight box classes.

    Columns ``Image Index``, ``Finding Label`` (canonical spelling), ``x``, ``y``, ``w``, ``h``
    in the original 1024-pixel space, sorted like NIH's file (by finding, then image).
    """
    positive = encode_labels(table["Finding Labels"], BOX_FINDINGS, source="demo table") > 0
    rows, classes = np.nonzero(positive)
    chosen = _rng(seed, _BOXES).random(len(rows)) < BOX_FRACTION
    rows, classes = rows[chosen], classes[chosen]
    images = table.iloc[rows]
    boxes = [
        finding_box(seed, pid, follow_up, BOX_FINDINGS[k], view)
        for pid, follow_up, k, view in zip(
            images["Patient ID"], images["Follow-up #"], classes, images["View Position"]
        )
    ]
    out = pd.DataFrame(boxes, columns=["x", "y", "w", "h"], dtype=float)
    out.insert(0, "Finding Label", np.asarray(BOX_FINDINGS)[classes])
    out.insert(0, "Image Index", images["Image Index"].to_numpy())
    out = out.assign(_class=classes).sort_values(["_class", "Image Index"])
    return out.drop(columns="_class").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Geometry: everything lives in unit coordinates (0..1 across the image), so a demo drawn at
# 64 px shows the same chest as one drawn at 256 px and boxes scale to the 1024-px space.


class Ellipse(NamedTuple):
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0

    def distance(self, c: Canvas) -> np.ndarray:
        """Normalised radius: < 1 inside the ellipse."""
        dx, dy = c.x - self.cx, c.y - self.cy
        if self.angle:
            cos, sin = math.cos(self.angle), math.sin(self.angle)
            dx, dy = dx * cos + dy * sin, dy * cos - dx * sin
        return np.sqrt((dx / self.rx) ** 2 + (dy / self.ry) ** 2)

    def point(self, u: float, v: float) -> tuple[float, float]:
        """The point at (u, v) in radii from the centre (u to the image right, v downward)."""
        return self.cx + u * self.rx, self.cy + v * self.ry

    def scaled(self, kx: float, ky: float, dx: float = 0.0, dy: float = 0.0) -> Ellipse:
        return self._replace(cx=self.cx + dx, cy=self.cy + dy, rx=self.rx * kx, ry=self.ry * ky)


@dataclass(frozen=True)
class Anatomy:
    """One image's chest: patient-specific build plus visit-specific positioning and exposure."""

    midline: float
    scale: float
    body: Ellipse
    lungs: tuple[Ellipse, Ellipse]  # image left (patient's right), image right
    heart: Ellipse
    gain: float
    offset: float

    def lateral(self, side: int) -> int:
        """+1 where 'outward' for this lung is the image's right, -1 where it is the left."""
        return -1 if side == 0 else 1


def chest_anatomy(seed: int, patient_id: int, follow_up: int, view: str = "PA") -> Anatomy:
    """The build is drawn per patient; position, inspiration and exposure per visit."""
    if view not in ("PA", "AP"):
        raise ConfigError(f"demo view={view!r}: expected 'PA' or 'AP'.")
    build = _rng(seed, _ANATOMY, patient_id)
    mid = 0.5 + build.normal(0, 0.015)
    s = build.uniform(0.93, 1.05)
    heart_width = build.uniform(0.95, 1.05)
    visit = _rng(seed, _VISIT, patient_id, follow_up)
    mid += visit.normal(0, 0.01)
    dy = visit.normal(0, 0.012)
    breath = 1 + visit.normal(0, 0.015)
    # A bedside AP film magnifies the heart: a real confounder of Cardiomegaly.
    heart_mag = 1.12 if view == "AP" else 1.0
    return Anatomy(
        midline=mid,
        scale=s,
        body=Ellipse(mid, 0.6 + dy, 0.44 * s, 0.62 * s),
        lungs=(
            Ellipse(mid - 0.165 * s, 0.455 + dy, 0.125 * s, 0.245 * s * breath),
            Ellipse(mid + 0.16 * s, 0.465 + dy, 0.12 * s, 0.235 * s * breath),
        ),
        heart=Ellipse(mid + 0.045 * s, 0.615 + dy, 0.11 * s * heart_width * heart_mag, 0.085 * s * heart_mag, -0.35),
        gain=visit.uniform(0.9, 1.1),
        offset=visit.uniform(-0.03, 0.03),
    )


# --------------------------------------------------------------------------------------------
# Drawing primitives


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _inside(d: np.ndarray, edge: float = 0.06) -> np.ndarray:
    """Soft ellipse mask: 1 for d < 1 - edge, 0 for d > 1 + edge."""
    return _smoothstep((1 + edge - d) / (2 * edge))


def _bump(d: np.ndarray) -> np.ndarray:
    """Smooth blob, exactly zero outside the ellipse."""
    return np.clip(1 - d * d, 0.0, None) ** 2


def _plateau(d: np.ndarray, edge: float) -> np.ndarray:
    """Flat-topped blob with a linear rim of relative width ``edge``; zero outside."""
    return np.clip((1 - d) / edge, 0.0, 1.0)


@functools.lru_cache(maxsize=64)
def _spline_matrix(cells: int, size: int) -> np.ndarray:
    """Cubic B-spline weights mapping ``cells + 4`` control values onto ``size`` samples."""
    u = (np.arange(size) + 0.5) / size * cells
    t = np.abs(u[:, None] - np.arange(-1, cells + 3)[None, :])
    w = np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def _smooth_noise(keys: tuple[int, ...], cells: int, size: int) -> np.ndarray:
    """Unit-variance smooth random field with about ``cells`` blobs across the image, the same
    function of position at every image size."""
    control = _rng(*keys, cells).standard_normal((cells + 4, cells + 4)).astype(np.float32)
    w = _spline_matrix(cells, size)
    norm = np.sqrt((w**2).sum(axis=1))
    # einsum, not ``@``: BLAS threads make these tiny products 100x slower on a busy machine.
    field = np.einsum("il,ml->im", np.einsum("ij,jl->il", w, control), w)
    return field / np.outer(norm, norm)


class Canvas:
    """Pixel grid of one image plus the anatomical layers (masks, lung texture) signs need."""

    def __init__(self, anatomy: Anatomy, size: int, seed: int, patient_id: int, follow_up: int) -> None:
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.x, self.y = coords[None, :], coords[:, None]
        self.size, self.anatomy = size, anatomy
        self.seed, self.patient_id, self.follow_up = seed, patient_id, follow_up

    def noise(self, stream: int, cells: int, *keys: int) -> np.ndarray:
        """This image's smooth random field of ``stream`` (and ``keys``)."""
        return _smooth_noise((self.seed, stream, self.patient_id, self.follow_up, *keys), cells, self.size)

    @functools.cached_property
    def heart(self) -> np.ndarray:
        return _inside(self.anatomy.heart.distance(self), 0.08)

    @functools.cached_property
    def lungs_raw(self) -> tuple[np.ndarray, np.ndarray]:
        """The lung ellipses, ignoring the heart in front of them."""
        return tuple(_inside(lung.distance(self), 0.05) for lung in self.anatomy.lungs)  # type: ignore[return-value]

    @functools.cached_property
    def lungs(self) -> tuple[np.ndarray, np.ndarray]:
        """The aerated lung each side: what the heart does not cover."""
        return tuple(m * (1 - self.heart) for m in self.lungs_raw)  # type: ignore[return-value]

    @functools.cached_property
    def lung_texture(self) -> np.ndarray:
        """Vascular markings, the texture a pneumothorax lacks."""
        return 0.035 * self.noise(_LUNG_TEXTURE, 22)


# Intensities on a 0..1 scale before exposure: air, soft tissue, the darkening of aerated lung.
AIR, SOFT_TISSUE, LUNG_DARK, HEART_BRIGHT = 0.05, 0.42, 0.27, 0.2


def _base_chest(c: Canvas) -> np.ndarray:
    a = c.anatomy
    img = AIR + SOFT_TISSUE * _inside(a.body.distance(c), 0.04)
    img = img - (LUNG_DARK - c.lung_texture) * (c.lungs[0] + c.lungs[1])
    img = img + HEART_BRIGHT * c.heart + _mediastinum(c) + _spine(c) + _ribs(c) + _clavicles(c)
    return img + 0.03 * c.noise(_SHADING, 3)


def _mediastinum(c: Canvas) -> np.ndarray:
    a = c.anatomy
    top, bottom = a.lungs[0].cy - a.lungs[0].ry, a.heart.cy
    band = _smoothstep((0.05 * a.scale - np.abs(c.x - a.midline)) / 0.015)
    return 0.15 * band * _smoothstep((c.y - top + 0.05) / 0.05) * _smoothstep((bottom - c.y) / 0.05)


def _spine(c: Canvas) -> np.ndarray:
    a = c.anatomy
    band = _smoothstep((0.022 * a.scale - np.abs(c.x - a.midline)) / 0.008)
    return 0.1 * band * (0.8 + 0.2 * np.cos(2 * np.pi * c.y / 0.035))


def _ribs(c: Canvas) -> np.ndarray:
    a = c.anatomy
    top = a.lungs[0].cy - a.lungs[0].ry
    period = 0.055 * a.scale
    phase = (c.y - top - 0.05 * ((c.x - a.midline) / (0.3 * a.scale)) ** 2) / period
    cage = _inside(Ellipse(a.midline, top + 0.25 * a.scale, 0.33 * a.scale, 0.3 * a.scale).distance(c), 0.08)
    return 0.07 * np.clip(np.cos(2 * np.pi * phase), 0, 1) ** 4 * cage * (phase > -0.25) * (phase < 8.25)


def _clavicles(c: Canvas) -> np.ndarray:
    a = c.anatomy
    y = a.lungs[0].cy - a.lungs[0].ry + 0.005
    bones = [Ellipse(a.midline + side * 0.14 * a.scale, y, 0.13 * a.scale, 0.012, -side * 0.22) for side in (-1, 1)]
    return 0.1 * sum(_inside(b.distance(c), 0.3) for b in bones)


# --------------------------------------------------------------------------------------------
# Signs of the 14 findings. Each factory draws the sign's geometry and returns a ``Paint``: the
# additive change to the image, exactly zero outside the sign, so the box is where it is nonzero.

Paint = Callable[[Canvas], np.ndarray]


@dataclass
class SignRandom:
    place: np.random.Generator  # per patient: a persisting finding stays where it was
    visit: np.random.Generator  # per visit: small jitter and strength
    finding: int  # key of the sign's textures, drawn at paint time and the same at every size

    def texture(self, c: Canvas, cells: int) -> np.ndarray:
        return c.noise(_SIGN_TEXTURE, cells, self.finding)


def _lung_spot(
    a: Anatomy, r: SignRandom, side: int, u: tuple[float, float], v: tuple[float, float]
) -> tuple[float, float]:
    """A point of lung ``side`` at (u outward, v downward) in radii, drawn per patient, jittered per visit."""
    lung = a.lungs[side]
    lat = a.lateral(side)
    x, y = lung.point(lat * r.place.uniform(*u), r.place.uniform(*v))
    return x + r.visit.normal(0, 0.006), y + r.visit.normal(0, 0.006)


def _atelectasis(a: Anatomy, r: SignRandom) -> Paint:
    # Plate-like linear opacity in a lower zone.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (0.0, 0.45), (0.1, 0.5))
    lung = a.lungs[side]
    length, thickness = lung.rx * r.place.uniform(0.45, 0.65), lung.ry * r.place.uniform(0.06, 0.1)
    band = Ellipse(x, y, length, thickness, r.place.uniform(-0.4, 0.4))
    amp = 0.26 * r.visit.uniform(0.85, 1.1)
    return lambda c: amp * _plateau(band.distance(c), 0.5) * c.lungs[side]


def _cardiomegaly(a: Anatomy, r: SignRandom) -> Paint:
    # The heart is wider (and a little taller): brightness gained where lung was.
    big = a.heart.scaled(r.place.uniform(1.3, 1.45) * r.visit.uniform(0.97, 1.03), 1.12)

    def paint(c: Canvas) -> np.ndarray:
        grown = _inside(big.distance(c), 0.08) - c.heart
        return grown * (HEART_BRIGHT + (LUNG_DARK - c.lung_texture) * (c.lungs_raw[0] + c.lungs_raw[1]))

    return paint


def _effusion(a: Anatomy, r: SignRandom) -> Paint:
    # Fluid fills the lung base with a meniscus rising laterally and blunts the angle.
    side = int(r.place.integers(2))
    lung, lat = a.lungs[side], a.lateral(side)
    level = r.place.uniform(0.35, 0.65) + r.visit.normal(0, 0.04)
    amp = 0.3 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        outward = np.clip(lat * (c.x - lung.cx) / lung.rx, 0, 1)
        surface = lung.cy + lung.ry * (level - 0.4 * outward**2)
        return amp * _smoothstep((c.y - surface) / 0.015) * c.lungs[side]

    return paint


def _infiltration(a: Anatomy, r: SignRandom) -> Paint:
    # Patchy, ill-defined opacity in a mid or upper zone.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.3, 0.3), (-0.55, 0.1))
    lung = a.lungs[side]
    region = Ellipse(x, y, lung.rx * r.place.uniform(0.5, 0.7), lung.ry * r.place.uniform(0.3, 0.42))
    amp = 0.2 * r.visit.uniform(0.85, 1.1)
    def paint(c: Canvas) -> np.ndarray:
        # A faint haze everywhere in the region, denser in patches.
        patches = np.clip(0.3 + 0.6 * r.texture(c, 14), 0, 1)
        return amp * (0.35 + 0.65 * patches) * _bump(region.distance(c)) * c.lungs[side]

    return paint


def _mass(a: Anatomy, r: SignRandom) -> Paint:
    # A large, lobulated, well-defined blob.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.5, 0.5), (-0.5, 0.45))
    radius = r.place.uniform(0.045, 0.07) * a.scale
    phases = r.place.uniform(0, 2 * np.pi, 2)
    amp = 0.3 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        d = np.broadcast_to(Ellipse(x, y, radius, radius).distance(c), (c.size, c.size))
        near = d < 1.15  # the lobulated edge reaches 1 + 0.08 + 0.05; skip the angle elsewhere
        theta = np.arctan2(*np.broadcast_arrays(c.y - y, c.x - x))[near]
        lobulation = 1 + 0.08 * np.sin(2 * theta + phases[0]) + 0.05 * np.sin(3 * theta + phases[1])
        blob = np.zeros((c.size, c.size), np.float32)
        blob[near] = _plateau(d[near] / lobulation, 0.3)
        return amp * blob

    return paint


def _nodule(a: Anatomy, r: SignRandom) -> Paint:
    # A small, bright, round spot.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.55, 0.55), (-0.6, 0.5))
    spot = Ellipse(x, y, *(2 * (r.place.uniform(0.016, 0.024) * a.scale,)))
    amp = 0.38 * r.visit.uniform(0.85, 1.1)
    return lambda c: amp * _plateau(spot.distance(c), 0.4)


def _pneumonia(a: Anatomy, r: SignRandom) -> Paint:
    # Dense, confluent lower-zone opacity crossed by dark air bronchograms.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.25, 0.25), (0.15, 0.5))
    lung = a.lungs[side]
    region = Ellipse(x, y, lung.rx * r.place.uniform(0.55, 0.7), lung.ry * r.place.uniform(0.3, 0.4))
    tilt = r.place.uniform(-0.6, 0.6)
    amp = 0.26 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        density = np.clip(0.8 + 0.3 * r.texture(c, 6), 0, 1)
        along = (c.x - x) * math.cos(tilt) + (c.y - y) * math.sin(tilt)
        bronchi = np.clip(np.cos(2 * np.pi * along / 0.035), 0, 1) ** 12
        return amp * (density - 0.45 * bronchi) * np.sqrt(_bump(region.distance(c))) * c.lungs[side]

    return paint


def _pneumothorax(a: Anatomy, r: SignRandom) -> Paint:
    # The lung edge falls away from the chest wall at the apex and side, leaving a dark rim
    # without vascular markings, bounded by a thin bright pleural line.
    side = int(r.place.integers(2))
    lung, lat = a.lungs[side], a.lateral(side)
    f = r.place.uniform(0.2, 0.32) * r.visit.uniform(0.9, 1.1)
    collapsed = lung.scaled(1 - f, 1 - 0.5 * f, dx=-lat * 0.9 * f * lung.rx, dy=0.5 * f * lung.ry)
    upper = lung.cy + 0.35 * lung.ry

    def paint(c: Canvas) -> np.ndarray:
        d = collapsed.distance(c)
        keep = _smoothstep((upper - c.y) / (0.2 * lung.ry)) * c.lungs[side]
        rim = (1 - _inside(d, 0.03)) * keep
        line = _smoothstep(1 - np.abs(d - 1.0) / 0.04) * keep
        return -rim * (c.lung_texture + 0.09) + 0.12 * line

    return paint


def _consolidation(a: Anatomy, r: SignRandom) -> Paint:
    # Homogeneous, sharply marginated opacity.
    side = int(r.place.integers(2))
    x, y = _lung_spot(a, r, side, (-0.3, 0.3), (-0.4, 0.5))
    lung = a.lungs[side]
    rx, ry = lung.rx * r.place.uniform(0.35, 0.5), lung.ry * r.place.uniform(0.2, 0.3)
    region = Ellipse(x, y, rx, ry, r.place.uniform(-0.5, 0.5))
    amp = 0.28 * r.visit.uniform(0.85, 1.1)
    return lambda c: amp * _inside(region.distance(c), 0.05) * c.lungs[side]


def _edema(a: Anatomy, r: SignRandom) -> Paint:
    # Bilateral perihilar haze ("bat wings").
    wings = [
        Ellipse(*lung.point(-a.lateral(side) * 0.35, 0.05), lung.rx * 0.85, lung.ry * 0.6)
        for side, lung in enumerate(a.lungs)
    ]
    amp = 0.18 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        haze = sum(_bump(w.distance(c)) * m for w, m in zip(wings, c.lungs))
        return amp * haze * (0.8 + 0.2 * r.texture(c, 30))

    return paint


def _emphysema(a: Anatomy, r: SignRandom) -> Paint:
    # Hyperinflated, hyperlucent lungs with flattened diaphragms and sparse markings.
    k = r.place.uniform(1.08, 1.14)
    big = [lung.scaled(1.05, k, dy=(k - 1) * lung.ry) for lung in a.lungs]

    def paint(c: Canvas) -> np.ndarray:
        grown = sum(_inside(b.distance(c), 0.05) for b in big) * (1 - c.heart)
        old = c.lungs[0] + c.lungs[1]
        return -(LUNG_DARK - c.lung_texture) * (grown - old) - 0.07 * grown - 0.6 * c.lung_texture * old

    return paint


def _fibrosis(a: Anatomy, r: SignRandom) -> Paint:
    # Reticular net of fine lines in a lower, peripheral zone.
    side = int(r.place.integers(2))
    lung = a.lungs[side]
    zone = Ellipse(*lung.point(a.lateral(side) * 0.35, 0.35), lung.rx * 0.6, lung.ry * 0.45)
    angles = r.place.uniform(0, np.pi, 2)
    period = r.place.uniform(0.025, 0.035)
    amp = 0.16 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        waves = (np.cos(2 * np.pi * (c.x * math.cos(t) + c.y * math.sin(t)) / period) for t in angles)
        lines = sum(np.clip(w, 0, 1) ** 6 for w in waves)
        return amp * np.clip(lines, 0, 1) * _bump(zone.distance(c)) * c.lungs[side]

    return paint


def _pleural_thickening(a: Anatomy, r: SignRandom) -> Paint:
    # A bright band along the inner chest wall, at the apex (cap) or the side.
    side = int(r.place.integers(2))
    lung, lat = a.lungs[side], a.lateral(side)
    apical = r.place.random() < 0.5
    amp = 0.22 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        d = lung.distance(c)
        band = _smoothstep((d - 0.84) / 0.04) * _smoothstep((1.0 - d) / 0.03)
        if apical:
            where = _smoothstep((lung.cy - 0.55 * lung.ry - c.y) / (0.1 * lung.ry))
        else:
            where = _smoothstep((lat * (c.x - lung.cx) / lung.rx - 0.45) / 0.1) * _smoothstep(
                (0.6 * lung.ry - np.abs(c.y - lung.cy)) / (0.1 * lung.ry)
            )
        return amp * band * where * (1 - c.heart)

    return paint


def _hernia(a: Anatomy, r: SignRandom) -> Paint:
    # Hiatal hernia: a round retrocardiac opacity at the lower mediastinum with an air cap.
    x, y = a.midline + 0.015 * a.scale + r.visit.normal(0, 0.004), a.heart.cy + 0.55 * a.heart.ry
    sac = Ellipse(x, y, r.place.uniform(0.05, 0.065) * a.scale, r.place.uniform(0.035, 0.045) * a.scale)
    amp = 0.22 * r.visit.uniform(0.85, 1.1)

    def paint(c: Canvas) -> np.ndarray:
        inner = _inside(sac.distance(c), 0.12)
        gas = _inside(sac.scaled(0.75, 0.75).distance(c), 0.1) * _smoothstep((y - 0.25 * sac.ry - c.y) / 0.006)
        return amp * inner - 0.6 * amp * gas

    return paint


SIGNS: dict[str, Callable[[Anatomy, SignRandom], Paint]] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
assert tuple(SIGNS) == FINDINGS


def _sign(finding: str, anatomy: Anatomy, seed: int, patient_id: int, follow_up: int) -> Paint:
    if finding not in SIGNS:
        raise ConfigError(f"unknown finding {finding!r}; expected one of {list(FINDINGS)}.")
    k = FINDINGS.index(finding) + 1
    random = SignRandom(
        place=_rng(seed, _PLACE, patient_id, k),
        visit=_rng(seed, _JITTER, patient_id, follow_up, k),
        finding=k,
    )
    return SIGNS[finding](anatomy, random)


# --------------------------------------------------------------------------------------------
# Images and boxes

BOX_REFERENCE_SIZE = 240  # boxes are measured on this grid, whatever size the PNGs are
_SUPPORT_EPS = 1e-3  # a quarter of a grey level


def draw_chest(
    size: int, seed: int, patient_id: int, follow_up: int = 0, findings: Iterable[str] = (), view: str = "PA"
) -> np.ndarray:
    """Draw one image as a ``(size, size)`` uint8 array.

    Everything but the findings' signs depends on ``(seed, patient_id, follow_up, view)`` only,
    so drawing with and without a finding differs only inside that finding's ``finding_box``.
    """
    _check_positive("size", size)
    anatomy = chest_anatomy(seed, patient_id, follow_up, view)
    canvas = Canvas(anatomy, size, seed, patient_id, follow_up)
    img = _base_chest(canvas)
    for finding in findings:
        img = img + _sign(finding, anatomy, seed, patient_id, follow_up)(canvas)
    grain = 0.012 * _rng(seed, _GRAIN, patient_id, follow_up).standard_normal((size, size), dtype=np.float32)
    img = anatomy.gain * img + anatomy.offset + grain
    pixels = np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return pixels


def finding_box(
    seed: int, patient_id: int, follow_up: int, finding: str, view: str = "PA"
) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` in the 1024-pixel space around where ``finding``'s sign changes the image."""
    anatomy = chest_anatomy(seed, patient_id, follow_up, view)
    canvas = Canvas(anatomy, BOX_REFERENCE_SIZE, seed, patient_id, follow_up)
    touched = np.abs(_sign(finding, anatomy, seed, patient_id, follow_up)(canvas)) > _SUPPORT_EPS
    rows, cols = np.flatnonzero(touched.any(axis=1)), np.flatnonzero(touched.any(axis=0))
    if not len(rows):  # every sign is built to show; this would be a bug in its factory
        raise RuntimeError(f"{finding} left no mark on patient {patient_id} visit {follow_up}")
    # Grow by one reference pixel so pixels of finer images near the edge stay inside.
    cell = ORIGINAL_SIZE / BOX_REFERENCE_SIZE
    x0, x1 = max(cols[0] - 1, 0) * cell, min(cols[-1] + 2, BOX_REFERENCE_SIZE) * cell
    y0, y1 = max(rows[0] - 1, 0) * cell, min(rows[-1] + 2, BOX_REFERENCE_SIZE) * cell
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


MIN_IMAGES_PER_WORKER = 32


class _ImageJob(NamedTuple):
    path: str
    size: int
    seed: int
    patient_id: int
    follow_up: int
    findings: tuple[str, ...]
    view: str


def _write_images(jobs: Sequence[_ImageJob]) -> int:
    for job in jobs:
        pixels = draw_chest(job.size, job.seed, job.patient_id, job.follow_up, job.findings, job.view)
        with atomic_path(job.path) as tmp:
            tmp.write_bytes(encode_png(pixels))
    return len(jobs)


def image_folders(names: pd.Series, images_per_folder: int) -> pd.Series:
    """``images_001/images`` ... for each image, in name order, like NIH's twelve folders."""
    rank = names.rank(method="first").astype(int) - 1
    return "images_" + (rank // images_per_folder + 1).map("{:03d}".format) + "/images"


# --------------------------------------------------------------------------------------------
# Writing the dataset


def generate(
    out: str | os.PathLike,
    patients: int = DEMO_DEFAULTS["patients"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    seed: int = DEMO_DEFAULTS["seed"],
    workers: int = 1,
    images: bool = True,
    images_per_folder: int = DEMO_DEFAULTS["images_per_folder"],
) -> Path:
    """Write a demo dataset in the NIH layout into ``out`` (a new or empty directory).

    ``images=False`` writes only the tables and lists (fast; for statistics). The label table is
    written last, so an interrupted run never looks like a complete dataset.
    """
    for name, value in zip(
        ("patients", "image_size", "workers", "images_per_folder"), (patients, image_size, workers, images_per_folder)
    ):
        _check_positive(name, value)
    if image_size < 16:
        raise ConfigError(f"demo image_size={image_size}: use at least 16 pixels.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"demo output {out} exists and is not an empty directory; choose a new --out or delete it.")
    out.mkdir(parents=True, exist_ok=True)

    table = sample_table(patients, seed)
    test_ids = split_test_patients(table, seed)
    boxes = sample_boxes(table, seed)
    if images:
        jobs = _image_jobs(table, out, image_size, seed, images_per_folder)
        for folder in sorted({Path(job.path).parent for job in jobs}):
            folder.mkdir(parents=True, exist_ok=True)
        _run_jobs(jobs, workers)

    in_test = table["Patient ID"].isin(test_ids)
    write_text(out / TRAIN_VAL_LIST_NAME, _name_list(table.loc[~in_test, "Image Index"]))
    write_text(out / TEST_LIST_NAME, _name_list(table.loc[in_test, "Image Index"]))
    write_text(out / BBOX_TABLE_NAME, bbox_table_text(boxes))
    write_text(out / LABEL_TABLE_NAME, label_table_text(table))
    return out


def _image_jobs(table: pd.DataFrame, out: Path, size: int, seed: int, images_per_folder: int) -> list[_ImageJob]:
    folders = image_folders(table["Image Index"], images_per_folder)
    columns = ("Image Index", "Patient ID", "Follow-up #", "Finding Labels", "View Position")
    return [
        _ImageJob(str(out / folder / name), size, seed, int(pid), int(visit), tuple(_split_findings(labels)), view)
        for folder, (name, pid, visit, labels, view) in zip(folders, table[list(columns)].itertuples(index=False))
    ]


def _split_findings(labels: str) -> list[str]:
    return [] if labels == NO_FINDING else labels.split("|")


def _run_jobs(jobs: Sequence[_ImageJob], workers: int) -> None:
    # Starting a worker costs about a second; below a few dozen images each it does not pay.
    workers = min(workers, math.ceil(len(jobs) / MIN_IMAGES_PER_WORKER))
    if workers <= 1:
        _write_images(jobs)
        return
    chunks = [jobs[i::workers * 4] for i in range(workers * 4)]
    # spawn, not fork: the caller may be a training process with torch's thread pools running.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in pool.map(_write_images, chunks):
            pass


def _name_list(names: pd.Series) -> str:
    return "".join(name + "\n" for name in sorted(names))


def label_table_text(table: pd.DataFrame) -> str:
    """The label table as NIH writes it: its bracketed header and one comma-separated row per image."""
    body = table.to_csv(header=False, index=False, lineterminator="\n")
    return LABEL_TABLE_HEADER + "\n" + body


def bbox_table_text(boxes: pd.DataFrame) -> str:
    """The box list as NIH writes it: its ``,,,``-padded header, ``Infiltrate``, 15-digit floats."""
    rows = boxes.assign(**{"Finding Label": boxes["Finding Label"].replace(BOX_SPELLING)})
    body = rows.to_csv(header=False, index=False, lineterminator="\n", float_format="%.15g")
    return BBOX_TABLE_HEADER + "\n" + body


# --------------------------------------------------------------------------------------------
# Cached generation


def demo_dir(cache_dir: str | os.PathLike, **params: Any) -> Path:
    """Where :func:`ensure_demo` keeps the demo for ``params``: ``cache_dir/demo-<hash of params>``."""
    return Path(cache_dir).expanduser() / f"demo-{_digest(_marker(params))}"


def _marker(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEMO_DEFAULTS))
    if unknown:
        raise ConfigError(f"demo parameter(s) {unknown} unknown; expected some of {sorted(DEMO_DEFAULTS)}.")
    for name, value in params.items():
        (_check_integer if name == "seed" else _check_positive)(name, value)
    return {**DEMO_DEFAULTS, **{k: int(v) for k, v in params.items()}, "version": DEMO_VERSION}


def _digest(marker: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:10]


def ensure_demo(cache_dir: str | os.PathLike, workers: int | None = None, **params: Any) -> Path:
    """The demo dataset for ``params`` (``DEMO_DEFAULTS`` filled in), generated on first use
    into :func:`demo_dir` and reused afterwards.

    Generation goes to a temporary directory renamed into place when complete, with the marker
    file ``demo.json`` (the params) inside, so an interrupted run is never mistaken for a dataset.
    """
    marker = _marker(params)
    full = {k: v for k, v in marker.items() if k != "version"}
    digest = _digest(marker)
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"demo-{digest}"
    if _is_complete(target, marker):
        return target
    if target.exists():
        raise DataError(
            f"{target} exists but lacks a valid {MARKER_NAME}; delete the folder so the demo can be regenerated."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".demo-{digest}-tmp-"))
    try:
        generate(tmp, workers=workers or min(4, os.cpu_count() or 1), **full)
        write_json(tmp / MARKER_NAME, marker)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same demo first: use theirs.
            if not _is_complete(target, marker):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _is_complete(path: Path, marker: Mapping[str, Any]) -> bool:
    try:
        return json.loads((path / MARKER_NAME).read_text()) == dict(marker)
    except (OSError, ValueError):
        return False


def _check_integer(name: str, value: Any) -> None:
    try:
        integral = int(value) == value
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise ConfigError(f"demo {name}={value!r}: must be an integer.")


def _check_positive(name: str, value: Any) -> None:
    _check_integer(name, value)
    if value < 1:
        raise ConfigError(f"demo {name}={value!r}: must be a positive integer.")


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_lightning.data.demo",
        description="Write a synthetic miniature ChestX-ray14 in the exact NIH layout "
        "(a demo for exercising the pipeline, not evidence about real X-rays).",
    )
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory to write into")
    parser.add_argument("--patients", type=int, default=DEMO_DEFAULTS["patients"])
    parser.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--images-per-folder", type=int, default=DEMO_DEFAULTS["images_per_folder"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate(
            args.out, args.patients, args.image_size, args.seed, args.workers,
            images_per_folder=args.images_per_folder,
        )
    except CXRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_images = len((out / LABEL_TABLE_NAME).read_text().splitlines()) - 1
    print(f"Wrote {n_images} images of {args.patients} patients to {out} in {time.perf_counter() - start:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
