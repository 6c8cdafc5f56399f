"""The bounding boxes a training split may learn from (``loss.box_weight > 0``), per image.

Only the boxes of the images of the table given (the data module passes the training split) are
kept, so the boxes of validation and test patients, which score the CAMs, are never trained on.
NIH draws its boxes on the 1024-px originals (:data:`~cxr_lightning.data.nih.ORIGINAL_SIZE`); a
box source whose images vary in size (VinDr-CXR, RSNA Pneumonia: ``pixel_space`` ``dicom``) gives
them in the DICOM's pixels, and the size is read from each boxed training image's header. Either
way they are rescaled to the square ``image_size`` the images are resized to, as explain does.

A box table has NIH's columns (``Image Index``, ``Finding Label``: the finding's concept, ``x``,
``y``, ``w``, ``h``) and optionally ``Reader`` (the radiologist, for ``loss.box_fusion=majority``)
and ``pixel_space``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxr_lightning.data import images, nih
from cxr_lightning.errors import ConfigError, DataError

NO_BOX = -1  # box_labels value of a padding slot
NO_READER = -1  # box_readers value of a box without a reader id
DICOM_PIXELS = "dicom"  # pixel_space of boxes measured on the DICOM image itself


@dataclass(frozen=True)
class ImageBoxes:
    """``boxes`` ``(N, K, 4)`` float32 ``(x0, y0, x1, y1)`` in pixels of the resized image,
    ``labels`` ``(N, K)`` int64 label index (:data:`NO_BOX` where image ``i`` has fewer than ``K``
    boxes; ``K >= 1``, the most boxes any image has) and ``readers`` ``(N, K)`` int64 reader id
    (:data:`NO_READER` where unknown); ``count``: boxes kept, ``by_source``: their count per
    source and label."""

    boxes: np.ndarray
    labels: np.ndarray
    count: int
    readers: np.ndarray | None = None
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)


def image_boxes(
    table: pd.DataFrame, bbox_table: pd.DataFrame | None, label_names: Sequence[str], image_size: int,
    original_size: float = nih.ORIGINAL_SIZE, concepts: Sequence[str] | None = None,
) -> ImageBoxes:
    """The boxes of ``bbox_table`` on the images of ``table`` (by ``Image Index``), for findings
    whose concept is among ``concepts`` (those of ``label_names``, default the names themselves),
    rescaled from their image's size to ``image_size``."""
    names = table[nih.IMAGE].astype(str).to_numpy()
    if bbox_table is None or bbox_table.empty:
        empty = np.full((len(names), 1), NO_BOX)
        return ImageBoxes(np.zeros((len(names), 1, 4), np.float32), empty, 0, empty.copy())
    row_of = pd.Series(np.arange(len(names)), index=names)
    if row_of.index.has_duplicates:
        row_of = row_of[~row_of.index.duplicated()]
    label_of = {concept: i for i, concept in enumerate(concepts or label_names)}
    mine = bbox_table[bbox_table[nih.IMAGE].isin(row_of.index) & bbox_table["Finding Label"].isin(label_of)]
    rows = row_of.loc[mine[nih.IMAGE]].to_numpy()
    slots = pd.Series(rows).groupby(rows).cumcount().to_numpy()
    k = int(slots.max()) + 1 if len(slots) else 1
    boxes = np.zeros((len(names), k, 4), np.float32)
    labels = np.full((len(names), k), NO_BOX, np.int64)
    readers = np.full((len(names), k), NO_READER, np.int64)
    width = np.full(len(mine), float(original_size))
    height = width.copy()
    if "pixel_space" in mine.columns:
        dicom = (mine["pixel_space"] == DICOM_PIXELS).to_numpy()
        if dicom.any():
            paths = table["path"].astype(str).to_numpy()[rows[dicom]]
            sizes = _dicom_sizes(paths)
            height[dicom], width[dicom] = sizes[:, 0], sizes[:, 1]
    x, w = (mine[c].to_numpy(np.float64) * image_size / width for c in ("x", "w"))
    y, h = (mine[c].to_numpy(np.float64) * image_size / height for c in ("y", "h"))
    boxes[rows, slots] = np.stack([x, y, x + w, y + h], axis=1)
    labels[rows, slots] = mine["Finding Label"].map(label_of).to_numpy()
    if "Reader" in mine.columns:
        codes, _ = pd.factorize(mine["Reader"])  # NaN (a consensus or single-reader box) -> -1
        readers[rows, slots] = codes
    sources = table["source"].astype(str).to_numpy()[rows] if "source" in table.columns else np.full(len(rows), "")
    by_source: dict[str, dict[str, int]] = {}
    for src, label in zip(sources, labels[rows, slots]):
        counts = by_source.setdefault(str(src) or "all", {})
        counts[label_names[label]] = counts.get(label_names[label], 0) + 1
    return ImageBoxes(boxes, labels, len(mine), readers, by_source)


