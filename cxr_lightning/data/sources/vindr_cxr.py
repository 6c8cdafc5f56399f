"""VinDr-CXR (Nguyen et al. 2022, Vingroup Big Data Institute) as published, in either layout.

- **PhysioNet** (VinDr-CXR 1.0.0): ``annotations/image_labels_train.csv`` (one row per image and
  radiologist: ``image_id, rad_id`` and a 0/1 column per finding, 3 readers per training image),
  ``annotations/annotations_train.csv`` (one row per box: ``image_id, rad_id, class_name, x_min,
  y_min, x_max, y_max``; ``No finding`` rows have no box), the same two for the test set (the
  5-radiologist consensus, one row per image) and ``train/<image_id>.dicom``, ``test/<image_id>.dicom``.
- **Kaggle** (VinBigData Chest X-ray Abnormalities Detection): ``train.csv`` with ``image_id,
  class_name, class_id, rad_id, x_min, y_min, x_max, y_max`` (one row per box; the 14 local
  findings and ``No finding``) and ``train/<image_id>.dicom``; its test set has no labels.

Labels: with several readers, ``reader_vote=majority`` (default) makes a finding positive where
more than half of the image's readers marked it (2 of 3), ``any`` where one did. Every reader's box
of a finding the vote calls positive is kept, with the reader's id (``loss.box_fusion`` takes
their union, or the pixels at least two marked). Boxes are in pixels of the DICOM image, whose
size :mod:`cxr_lightning.data.boxes` reads from the header when it rescales them.

VinDr-CXR publishes no patient identifier: each image is its own patient here (the paper's
images are from distinct studies), so the split is by image. Age, sex and view come from the
DICOM headers when the images are present; without them they are missing (the reader needs only
the label tables). The PhysioNet test set is the test split; validation (and, for Kaggle's layout,
test) patients are drawn, seeded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data.boxes import DICOM_PIXELS
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register
from cxr_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "vindr_cxr"
URL = "https://physionet.org/content/vindr-cxr/ (or Kaggle's vinbigdata-chest-xray-abnormalities-detection)"
IMAGE_ID, RAD_ID, CLASS_NAME, CLASS_ID = "image_id", "rad_id", "class_name", "class_id"
BOX = ("x_min", "y_min", "x_max", "y_max")
PHYSIONET_LABELS = {"train": "annotations/image_labels_train.csv", "test": "annotations/image_labels_test.csv"}
PHYSIONET_BOXES = {"train": "annotations/annotations_train.csv", "test": "annotations/annotations_test.csv"}
KAGGLE_TABLE = "train.csv"
KAGGLE_COLUMNS = (IMAGE_ID, CLASS_NAME, CLASS_ID, RAD_ID) + BOX
READER_VOTES = ("any", "majority")
NO_FINDING = "No finding"
# The test labels file spells one finding differently from the training one.
_SPELLINGS = {"Other disease": "Other diseases", "rad_ID": RAD_ID}

# Each finding -> the concepts it counts for (cxr_lightning.data.label_spaces). Same finding or a
# documented subtype only; a finding with no counterpart keeps its own name (a concept of its own,
# a label under labels=union only), and the two catch-alls count for nothing.
HARMONISATION: dict[str, tuple[str, ...]] = {
    "Aortic enlargement": ("Aortic enlargement",),
    "Atelectasis": ("Atelectasis",),
    "Calcification": ("Calcification",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Clavicle fracture": ("Fracture",),  # a fracture (CheXpert's "Fracture" is any fracture)
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema",),
    "Emphysema": ("Emphysema",),
    "Enlarged PA": ("Enlarged PA",),
    "ILD": ("ILD",),  # interstitial lung disease: broader than NIH's Fibrosis
    "Infiltration": ("Infiltration",),
    "Lung Opacity": ("Lung Opacity",),  # CheXpert's concept of the same name
    "Lung cavity": ("Lung cavity",),
    "Lung cyst": ("Lung cyst",),
    "Mediastinal shift": ("Mediastinal shift",),
    # One class for NIH's two: a positive is not known to be a Nodule or a Mass, so neither NIH label;
    # a concept of its own, spelled without the "/" a label name (it names files) may not hold.
    "Nodule/Mass": ("Nodule or Mass",),
    "Pleural effusion": ("Effusion",),
    "Pleural thickening": ("Pleural_Thickening",),
    "Pneumothorax": ("Pneumothorax",),
    "Pulmonary fibrosis": ("Fibrosis",),
    "Rib fracture": ("Fracture",),
    "Other lesion": (),
    "COPD": ("COPD",),
    "Lung tumor": ("Lung tumor",),
    "Pneumonia": ("Pneumonia",),
    "Tuberculosis": ("Tuberculosis",),
    "Other diseases": (),
    # "none of VinDr's findings": the same reading as NIH's "none of its 14" for the findings both
    # label, as for CheXpert's No Finding.
    NO_FINDING: ("No Finding",),
}


def check_vote(reader_vote: str) -> str:
    if reader_vote not in READER_VOTES:
        raise ConfigError(f"data.reader_vote={reader_vote!r}: expected one of {list(READER_VOTES)} "
                          "(majority: more than half of an image's readers, 2 of VinDr's 3; any: one reader).")
    return reader_vote


def layout(root: Path) -> str:
    """``physionet`` or ``kaggle``, from the files present; DataError naming both layouts otherwise."""
    if (root / PHYSIONET_LABELS["train"]).is_file() or (root / PHYSIONET_LABELS["test"]).is_file():
        return "physionet"
    if (root / KAGGLE_TABLE).is_file():
        return "kaggle"
    listing = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "nothing"
    raise DataError(
        f"no VinDr-CXR label table in {root}: expected PhysioNet's {PHYSIONET_LABELS['train']} (and "
        f"{PHYSIONET_BOXES['train']}) or Kaggle's {KAGGLE_TABLE}. The folder holds: {listing}. Get it from {URL}."
    )


@register
class VinDrCXR(Source):
    name = NAME
    title = "VinDr-CXR"
    harmonisation = HARMONISATION
    options = ("reader_vote",)
    hint = (f"Point data.root at VinDr-CXR as downloaded: PhysioNet's 1.0.0/ folder ({PHYSIONET_LABELS['train']}, "
            f"{PHYSIONET_BOXES['train']}, train/<image_id>.dicom) or Kaggle's ({KAGGLE_TABLE}, train/).")

    def __init__(self, root: str | Path, label_table: str = "auto", **options: object) -> None:
        super().__init__(root, label_table, **options)
        self.reader_vote = check_vote(str(options.get("reader_vote") or "majority"))

    def read(self) -> common.SourceData:
        return read(self.root, self.label_table, self.reader_vote)

    def read_boxes(self) -> pd.DataFrame | None:
        return read_boxes(self.root, self.reader_vote)


# --------------------------------------------------------------------------------------------------
def read(
    root: Path, label_table: str = "auto", reader_vote: str = "majority", headers: bool = True
) -> common.SourceData:
    """Read VinDr-CXR at ``root`` (either layout) into the standard table, one row per image."""
    check_vote(reader_vote)
    if label_table != "auto":
        raise ConfigError(f"data.label_table={label_table!r}: VinDr-CXR reads its own files; leave it at auto.")
    root = common.existing_dir(root, "VinDr-CXR")
    votes, main = _image_votes(root, reader_vote)
    findings = votes.drop(columns=["split"])
    split = votes["split"]
    ids = votes.index.to_series(index=votes.index)
    path = str(root) + "/" + split.map({"train": "train", "test": "test"}) + "/" + ids + ".dicom"
    if headers:
        demo = common.dicom_demographics(path, NAME)
    else:
        demo = pd.DataFrame(index=votes.index, columns=["age", "sex", "view"])
    view = demo["view"]
    frame = pd.DataFrame(index=votes.index)
    table = common.standard_table(
        frame,
        image=ids,
        patient=ids,  # no patient identifier is published: each image its own patient
        visit=pd.Series(0, index=votes.index),
        age=pd.to_numeric(demo["age"], errors="coerce"),
        sex=demo["sex"].astype(object),
        view=view.astype(object),
        path=path,
        frontal=view.isna() | view.isin(common.FRONTAL_VIEWS),  # VinDr-CXR is posteroanterior
        findings=findings,
        official_split=split.where(split == "test"),
        source=main.name,
    )
    return common.SourceData(table, main, list(findings.columns))


def read_boxes(root: Path, reader_vote: str = "majority") -> pd.DataFrame:
    """Every reader's box of each finding the vote calls positive, one row per (box, concept):
    ``Image Index``, ``Finding Label`` (the concept), ``x``, ``y``, ``w``, ``h`` (DICOM pixels),
    ``Reader`` (the radiologist's id, NaN for a consensus box), ``finding`` (VinDr's class) and
    ``pixel_space`` (``dicom``)."""
    check_vote(reader_vote)
    root = common.existing_dir(root, "VinDr-CXR")
    votes, _ = _image_votes(root, reader_vote)
    parts = []
    if layout(root) == "kaggle":
        parts.append(_box_rows(_kaggle_table(root / KAGGLE_TABLE), root / KAGGLE_TABLE))
    else:
        for name in PHYSIONET_BOXES.values():
            if (root / name).is_file():
                raw = common.read_csv(root / name, (IMAGE_ID, CLASS_NAME) + BOX, "VinDr-CXR box table")
                parts.append(_box_rows(_spelled(raw), root / name))
    if parts:
        boxes = pd.concat(parts, ignore_index=True)
    else:
        boxes = _box_rows(pd.DataFrame(columns=[IMAGE_ID, CLASS_NAME]), root)
    # Only where the image label is positive: a box of a finding the readers voted down guides nothing.
    positive = np.array([
        finding in votes.columns and image in votes.index and votes.at[image, finding] == 1.0
        for image, finding in zip(boxes["Image Index"], boxes["finding"])
    ], dtype=bool)
    boxes = boxes[positive]
    rows = [
        {**row, "Finding Label": concept}
        for row in boxes.to_dict("records") for concept in HARMONISATION.get(row["finding"], ())
    ]
    columns = ["Image Index", "Finding Label", "x", "y", "w", "h", "Reader", "finding"]
    out = pd.DataFrame(rows, columns=columns).reset_index(drop=True)
    out["pixel_space"] = DICOM_PIXELS  # VinDr's images vary in size: each box in its DICOM's pixels
    return out


# --------------------------------------------------------------------------------------------------
def _image_votes(root: Path, reader_vote: str) -> tuple[pd.DataFrame, Path]:
    """Per image (index ``image_id``): 1.0/0.0 per finding under the vote, and ``split``."""
    if layout(root) == "kaggle":
        path = root / KAGGLE_TABLE
        raw = _kaggle_table(path)
        reads = raw.assign(value=1.0).pivot_table(
            index=[IMAGE_ID, RAD_ID], columns=CLASS_NAME, values="value", aggfunc="max", fill_value=0.0
        )
        reads.columns = [str(c) for c in reads.columns]
        # Kaggle's table gives the 14 local findings and No finding only; a class no row names is 0.
        known = [f for f in HARMONISATION if f in reads.columns or f in _KAGGLE_CLASSES]
        reads = reads.reindex(columns=known, fill_value=0.0).reset_index()
        votes = _vote(reads, reader_vote)
        votes["split"] = "train"
        return votes, path
    parts = []
    for split, name in PHYSIONET_LABELS.items():
        path = root / name
        if not path.is_file():
            continue
        raw = _spelled(common.read_csv(path, (IMAGE_ID,), "VinDr-CXR image labels"))
        findings = [c for c in raw.columns if c not in (IMAGE_ID, RAD_ID)]
        unknown = [c for c in findings if c not in HARMONISATION]
        if unknown:
            raise DataError(f"{path}: unknown finding column(s) {unknown}; VinDr-CXR's are {list(HARMONISATION)}.")
        codes = raw[findings].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
        bad = codes.isna().any(axis=1) | ~codes.isin((0.0, 1.0)).all(axis=1)
        common.reject(raw, bad, path, "a finding value that is not 0 or 1", IMAGE_ID, "Use the file as published.")
        reads = pd.concat([raw[[IMAGE_ID]].apply(lambda c: c.str.strip()), codes], axis=1)
        votes = _vote(reads, reader_vote)
        votes["split"] = split
        parts.append(votes)
    if not parts:
        layout(root)  # names what is missing
    train_path = root / PHYSIONET_LABELS["train"]
    main = train_path if train_path.is_file() else root / PHYSIONET_LABELS["test"]
    votes = pd.concat(parts)
    both = votes.index.duplicated(keep=False)
    if both.any():
        raise DataError(f"{root}: image(s) in both the training and test labels: {sorted(set(votes.index[both]))[:5]}.")
    return votes, main


# Kaggle's 14 local findings and "No finding" (its class_id 0-14).
_KAGGLE_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", NO_FINDING,
)


def _vote(reads: pd.DataFrame, reader_vote: str) -> pd.DataFrame:
    """One row per image: a finding is positive where more than half of its reads (majority) or at
    least one (any) mark it. A consensus file (one read per image) passes through unchanged."""
    grouped = reads.groupby(IMAGE_ID, sort=True)
    marks, n = grouped.sum(numeric_only=True), grouped.size()
    if reader_vote == "any":
        positive = marks >= 1
    else:
        positive = marks.mul(2).gt(n, axis=0)
    return positive.astype(float)


def _kaggle_table(path: Path) -> pd.DataFrame:
    raw = common.read_csv(path, KAGGLE_COLUMNS, "VinBigData train.csv")
    for col in (IMAGE_ID, RAD_ID, CLASS_NAME):
        raw[col] = raw[col].str.strip()
    common.reject(raw, raw[IMAGE_ID].isna() | raw[RAD_ID].isna(), path, "an empty image_id or rad_id", CLASS_NAME,
                  "Use the file as published.")
    unknown = ~raw[CLASS_NAME].isin(_KAGGLE_CLASSES)
    common.reject(raw, unknown, path, f"a class_name not among VinBigData's {list(_KAGGLE_CLASSES)}", IMAGE_ID,
                  "Use the file as published.")
    return raw


def _spelled(raw: pd.DataFrame) -> pd.DataFrame:
    raw = raw.rename(columns=lambda c: _SPELLINGS.get(c, c))
    for col in (IMAGE_ID, RAD_ID, CLASS_NAME):
        if col in raw.columns:
            raw[col] = raw[col].str.strip()
    return raw


def _box_rows(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Box rows of ``raw`` (rows with coordinates) as ``Image Index, finding, x, y, w, h, Reader``;
    rows without a box (``No finding``) are skipped, malformed coordinates refused."""
    if raw.empty:
        return pd.DataFrame(columns=["Image Index", "finding", "x", "y", "w", "h", "Reader"])
    coords = raw[list(BOX)].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    blank = raw[list(BOX)].isna().all(axis=1) | (raw[list(BOX)].apply(lambda c: c.str.strip()) == "").all(axis=1)
    has_box = ~blank
    bad = has_box & (
        coords.isna().any(axis=1) | (coords["x_max"] <= coords["x_min"]) | (coords["y_max"] <= coords["y_min"])
        | (coords[["x_min", "y_min"]] < 0).any(axis=1) | ~np.isfinite(coords.fillna(0)).all(axis=1)
    )
    common.reject(raw, bad, path, "a box that is not four numbers with x_min < x_max, y_min < y_max, >= 0",
                  IMAGE_ID, "Use the file as published.")
    box_class = raw.loc[has_box, CLASS_NAME]
    common.reject(raw, has_box & (raw[CLASS_NAME] == NO_FINDING), path, "a box on a 'No finding' row", IMAGE_ID,
                  "Use the file as published.")
    c = coords[has_box]
    return pd.DataFrame({
        "Image Index": raw.loc[has_box, IMAGE_ID].to_numpy(),
        "finding": box_class.to_numpy(),
        "x": c["x_min"].to_numpy(), "y": c["y_min"].to_numpy(),
        "w": (c["x_max"] - c["x_min"]).to_numpy(), "h": (c["y_max"] - c["y_min"]).to_numpy(),
        "Reader": raw.loc[has_box, RAD_ID].to_numpy() if RAD_ID in raw.columns else np.nan,
    })
