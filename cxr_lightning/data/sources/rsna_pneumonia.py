"""The RSNA Pneumonia Detection Challenge (2018, stage 2) as published on Kaggle.

``data.root`` holds ``stage_2_train_labels.csv`` (``patientId, x, y, width, height, Target``: one
row per box, one row with blank coordinates for an image without one), optionally
``stage_2_detailed_class_info.csv`` (``patientId, class``: ``Lung Opacity``, ``No Lung Opacity /
Not Normal`` or ``Normal``) and ``stage_2_train_images/<patientId>.dcm``. Each patientId is one
image (and, as published, its own patient); age, sex and view are read from the DICOM headers
when the images are present. The challenge ships no labelled test set: val and test patients are
drawn, seeded.

Its images are NIH ChestX-ray14 images under new ids. RSNA's mapping file
(``pneumonia-challenge-dataset-mappings_2018.json``: ``subset_img_id`` = patientId ->
``img_id`` = NIH ``Image Index``) links them: :func:`read_mapping` reads it, and a pooled run uses
it to keep an NIH validation or test image's RSNA twin out of training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data.boxes import DICOM_PIXELS
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register
from cxr_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "rsna_pneumonia"
URL = "https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge"
LABELS = "stage_2_train_labels.csv"
CLASS_INFO = "stage_2_detailed_class_info.csv"
IMAGES = "stage_2_train_images"
MAPPING = "pneumonia-challenge-dataset-mappings_2018.json"
MAPPING_URL = "https://s3.amazonaws.com/east1.public.rsna.org/AI/2018/pneumonia-challenge-dataset-mappings_2018.json"
PATIENT_ID, TARGET, CLASS = "patientId", "Target", "class"
BOX = ("x", "y", "width", "height")
CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
LUNG_OPACITY, NORMAL = "Lung Opacity", "Normal"

# The challenge's positive class is "Lung Opacity": an opacity that radiologists judged could be
# pneumonia ("opacity suggestive of pneumonia", Shih et al. 2019), which is what an NIH "Pneumonia"
# label says of an image; so it counts for Pneumonia. "Normal" (no finding at all) counts for No
# Finding; "No Lung Opacity / Not Normal" is negative for both.
HARMONISATION: dict[str, tuple[str, ...]] = {
    LUNG_OPACITY: ("Pneumonia",),
    NORMAL: ("No Finding",),
}


@register
class RSNAPneumonia(Source):
    name = NAME
    title = "RSNA Pneumonia Detection Challenge"
    harmonisation = HARMONISATION
    # mapping: RSNA's mapping file when it is not in data.root (see cxr_lightning.data.leakage).
    options = ("mapping",)
    hint = f"Point data.root at the challenge's files ({LABELS}, {CLASS_INFO}, {IMAGES}/<patientId>.dcm)."

    def read(self) -> common.SourceData:
        return read(self.root, self.label_table)

    def read_boxes(self) -> pd.DataFrame | None:
        return read_boxes(self.root)


def read(root: Path, label_table: str = "auto", headers: bool = True) -> common.SourceData:
    """Read RSNA's label files at ``root`` into the standard table, one row per image."""
    if label_table != "auto":
        raise ConfigError(f"data.label_table={label_table!r}: RSNA Pneumonia reads {LABELS}; leave it at auto.")
    root = common.existing_dir(root, "RSNA Pneumonia Detection Challenge")
    path = common.find_file(root, (LABELS,), f"RSNA Pneumonia label table (from {URL})")
    raw = _labels(path)
    per_image = raw.groupby(PATIENT_ID, sort=True)[TARGET].agg(["min", "max"])
    mixed = per_image["min"] != per_image["max"]
    if mixed.any():
        raise DataError(f"{path}: patientId(s) with both Target 0 and 1 rows: {list(per_image.index[mixed][:5])}. "
                        "Use the file as published.")
    ids = per_image.index.to_series(index=per_image.index)
    findings = pd.DataFrame({LUNG_OPACITY: per_image["max"].astype(float)}, index=per_image.index)
    info = common.find_file(root, (CLASS_INFO,), "", required=False)
    if info is not None:
        classes = _class_info(info)
        missing = ~findings.index.isin(classes.index)
        if missing.any():
            raise DataError(f"{info}: no class for {int(missing.sum())} patientId(s) of {path.name}, e.g. "
                            f"{list(findings.index[missing][:5])}.")
        cls = classes.reindex(findings.index)
        disagree = (cls == LUNG_OPACITY) != (findings[LUNG_OPACITY] == 1.0)
        if disagree.any():
            raise DataError(f"{info}: class and {path.name}'s Target disagree for {list(findings.index[disagree][:5])} "
                            "(Lung Opacity is Target 1). Use the files as published.")
        findings[NORMAL] = (cls == NORMAL).astype(float)
    image_paths = str(root) + "/" + IMAGES + "/" + ids + ".dcm"
    if headers:
        demo = common.dicom_demographics(image_paths, NAME)
    else:
        demo = pd.DataFrame(index=ids.index, columns=["age", "sex", "view"])
    view = demo["view"]
    table = common.standard_table(
        pd.DataFrame(index=ids.index),
        image=ids,
        patient=ids,
        visit=pd.Series(0, index=ids.index),
        age=pd.to_numeric(demo["age"], errors="coerce"),
        sex=demo["sex"].astype(object),
        view=view.astype(object),
        path=image_paths,
        frontal=view.isna() | view.isin(common.FRONTAL_VIEWS),  # RSNA's images are PA or AP
        findings=findings,
        official_split=None,
        source=path.name,
    )
    return common.SourceData(table, path, list(findings.columns))


