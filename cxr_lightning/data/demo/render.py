"""Drawing the demo chest and its findings into pixels, and measuring each finding's box."""
from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pandas as pd
from PIL import Image

from cxr_lightning.data import nih
from cxr_lightning.data.demo import streams
from cxr_lightning.data.demo.anatomy import (
    AIR,
    HEART_BRIGHT,
    LUNG_DARK,
    SOFT_TISSUE,
    Canvas,
    Ellipse,
    chest_anatomy,
    inside,
    smoothstep,
)
from cxr_lightning.data.demo.cohort import check_positive
from cxr_lightning.data.demo.signs import sign
from cxr_lightning.labels import encode_labels

BOX_REFERENCE_SIZE = 240  # boxes are measured on this grid, whatever size the PNGs are
_SUPPORT_EPS = 1e-3  # a quarter of a grey level
BOX_FRACTION = 0.5


def _base_chest(c: Canvas) -> np.ndarray:
    a = c.anatomy
    img = AIR + SOFT_TISSUE * inside(a.body.distance(c), 0.04)
    img = img - (LUNG_DARK - c.lung_texture) * (c.lungs[0] + c.lungs[1])
    img = img + HEART_BRIGHT * c.heart + _mediastinum(c) + _spine(c) + _ribs(c) + _clavicles(c)
    return img + 0.03 * c.noise(streams.SHADING, 3)


def _mediastinum(c: Canvas) -> np.ndarray:
    a = c.anatomy
    top, bottom = a.lungs[0].cy - a.lungs[0].ry, a.heart.cy
    band = smoothstep((0.05 * a.scale - np.abs(c.x - a.midline)) / 0.015)
    return 0.15 * band * smoothstep((c.y - top + 0.05) / 0.05) * smoothstep((bottom - c.y) / 0.05)


def _spine(c: Canvas) -> np.ndarray:
    a = c.anatomy
    band = smoothstep((0.022 * a.scale - np.abs(c.x - a.midline)) / 0.008)
    return 0.1 * band * (0.8 + 0.2 * np.cos(2 * np.pi * c.y / 0.035))


def _ribs(c: Canvas) -> np.ndarray:
    a = c.anatomy
    top = a.lungs[0].cy - a.lungs[0].ry
    period = 0.055 * a.scale
    phase = (c.y - top - 0.05 * ((c.x - a.midline) / (0.3 * a.scale)) ** 2) / period
    cage = inside(Ellipse(a.midline, top + 0.25 * a.scale, 0.33 * a.scale, 0.3 * a.scale).distance(c), 0.08)
    return 0.07 * np.clip(np.cos(2 * np.pi * phase), 0, 1) ** 4 * cage * (phase > -0.25) * (phase < 8.25)


def _clavicles(c: Canvas) -> np.ndarray:
    a = c.anatomy
    y = a.lungs[0].cy - a.lungs[0].ry + 0.005
    bones = [Ellipse(a.midline + side * 0.14 * a.scale, y, 0.13 * a.scale, 0.012, -side * 0.22) for side in (-1, 1)]
    return 0.1 * sum(inside(b.distance(c), 0.3) for b in bones)


def draw_chest(
    size: int, seed: int, patient_id: int, follow_up: int = 0, findings: Iterable[str] = (), view: str = "PA"
) -> np.ndarray:
    """Draw one image as a ``(size, size)`` uint8 array.

    Everything but the findings' signs depends on ``(seed, patient_id, follow_up, view)`` only,
    so drawing with and without a finding differs only inside that finding's ``finding_box``.
    """
    check_positive("size", size)
    anatomy = chest_anatomy(seed, patient_id, follow_up, view)
    canvas = Canvas(anatomy, size, seed, patient_id, follow_up)
    img = _base_chest(canvas)
    for finding in findings:
        img = img + sign(finding, anatomy, seed, patient_id, follow_up)(canvas)
    grain_rng = streams.rng(seed, streams.GRAIN, patient_id, follow_up)
    grain = 0.012 * grain_rng.standard_normal((size, size), dtype=np.float32)
    img = anatomy.gain * img + anatomy.offset + grain
    pixels = np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return pixels


def finding_box(
    seed: int, patient_id: int, follow_up: int, finding: str, view: str = "PA"
) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` in the 1024-pixel space around where ``finding``'s sign changes the image."""
    anatomy = chest_anatomy(seed, patient_id, follow_up, view)
    canvas = Canvas(anatomy, BOX_REFERENCE_SIZE, seed, patient_id, follow_up)
    touched = np.abs(sign(finding, anatomy, seed, patient_id, follow_up)(canvas)) > _SUPPORT_EPS
    rows, cols = np.flatnonzero(touched.any(axis=1)), np.flatnonzero(touched.any(axis=0))
    if not len(rows):  # every sign is built to show; this would be a bug in its factory
        raise RuntimeError(f"{finding} left no mark on patient {patient_id} visit {follow_up}")
    # Grow by one reference pixel so pixels of finer images near the edge stay inside.
    cell = nih.ORIGINAL_SIZE / BOX_REFERENCE_SIZE
    x0, x1 = max(cols[0] - 1, 0) * cell, min(cols[-1] + 2, BOX_REFERENCE_SIZE) * cell
    y0, y1 = max(rows[0] - 1, 0) * cell, min(rows[-1] + 2, BOX_REFERENCE_SIZE) * cell
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_boxes(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Boxes for about half of the positive (image, finding) pairs of NIH's eight box classes.

    Columns ``Image Index``, ``Finding Label`` (canonical spelling), ``x``, ``y``, ``w``, ``h``
    in the original 1024-pixel space, sorted like NIH's file (by finding, then image).
    """
    positive = encode_labels(table["Finding Labels"], nih.BOX_FINDINGS, source="demo table") > 0
    rows, classes = np.nonzero(positive)
    chosen = streams.rng(seed, streams.BOXES).random(len(rows)) < BOX_FRACTION
    rows, classes = rows[chosen], classes[chosen]
    images = table.iloc[rows]
    boxes = [
        finding_box(seed, pid, follow_up, nih.BOX_FINDINGS[k], view)
        for pid, follow_up, k, view in zip(
            images["Patient ID"], images["Follow-up #"], classes, images["View Position"]
        )
    ]
    out = pd.DataFrame(boxes, columns=["x", "y", "w", "h"], dtype=float)
    out.insert(0, "Finding Label", np.asarray(nih.BOX_FINDINGS)[classes])
    out.insert(0, "Image Index", images["Image Index"].to_numpy())
    out = out.assign(_class=classes).sort_values(["_class", "Image Index"])
    return out.drop(columns="_class").reset_index(drop=True)
