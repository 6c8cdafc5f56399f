"""MIMIC-CXR-JPG 2.x (PhysioNet) as published.

``data.root`` holds ``mimic-cxr-2.0.0-metadata.csv.gz``, the labels
``mimic-cxr-2.0.0-chexpert.csv.gz`` (or ``-negbio``; ``data.label_table`` picks one),
``mimic-cxr-2.0.0-split.csv.gz`` and ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` (plain
``.csv`` files work too). Age and sex come from MIMIC-IV's ``patients.csv.gz`` (``anchor_age`` in
``anchor_year``, ``gender``) when it is in the root; without it both are flagged missing.

Labels are per study, so every image of a study shares them; a patient's studies are ordered by
``StudyDate`` then ``StudyTime`` (study ids are not chronological). The official split is
``split.csv``'s ``train``/``validate``/``test``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data.label_spaces import CHEXPERT_OBSERVATIONS
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register
from cxr_lightning.data.sources.chexpert import HARMONISATION as CHEXPERT_HARMONISATION
from cxr_lightning.errors import DataError

log = logging.getLogger(__name__)

NAME = "mimic_cxr"
PREFIX = "mimic-cxr-2.0.0-"
METADATA, CHEXPERT, NEGBIO, SPLIT = (PREFIX + s for s in ("metadata.csv", "chexpert.csv", "negbio.csv", "split.csv"))
PATIENTS = "patients.csv"
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
LABEL_COLUMNS = ("subject_id", "study_id") + CHEXPERT_OBSERVATIONS
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
PATIENT_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year")
URL = "https://physionet.org/content/mimic-cxr-jpg/"
_SPLITS = {"train": "train", "validate": "val", "test": "test"}
_SEXES = {"M": "M", "F": "F"}


@register
class MimicCXR(Source):
    name = NAME
    title = "MIMIC-CXR-JPG"
    harmonisation = CHEXPERT_HARMONISATION  # the same labeller as CheXpert's
    hint = "Download MIMIC-CXR-JPG's files/ folder into data.root (files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg)."

    def read(self) -> common.SourceData:
        return read(self.root, self.label_table)


def read(root: Path, label_table: str = "auto") -> common.SourceData:
    """Join metadata, labels, split and (optional) patients at ``root`` into the standard table."""
    root = common.existing_dir(root, "MIMIC-CXR-JPG")
    labels_name = CHEXPERT if label_table == "auto" else label_table
    meta_path = common.find_file(root, (METADATA,), f"MIMIC-CXR-JPG metadata (from {URL})")
    labels_path = common.find_file(root, (labels_name,), f"MIMIC-CXR-JPG labels ({CHEXPERT} or {NEGBIO})")
    split_path = common.find_file(root, (SPLIT,), "MIMIC-CXR-JPG split")
    patients_path = common.find_file(root, (PATIENTS,), "MIMIC-IV patients table", required=False)

    meta = common.read_csv(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"),
                           "MIMIC-CXR-JPG metadata")
    meta["dicom_id"] = meta["dicom_id"].str.strip()
    common.unique_names(meta, "dicom_id", meta_path)
    for col in ("subject_id", "study_id"):
        meta[col] = _integers(meta, col, meta_path)
    date = pd.to_datetime(meta["StudyDate"].str.strip(), format="%Y%m%d", errors="coerce")
    common.reject(
        meta, date.isna(), meta_path, "a StudyDate that is not YYYYMMDD", "dicom_id", "Use the file as published."
    )
    time = pd.to_numeric(meta["StudyTime"].str.strip(), errors="coerce").fillna(0.0)

    raw_labels = common.read_csv(labels_path, LABEL_COLUMNS, "MIMIC-CXR-JPG labels")
    for col in ("subject_id", "study_id"):
        raw_labels[col] = _integers(raw_labels, col, labels_path)
    raw_labels["name"] = "s" + raw_labels["study_id"].astype(str)
    common.unique_names(raw_labels, "study_id", labels_path)
    codes = common.label_codes(raw_labels, CHEXPERT_OBSERVATIONS, labels_path, "name")
    findings = codes.set_axis(raw_labels["study_id"].to_numpy())

    split = common.read_csv(split_path, SPLIT_COLUMNS, "MIMIC-CXR-JPG split")
    split_of = split.assign(dicom_id=split["dicom_id"].str.strip()).set_index("dicom_id")["split"].str.strip()
    unknown = ~split_of.isin(_SPLITS)
    if unknown.any():
        raise DataError(f"{split_path}: split values {sorted(split_of[unknown].unique())[:5]} not in {list(_SPLITS)}.")

    # Studies out of date order are common (study ids are random): order by date and time.
    # A study's images are one visit, timed by its first image (YYYYMMDDHHMMSS.fff as a number).
    stamp = date.dt.strftime("%Y%m%d").astype("int64").astype(float) * 1e6 + time
    study_stamp = stamp.groupby(meta["study_id"]).transform("min")
    visit = common.visit_order(meta["subject_id"], study_stamp, meta["study_id"])
    age, sex = _demographics(meta, date, patients_path)

    labelled = meta["study_id"].isin(findings.index)
    left_out = {"no labels for the study": int((~labelled).sum())}
    if left_out["no labels for the study"]:
        log.info(
            "%s: %d image(s) of studies without a row in %s are left out",
            meta_path.name,
            left_out["no labels for the study"],
            labels_path.name,
        )
    meta, date, visit, age, sex = (x[labelled] for x in (meta, date, visit, age, sex))
    view = meta["ViewPosition"].astype("string").str.strip().str.upper()
    subject = meta["subject_id"].astype(str)
    table = common.standard_table(
        meta,
        image=meta["dicom_id"],
        patient=meta["subject_id"],
        visit=visit,
        age=age,
        sex=sex,
        view=view.astype(object).where(view.notna(), None),
        path=str(root / "files")
        + "/p"
        + subject.str[:2]
        + "/p"
        + subject
        + "/s"
        + meta["study_id"].astype(str)
        + "/"
        + meta["dicom_id"]
        + ".jpg",
        frontal=view.isin(common.FRONTAL_VIEWS).fillna(False),
        findings=findings.loc[meta["study_id"].to_numpy()].set_axis(meta.index),
        official_split=meta["dicom_id"].map(split_of).map(_SPLITS),
        source=meta_path.name,
    )
    unsplit = table[common.OFFICIAL_SPLIT].isna()
    if unsplit.any():
        raise DataError(
            f"{split_path}: {int(unsplit.sum())} image(s) of {meta_path.name} have no split, e.g. "
            f"{table.loc[unsplit, 'Image Index'].head(5).tolist()}; use the two files of one release."
        )
    return common.SourceData(table, labels_path, list(CHEXPERT_OBSERVATIONS), left_out)


def _integers(frame: pd.DataFrame, col: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[col].str.strip(), errors="coerce")
    common.reject(
        frame,
        values.isna() | (values % 1 != 0),
        path,
        f"a {col} that is not an integer",
        frame.columns[0],
        "Use the file as published.",
    )
    return values.astype("int64")


def _demographics(meta: pd.DataFrame, date: pd.Series, patients_path: Path | None) -> tuple[pd.Series, pd.Series]:
    """Age at the study (``anchor_age + study year - anchor_year``) and sex; NaN without patients.csv."""
    if patients_path is None:
        log.warning(
            "No %s(.gz) in the MIMIC-CXR-JPG root: ages and sexes are flagged missing "
            "(put MIMIC-IV's hosp/patients.csv.gz there to use them).",
            PATIENTS,
        )
        nan = pd.Series(np.nan, index=meta.index)
        return nan.astype(float), nan.astype(object)
    patients = common.read_csv(patients_path, PATIENT_COLUMNS, "MIMIC-IV patients table")
    patients["subject_id"] = _integers(patients, "subject_id", patients_path)
    common.unique_names(patients, "subject_id", patients_path)
    by_subject = patients.set_index("subject_id")
    anchor_age = pd.to_numeric(meta["subject_id"].map(by_subject["anchor_age"]), errors="coerce")
    anchor_year = pd.to_numeric(meta["subject_id"].map(by_subject["anchor_year"]), errors="coerce")
    age = anchor_age + (date.dt.year - anchor_year)
    sex = common.sex_codes(meta["subject_id"].map(by_subject["gender"]).astype("string"), _SEXES)
    return age.astype(float), sex