def read_boxes(root: Path) -> pd.DataFrame:
    """The boxes of ``stage_2_train_labels.csv`` (its Target 1 rows): ``Image Index``, ``Finding
    Label`` (Pneumonia), ``x``, ``y``, ``w``, ``h`` in DICOM pixels, ``Reader`` (NaN: RSNA
    publishes one adjudicated set of boxes) and ``finding``."""
    root = common.existing_dir(root, "RSNA Pneumonia Detection Challenge")
    raw = _labels(common.find_file(root, (LABELS,), f"RSNA Pneumonia label table (from {URL})"))
    boxed = raw[raw[TARGET] == 1]
    return pd.DataFrame({
        "Image Index": boxed[PATIENT_ID].to_numpy(),
        "Finding Label": HARMONISATION[LUNG_OPACITY][0],
        "x": boxed["x"].to_numpy(), "y": boxed["y"].to_numpy(),
        "w": boxed["width"].to_numpy(), "h": boxed["height"].to_numpy(),
        "Reader": np.nan,
        "finding": LUNG_OPACITY,
        "pixel_space": DICOM_PIXELS,
    }).reset_index(drop=True)


def read_mapping(path: Path) -> pd.Series:
    """RSNA's mapping file: NIH ``Image Index`` per RSNA patientId (index). Hostile data: parsed as
    JSON (never evaluated), each entry must be an object with string ids."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; download {MAPPING} from {MAPPING_URL}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not RSNA's JSON mapping file ({exc}); download it again from {MAPPING_URL}."
        ) from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{subset_img_id, img_id, ...}} objects as RSNA publishes it.")
    rsna, nih = [], []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("subset_img_id"), str)
                and isinstance(entry.get("img_id"), str)):
            raise DataError(f"{path}: entry {i} is not an object with string subset_img_id and img_id; "
                            "use the file as published.")
        rsna.append(entry["subset_img_id"].strip())
        name = entry["img_id"].strip()
        nih.append(name if name.lower().endswith(".png") else name + ".png")
    out = pd.Series(nih, index=pd.Index(rsna, name=PATIENT_ID), name="Image Index")
    duplicated = out.index.duplicated(keep=False)
    if duplicated.any():
        raise DataError(f"{path}: patientId(s) mapped twice: {sorted(set(out.index[duplicated]))[:5]}.")
    return out


def _labels(path: Path) -> pd.DataFrame:
    raw = common.read_csv(path, (PATIENT_ID,) + BOX + (TARGET,), "RSNA Pneumonia label table")
    raw[PATIENT_ID] = raw[PATIENT_ID].str.strip()
    common.reject(raw, raw[PATIENT_ID].isna() | (raw[PATIENT_ID] == ""), path, "an empty patientId", TARGET,
                  "Every row names its image.")
    target = pd.to_numeric(raw[TARGET].str.strip(), errors="coerce")
    common.reject(raw, ~target.isin((0.0, 1.0)), path, "a Target that is not 0 or 1", PATIENT_ID,
                  "Use the file as published.")
    raw[TARGET] = target.astype(int)
    coords = raw[list(BOX)].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    boxed = raw[TARGET] == 1
    bad = boxed & (coords.isna().any(axis=1) | (coords[["width", "height"]] <= 0).any(axis=1)
                   | (coords[["x", "y"]] < 0).any(axis=1) | ~np.isfinite(coords.fillna(0)).all(axis=1))
    common.reject(raw, bad, path, "a Target 1 row whose box is not four numbers with width, height > 0", PATIENT_ID,
                  "Use the file as published.")
    common.reject(raw, ~boxed & coords.notna().any(axis=1), path, "a Target 0 row with a box", PATIENT_ID,
                  "Use the file as published.")
    raw[list(BOX)] = coords
    return raw


def _class_info(path: Path) -> pd.Series:
    raw = common.read_csv(path, (PATIENT_ID, CLASS), "RSNA detailed class info")
    raw[PATIENT_ID], raw[CLASS] = raw[PATIENT_ID].str.strip(), raw[CLASS].str.strip()
    common.reject(raw, ~raw[CLASS].isin(CLASSES), path, f"a class not among {list(CLASSES)}", PATIENT_ID,
                  "Use the file as published.")
    # One row per box, as in the labels file: the rows of one image repeat its class.
    per_image = raw.drop_duplicates([PATIENT_ID, CLASS])
    twice = per_image[PATIENT_ID].duplicated(keep=False)
    common.reject(per_image, twice, path, "a patientId with two different classes", PATIENT_ID,
                  "Use the file as published.")
    return per_image.set_index(PATIENT_ID)[CLASS]