def with_image_sizes(bbox_table: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The boxes of ``bbox_table`` on the images of ``table`` (``Image Index``, ``path``), each with
    the size of the pixels it is measured in as ``OriginalImage Width`` / ``Height`` (what the
    localisation scores rescale from): a DICOM-pixel box (``pixel_space`` ``dicom``) its image's
    header's, read once per image; any other box keeps none (NIH's 1024-px originals)."""
    boxes = bbox_table[bbox_table[nih.IMAGE].isin(set(table[nih.IMAGE]))].copy()
    if "pixel_space" not in boxes.columns or boxes.empty:
        return boxes
    dicom = (boxes["pixel_space"] == DICOM_PIXELS).to_numpy()
    if dicom.any():
        path_of = table.drop_duplicates(nih.IMAGE).set_index(nih.IMAGE)["path"].astype(str)
        sizes = _dicom_sizes(path_of.loc[boxes.loc[dicom, nih.IMAGE]].tolist())
        for column in ("OriginalImage Width", "OriginalImage Height"):
            if column not in boxes.columns:
                boxes[column] = np.nan
        boxes.loc[dicom, "OriginalImage Height"] = sizes[:, 0]
        boxes.loc[dicom, "OriginalImage Width"] = sizes[:, 1]
    return boxes


def _dicom_sizes(paths: Sequence[str]) -> np.ndarray:
    """``(n, 2)`` rows and columns of each DICOM in ``paths`` (each file read once, header only)."""
    unique = sorted(set(paths))

    def size(path: str) -> tuple[float, float]:
        header = images.read_dicom_header(path)
        if not header["rows"] or not header["columns"]:
            raise DataError(f"DICOM file {path}: no Rows/Columns in its header, so its boxes cannot be scaled.")
        return float(header["rows"]), float(header["columns"])

    with ThreadPoolExecutor(max_workers=4) as pool:  # header reads are file I/O
        found = dict(zip(unique, pool.map(size, unique)))
    return np.array([found[p] for p in paths], dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# When the training split has no boxes, and NIH's boxed-image protocol
BOX_TRAINED = ("fold", "others")


def check_training_boxes(count: int, source: str, total: int) -> None:
    """ConfigError when box-guided training would train on no box (the term would be a constant 0
    and the run the plain recipe under another name)."""
    if count > 0:
        return
    where = (f"the training split holds none of the {total} boxes of {nih.BBOX_TABLE}: NIH's boxes are all on "
             f"{nih.TEST_LIST} images, which are never trained on" if source in ("nih", "demo") and total
             else f"data={source} gives no box on a training image")
    raise ConfigError(
        f"loss.box_weight > 0 but {where}. Two ways out: a pooled run with a box source "
        "(data=pooled data.sources=[nih,vindr_cxr] or rsna_pneumonia), or NIH's boxed-image protocol after "
        "Li et al. 2018 (data.boxes.folds=K data.boxes.fold=k: fold k's boxed patients leave the test split "
        "and train with their boxes); or set loss.box_weight=0."
    )


@dataclass(frozen=True)
class BoxFolds:
    """What NIH's boxed-image protocol did to a run's split (``metrics.json``'s ``box_protocol``)."""

    folds: int
    fold: int
    trained: str
    boxed_patients: int  # boxed patients of the official test list, all folds
    moved_patients: int  # of those, trained on in this run (left the test split)
    moved_images: int
    moved_boxes: int
    official_test_images: int
    test_images: int

    def record(self) -> dict:
        return {
            "folds": self.folds, "fold": self.fold, "trained": self.trained,
            "boxed_test_patients": self.boxed_patients, "moved_patients": self.moved_patients,
            "moved_images": self.moved_images, "moved_boxes": self.moved_boxes,
            "official_test_images": self.official_test_images, "test_images": self.test_images,
            "test": f"{nih.TEST_LIST} minus the {self.moved_patients} boxed patients trained on in this fold "
                    f"({self.official_test_images - self.test_images} images)",
        }


def check_box_folds(options: Mapping | None) -> dict | None:
    """``data.boxes`` (``folds``, ``fold``, ``trained``) checked; None when the protocol is off."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"folds", "fold", "trained"})
    if unknown:
        raise ConfigError(f"data.boxes: unknown key(s) {unknown}; expected folds, fold and trained.")
    folds, fold = options.get("folds"), options.get("fold")
    if folds is None and fold is None:
        return None
    trained = options.get("trained") or "fold"
    if folds is None or fold is None or not (int(folds) >= 2 and 0 <= int(fold) < int(folds)):
        raise ConfigError(f"data.boxes.folds={folds} data.boxes.fold={fold}: NIH's boxed-image protocol needs both, "
                          "with folds >= 2 and 0 <= fold < folds (one run per fold; compare aggregates them).")
    if trained not in BOX_TRAINED:
        raise ConfigError(f"data.boxes.trained={trained!r}: expected fold (fold k's boxed patients train) or "
                          "others (the other folds' boxed patients train, fold k's stay in test: "
                          "Li et al.'s 80/20 with folds=5).")
    return {"folds": int(folds), "fold": int(fold), "trained": trained}


def box_fold_split(
    table: pd.DataFrame, split: pd.Series, bbox_table: pd.DataFrame | None, folds: int, fold: int, seed: int,
    trained: str = "fold",
) -> tuple[pd.Series, BoxFolds]:
    """NIH's boxed-image protocol (after Li et al. 2018, "Thoracic disease identification and
    localization with limited supervision"): the patients of ``table`` with a box and in the test
    split are dealt into ``folds`` folds (seeded, by patient); with ``trained="fold"`` the patients of
    fold ``fold`` (``"others"``: of every other fold) leave the test split for the training split with
    all their images, so their boxes are trained on. The test split is the official one minus them."""
    if bbox_table is None or bbox_table.empty:
        raise ConfigError(
            f"data.boxes.folds: the data has no {nih.BBOX_TABLE}, so there are no boxed patients to fold."
        )
    in_test = split == "test"
    fold_of = box_fold_of(table, bbox_table, split, folds, seed)
    patients = fold_of.index
    if len(patients) < folds:
        raise DataError(
            f"data.boxes.folds={folds}: only {len(patients)} boxed test patient(s) to fold; lower the fold count."
        )
    chosen = fold_of.index[(fold_of == fold) if trained == "fold" else (fold_of != fold)]
    moved = in_test & table[nih.PATIENT].isin(chosen)
    out = split.copy()
    out[moved] = "train"
    moved_names = set(table.loc[moved, nih.IMAGE])
    record = BoxFolds(
        folds=folds, fold=fold, trained=trained, boxed_patients=len(patients), moved_patients=len(chosen),
        moved_images=int(moved.sum()), moved_boxes=int(bbox_table[nih.IMAGE].isin(moved_names).sum()),
        official_test_images=int(in_test.sum()), test_images=int((out == "test").sum()),
    )
    return out, record


def box_fold_of(table: pd.DataFrame, bbox_table: pd.DataFrame, split: pd.Series, folds: int, seed: int) -> pd.Series:
    """The fold of each boxed test patient (index: Patient ID), as :func:`box_fold_split` deals them."""
    boxed = table[(split == "test") & table[nih.IMAGE].isin(set(bbox_table[nih.IMAGE]))]
    # Seeded per patient, as the train_val folds are (cohort.patient_folds), on the boxed patients only.
    shuffled = np.random.default_rng(seed).permutation(np.sort(boxed[nih.PATIENT].unique()))
    return pd.Series(np.arange(len(shuffled)) % folds, index=shuffled, name="fold")
