"""The bounding boxes a training split may learn from (``loss.box_weight > 0``), per image.

Only the boxes of the images of the table given (the data module passes the training split) are
kept, so the boxes of validation and test patients, which score the CAMs, are never trained on.
NIH draws its boxes on the 1024-px originals (:data:`~cxr_lightning.data.nih.ORIGINAL_SIZE`);
they are rescaled to the square ``image_size`` the images are resized to, as explain does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr_lightning.data import nih

NO_BOX = -1  # box_labels value of a padding slot


@dataclass(frozen=True)
class ImageBoxes:
    """``boxes`` ``(N, K, 4)`` float32 ``(x0, y0, x1, y1)`` in pixels of the resized image and
    ``labels`` ``(N, K)`` int64 label index, :data:`NO_BOX` where image ``i`` has fewer than ``K``
    boxes (``K >= 1``, the most boxes any image has); ``count``: boxes kept."""

    boxes: np.ndarray
    labels: np.ndarray
    count: int


def image_boxes(
    table: pd.DataFrame, bbox_table: pd.DataFrame | None, label_names: Sequence[str], image_size: int,
    original_size: float = nih.ORIGINAL_SIZE,
) -> ImageBoxes:
    """The boxes of ``bbox_table`` on the images of ``table`` (by ``Image Index``), for findings
    among ``label_names``, rescaled from ``original_size`` to ``image_size``."""
    names = table[nih.IMAGE].astype(str).to_numpy()
    if bbox_table is None or bbox_table.empty:
        return ImageBoxes(np.zeros((len(names), 1, 4), np.float32), np.full((len(names), 1), NO_BOX), 0)
    row_of = pd.Series(np.arange(len(names)), index=names)
    label_of = {name: i for i, name in enumerate(label_names)}
    mine = bbox_table[bbox_table[nih.IMAGE].isin(row_of.index) & bbox_table["Finding Label"].isin(label_of)]
    rows = row_of.loc[mine[nih.IMAGE]].to_numpy()
    slots = pd.Series(rows).groupby(rows).cumcount().to_numpy()
    k = int(slots.max()) + 1 if len(slots) else 1
    boxes = np.zeros((len(names), k, 4), np.float32)
    labels = np.full((len(names), k), NO_BOX, np.int64)
    scale = image_size / float(original_size)
    x, y, w, h = (mine[c].to_numpy(np.float64) * scale for c in ("x", "y", "w", "h"))
    boxes[rows, slots] = np.stack([x, y, x + w, y + h], axis=1)
    labels[rows, slots] = mine["Finding Label"].map(label_of).to_numpy()
    return ImageBoxes(boxes, labels, len(mine))
