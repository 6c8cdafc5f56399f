"""Torch ``Dataset`` over a split table: one row -> ``{"image", "meta", "labels", "index"}`` (and
``"boxes"``, ``"box_labels"`` when given the split's boxes).

Samples carry uint8 pixels only; float conversion, augmentation and normalisation happen per
batch on the device (see :mod:`cxr_lightning.data.augment`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from rich.progress import track
from torch.utils.data import Dataset

from cxr_lightning.data import images
from cxr_lightning.data.boxes import ImageBoxes
from cxr_lightning.data.cache import ImageCache, SourceCaches
from cxr_lightning.errors import DataError

log = logging.getLogger(__name__)

class CXRDataset(Dataset):
    """Rows of ``table`` as samples: ``image`` uint8 ``(1, S, S)``, ``meta`` float32 ``(M,)``,
    ``labels`` float32 ``(L,)``, ``index`` (the row in ``table``); with ``boxes`` (box-guided
    training) also ``boxes`` float32 ``(K, 4)``, ``box_labels`` and ``box_readers`` int64 ``(K,)``
    of that row.

    Pixels come from ``cache`` when given (looked up by ``Image Index``), else are decoded from
    ``table["path"]`` (under the pixel budget ``max_pixels``) and resized. An image that fails to
    decode stops the run with a :class:`DataError` naming it, unless ``skip_unreadable``
    (``data.on_missing=skip``, for the loaders a Trainer runs): then the sample is ``None``, which
    :func:`collate_readable` leaves out of its batch and lists under ``"skipped"``.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        label_cols: Sequence[str],
        meta_cols: Sequence[str],
        image_size: int,
        cache: ImageCache | SourceCaches | None = None,
        boxes: ImageBoxes | None = None,
        max_pixels: int | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.max_pixels, self.skip_unreadable = max_pixels, bool(skip_unreadable)
        pooled_cache = isinstance(cache, SourceCaches)
        needed = list(label_cols) + list(meta_cols) + (["Image Index"] if cache is not None else ["path"]) \
            + (["source"] if pooled_cache else [])
        absent = [c for c in needed if c not in table.columns]
        if absent:
            raise DataError(f"Split table lacks column(s) {absent}; it has {list(table.columns)}.")
        if cache is not None and cache.size != image_size:
            raise DataError(
                f"Image cache {cache.directory} holds {cache.size} px images but image_size={image_size}."
            )
        # numpy once here: __getitem__ must not touch pandas (slow, and per worker per item).
        # NaN labels are kept: the image does not count for that label (data.uncertain=ignore, or a
        # label the source lacks); evaluation skips them per label, and training refuses them.
        self.labels = _float_block(table, label_cols, "label", allow_missing=True)
        self.meta = _float_block(table, meta_cols, "metadata")
        self.paths: list[str] = table["path"].astype(str).tolist() if "path" in table.columns else []
        self.names: list[str] = table["Image Index"].astype(str).tolist() if "Image Index" in table.columns else []
        self.cache = cache
        keys = list(zip(table["source"].astype(str), self.names)) if pooled_cache else self.names
        self.cache_rows = cache.rows(keys) if cache is not None else None
        self.image_size = int(image_size)
        if boxes is not None and len(boxes.boxes) != len(table):
            raise DataError(f"Boxes for {len(boxes.boxes)} images given with a split table of {len(table)} rows.")
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int] | None:
        try:
            pixels = self._pixels(index)
        except DataError as exc:
            if self.skip_unreadable:
                log.warning("Skipping an unreadable image (data.on_missing=skip): %s", exc)
                return {SKIPPED: self.paths[index] if self.paths else self.names[index]}
            raise DataError(
                f"{exc} (row {index}). To leave unreadable images out of the run, pass "
                f"data.on_missing=skip data.verify_images=true."
            ) from exc
        sample = {
            "image": torch.from_numpy(pixels).unsqueeze(0),
            "meta": torch.from_numpy(self.meta[index]),
            "labels": torch.from_numpy(self.labels[index]),
            "index": index,
        }
        if self.boxes is not None:
            sample["boxes"] = torch.from_numpy(self.boxes.boxes[index])
            sample["box_labels"] = torch.from_numpy(self.boxes.labels[index])
            if self.boxes.readers is not None:
                sample["box_readers"] = torch.from_numpy(self.boxes.readers[index])
        return sample

    def _pixels(self, index: int) -> np.ndarray:
        if self.cache is not None:
            row = self.cache_rows[index]
            return self.cache[row if row.ndim else int(row)]
        return images.load_resized(self.paths[index], self.image_size, self.max_pixels)


def _float_block(table: pd.DataFrame, cols: Sequence[str], what: str, allow_missing: bool = False) -> np.ndarray:
    try:
        block = table[list(cols)].to_numpy(dtype=np.float32, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataError(f"The {what} columns {list(cols)} must be numeric: {exc}") from exc
    nan_rows = np.isnan(block).any(axis=1)
    if nan_rows.any() and not allow_missing:
        bad_cols = [c for c, bad in zip(cols, np.isnan(block).any(axis=0)) if bad]
        raise DataError(
            f"Missing {what} values in column(s) {bad_cols} at rows {list(table.index[nan_rows][:5])}; "
            f"{what} columns must be filled before building a dataset."
        )
    return np.ascontiguousarray(block)


# The key of a sample that could not be decoded (it holds the file), and of a batch's list of them.
SKIPPED = "skipped"


def collate_readable(samples: list[dict]) -> dict:
    """``default_collate`` of the decoded samples; the files that could not be decoded under
    ``"skipped"`` (a batch of only those holds nothing else: the model's steps pass it by)."""
    from torch.utils.data import default_collate

    skipped = [s[SKIPPED] for s in samples if SKIPPED in s]
    readable = [s for s in samples if SKIPPED not in s]
    batch = default_collate(readable) if readable else {}
    batch[SKIPPED] = skipped
    return batch


def find_unreadable(paths: Sequence[str], workers: int = 1, max_pixels: int | None = None) -> list[str]:
    """The subset of ``paths`` that fail :func:`images.check_readable` (a full decode), in input order;
    the reasons are logged. Runs in ``workers`` threads: decoding releases the GIL."""
    paths = [str(p) for p in paths]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(
            track(
                pool.map(_unreadable_reason, paths, [max_pixels] * len(paths)),
                total=len(paths),
                description="Checking images",
                transient=True,
            )
        )
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    for _, reason in bad[:20]:
        log.warning("%s", reason)
    if len(bad) > 20:
        log.warning("... and %d more unreadable images.", len(bad) - 20)
    return [p for p, _ in bad]


def _unreadable_reason(path: str, max_pixels: int | None = None) -> str | None:
    try:
        images.check_readable(path, max_pixels)
    except DataError as exc:
        return str(exc)
    return None
