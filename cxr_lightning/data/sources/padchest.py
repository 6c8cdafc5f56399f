"""PadChest (BIMCV, Hospital San Juan de Alicante) as published.

``data.root`` holds ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or ``.csv.gz``) and
the 16-bit PNGs in numbered folders: ``<root>/<ImageDir>/<ImageID>``. ``Labels`` is a list of
lower-case finding strings written as a Python list literal (``['normal']``); it is parsed as a
literal (``ast.literal_eval`` evaluates literals only, never code) and must be a list of strings.
Ages are the study year minus the birth year. PadChest ships no split: patients are drawn
(seeded) into train, val and test.
"""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register

log = logging.getLogger(__name__)

NAME = "padchest"
LABEL_TABLE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
           "Projection", "Labels")
URL = "https://bimcv.cipf.es/bimcv-projects/padchest/"
# Projection -> view; "L" is lateral; COSTAL, EXCLUDE and UNK are neither PA nor AP.
_VIEWS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LATERAL"}
_SEXES = {"M": "M", "F": "F"}  # and "O", blank

# PadChest's findings are lower-case strings in a list; each names the concepts it counts for:
# the concept itself and PadChest's subtypes of it. "hydropneumothorax" is air and fluid in the
# pleural space: a pneumothorax and an effusion. A finding absent from the list is a negative.
HARMONISATION: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                     "round atelectasis", "total atelectasis", "atelectasis basal"), ("Atelectasis",)),
    "cardiomegaly": ("Cardiomegaly",),
    **dict.fromkeys(("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"), ("Effusion",)),
    "infiltrates": ("Infiltration",),
    **dict.fromkeys(("mass", "pulmonary mass"), ("Mass",)),  # not breast, mediastinal, pleural or soft-tissue masses
    **dict.fromkeys(("nodule", "multiple nodules"), ("Nodule",)),  # not pseudonodule, nor calcified granuloma
    **dict.fromkeys(("pneumonia", "atypical pneumonia"), ("Pneumonia",)),
    "pneumothorax": ("Pneumothorax",),
    "hydropneumothorax": ("Pneumothorax", "Effusion"),
    "consolidation": ("Consolidation",),
    "pulmonary edema": ("Edema",),
    "emphysema": ("Emphysema",),  # not subcutaneous emphysema
    "pulmonary fibrosis": ("Fibrosis",),
    **dict.fromkeys(("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
                    ("Pleural_Thickening",)),
    "hiatal hernia": ("Hernia",),
    "normal": ("No Finding",),
}


@register
class PadChest(Source):
    name = NAME
    title = "PadChest"
    harmonisation = HARMONISATION
    hint = "Unzip PadChest's numbered image folders into data.root (data.root/<ImageDir>/<ImageID>)."

    def read(self) -> common.SourceData:
        return read(self.root, self.label_table)


def read(root: Path, label_table: str = "auto") -> common.SourceData:
    """Read the PadChest labels CSV at ``root`` into the standard table."""
    root = common.existing_dir(root, "PadChest")
    path = common.find_file(
        root, (LABEL_TABLE if label_table == "auto" else label_table,), f"PadChest labels CSV (from {URL})"
    )
    raw = common.read_csv(path, COLUMNS, "PadChest labels CSV")
    raw["ImageID"] = raw["ImageID"].str.strip()
    common.reject(raw, raw["ImageID"].isna(), path, "an empty ImageID", "ImageID", "Every row names its image.")
    common.unique_names(raw, "ImageID", path)
    folder = pd.to_numeric(raw["ImageDir"].str.strip(), errors="coerce")
    common.reject(
        raw,
        folder.isna() | (folder % 1 != 0),
        path,
        "an ImageDir that is not a folder number",
        "ImageID",
        "Use the file as published.",
    )
    date = pd.to_datetime(raw["StudyDate_DICOM"].str.strip(), format="%Y%m%d", errors="coerce")
    common.reject(
        raw, date.isna(), path, "a StudyDate_DICOM that is not YYYYMMDD", "ImageID", "Use the file as published."
    )

    unlabelled = raw["Labels"].isna()
    left_out = {"no Labels": int(unlabelled.sum())}
    if unlabelled.any():
        log.info("%s: %d image(s) without Labels are left out", path.name, int(unlabelled.sum()))
    raw, date, folder = raw[~unlabelled], date[~unlabelled], folder[~unlabelled]
    findings = _findings(raw, path)

    birth = pd.to_numeric(raw["PatientBirth"].str.strip(), errors="coerce")
    projection = raw["Projection"].str.strip()
    view = projection.map(_VIEWS).fillna(projection)  # COSTAL, EXCLUDE, UNK: named in the left-out count
    table = common.standard_table(
        raw,
        image=raw["ImageID"],
        patient=raw["PatientID"].str.strip(),
        visit=common.visit_order(raw["PatientID"].str.strip(), date, raw["StudyID"].fillna("")),
        age=date.dt.year - birth,
        sex=common.sex_codes(raw["PatientSex_DICOM"], _SEXES),
        view=view.astype(object).where(view.notna(), None),
        path=str(root) + "/" + folder.astype("int64").astype(str) + "/" + raw["ImageID"],
        frontal=view.isin(common.FRONTAL_VIEWS),
        findings=findings,
        official_split=None,
        source=path.name,
    )
    return common.SourceData(table, path, list(HARMONISATION), left_out)


def parse_labels(text: str) -> list[str]:
    """``"['normal', 'nodule']"`` -> ``['normal', 'nodule']`` (stripped, blanks dropped); ValueError otherwise."""
    value = ast.literal_eval(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("not a list of strings")
    return [v.strip() for v in value if v.strip()]


def _findings(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    names = list(HARMONISATION)
    column = {finding: j for j, finding in enumerate(names)}
    codes, uniques = pd.factorize(raw["Labels"])  # a few thousand distinct lists for 160k rows
    rows = np.zeros((len(uniques), len(names)))
    bad = []
    for i, text in enumerate(uniques):
        try:
            found = parse_labels(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            bad.append(i)
            continue
        for finding in found:
            if finding in column:
                rows[i, column[finding]] = 1.0
    if bad:
        mask = pd.Series(np.isin(codes, bad), index=raw.index)
        common.reject(
            raw,
            mask,
            path,
            "a Labels value that is not a list of strings such as ['normal']",
            "ImageID",
            "Use the file as published.",
        )
    return pd.DataFrame(rows[codes], columns=names, index=raw.index)
