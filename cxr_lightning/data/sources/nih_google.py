"""NIH ChestX-ray14 images under Google's 2019 adjudicated expert labels (Majkowska et al.,
Radiology 2020): 4,376 images, four findings (Fracture, Pneumothorax, Airspace opacity, Nodule
or mass) coded ``YES``/``NO``.

``data.root`` is the NIH download (images below it, as for ``data=nih``) with either

- Google's published files ``four_findings_expert_labels_validation_labels.csv`` and
  ``four_findings_expert_labels_test_labels.csv`` (``Image Index``, ``Patient ID`` and the four
  findings; age, sex, view and visit order come from the NIH label table beside them), or
- torchxrayvision's copy ``google2019_nih-chest-xray-labels.csv.gz``, an NIH label table with the
  four findings and ``Set Id`` (``val``/``test``) appended.

The official split is Google's: validation and test; there is no training split.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr_lightning.data import nih
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register
from cxr_lightning.errors import DataError

NAME = "nih_google"
VALIDATION = "four_findings_expert_labels_validation_labels.csv"
TEST = "four_findings_expert_labels_test_labels.csv"
TORCHXRAYVISION_COPY = "google2019_nih-chest-xray-labels.csv"
SET_ID = "Set Id"
URL = "https://cloud.google.com/healthcare/docs/resources/public-datasets/nih-chest"
GOOGLE_COLUMNS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
HARMONISATION: dict[str, tuple[str, ...]] = {
    "Fracture": ("Fracture",),
    "Pneumothorax": ("Pneumothorax",),
    "Airspace opacity": (),  # any airspace opacity: broader than Consolidation, Infiltration or Pneumonia
    "Nodule or mass": (),  # the union of two NIH labels: a positive is not known to be either
}
_CODES = {"YES": 1.0, "NO": 0.0}
_SETS = {"val": "val", "validation": "val", "test": "test"}


@register
class NIHGoogle(Source):
    name = NAME
    title = "NIH ChestX-ray14 with Google's expert labels"
    harmonisation = HARMONISATION

    def read(self) -> common.SourceData:
        return read(self.root, self.label_table)

    def attach_paths(self, table: pd.DataFrame, on_missing: str) -> pd.DataFrame:
        return nih.attach_paths(table, self.root, on_missing)


def read(root: Path, label_table: str = "auto") -> common.SourceData:
    """Google's labels at ``root`` joined with NIH's demographics, in the standard table."""
    root = common.existing_dir(root, "NIH ChestX-ray14 (with Google's expert labels)")
    copy = common.find_file(root, (TORCHXRAYVISION_COPY,), "", required=False)
    if copy is not None and label_table == "auto":
        table = nih.read_label_table(copy)  # an NIH table with the four findings appended
        _require(table, GOOGLE_COLUMNS + (SET_ID,), copy)
        split = table[SET_ID].str.strip().str.lower().map(_SETS)
        labels_path, findings_source = copy, table
    else:
        parts = []
        for name, split_name in ((VALIDATION, "val"), (TEST, "test")):
            path = common.find_file(root, (name,), "", required=False)
            if path is not None:
                part = common.read_csv(path, (nih.IMAGE,) + GOOGLE_COLUMNS, "Google expert labels")
                parts.append(part.assign(**{SET_ID: split_name}))
        if not parts:
            common.find_file(
                root, (VALIDATION, TEST, TORCHXRAYVISION_COPY), f"Google expert labels (NIH-Google, from {URL})"
            )
        google = pd.concat(parts, ignore_index=True)
        google[nih.IMAGE] = google[nih.IMAGE].str.strip()
        common.unique_names(google, nih.IMAGE, root / f"{VALIDATION} + {TEST}")
        labels_path = root / (VALIDATION if (root / VALIDATION).is_file() else TEST)
        nih_table = nih.read_label_table(nih.find_label_table(root)).set_index(nih.IMAGE)
        unknown = ~google[nih.IMAGE].isin(nih_table.index)
        common.reject(
            google,
            unknown,
            labels_path,
            "an Image Index missing from the NIH label table",
            nih.IMAGE,
            "Put the NIH label table of the same release in the root.",
        )
        table = nih_table.loc[google[nih.IMAGE]].reset_index()
        split, findings_source = google[SET_ID], google.reset_index(drop=True)
    findings = _codes(findings_source, labels_path)
    unsplit = split.isna()
    common.reject(
        table, unsplit, labels_path, f"a {SET_ID} other than val or test", nih.IMAGE, "Use the file as published."
    )
    out = common.standard_table(
        table,
        image=table[nih.IMAGE],
        patient=table[nih.PATIENT],
        visit=table[nih.FOLLOW_UP],
        age=table[nih.AGE],
        sex=table[nih.SEX],
        view=table[nih.VIEW],
        path=None,
        frontal=table[nih.VIEW].isin(common.FRONTAL_VIEWS),
        findings=findings.set_axis(table.index),
        official_split=split.set_axis(table.index),
        source=labels_path.name,
    )
    return common.SourceData(out, labels_path, list(GOOGLE_COLUMNS))


def _require(table: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected Google's four findings and {SET_ID}.")


def _codes(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    out = {}
    for col in GOOGLE_COLUMNS:
        text = frame[col].astype("string").str.strip().str.upper()
        values = text.map(_CODES)
        common.reject(
            frame, values.isna(), path, f"a {col!r} other than YES or NO", nih.IMAGE, "Use the file as published."
        )
        out[col] = values.astype(float)
    return pd.DataFrame(out, index=frame.index)
