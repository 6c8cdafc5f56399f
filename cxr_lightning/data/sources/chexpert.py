"""CheXpert v1.0 and v1.0-small (Stanford ML Group) as published.

``data.root`` is the dataset folder (``CheXpert-v1.0-small/``) holding ``train.csv``,
``valid.csv`` and the ``train/`` and ``valid/`` image folders; where present, ``test_labels.csv``
(the radiologist-consensus test labels, ``Path`` plus the observations) adds a ``test/`` split.
``Path`` is relative to the folder above the root (``CheXpert-v1.0-small/valid/patient64541/
study1/view1_frontal.jpg``); paths with or without that first folder are accepted.

The official split: ``valid.csv`` is the validation split, ``test_labels.csv`` the test split;
without test labels the test patients are drawn (seeded) from ``train.csv``'s.
CheXpert gives no study dates, so the study number (``study1``, ``study2``...) orders the visits.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr_lightning.data.label_spaces import CHEXPERT_OBSERVATIONS
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register
from cxr_lightning.errors import ConfigError

NAME = "chexpert"
TRAIN, VALID, TEST = "train.csv", "valid.csv", "test_labels.csv"
PATH, SEX, AGE, FRONTAL_LATERAL, AP_PA = "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"
HEADER = (PATH, SEX, AGE, FRONTAL_LATERAL, AP_PA) + CHEXPERT_OBSERVATIONS
# Each observation is its own concept; "Pleural Effusion" is what NIH calls "Effusion".
HARMONISATION = {o: ("Effusion",) if o == "Pleural Effusion" else (o,) for o in CHEXPERT_OBSERVATIONS}
SPLIT_FOLDERS = ("train", "valid", "test")
URL = "https://stanfordmlgroup.github.io/competitions/chexpert/"
_PATH_PATTERN = r"(?:^|/)patient(\d+)/study(\d+)/"
_SEXES = {"Male": "M", "Female": "F"}  # and "Unknown"


@register
class CheXpert(Source):
    name = NAME
    title = "CheXpert"
    harmonisation = HARMONISATION
    hint = "Unpack CheXpert so that data.root holds train.csv, valid.csv and the train/ and valid/ folders."

    def read(self) -> common.SourceData:
        return read(self.root, self.label_table)


def read(root: Path, label_table: str = "auto") -> common.SourceData:
    """Read ``train.csv``, ``valid.csv`` (each possibly ``.gz``) and, if present, ``test_labels.csv`` at ``root``."""
    if label_table != "auto":
        raise ConfigError(f"data.label_table={label_table!r}: CheXpert always reads {TRAIN}, {VALID} and {TEST}; "
                          "leave it at auto.")
    root = common.existing_dir(root, "CheXpert")
    files = {
        split: common.find_file(root, (name,), "", required=False) for split, name in (("val", VALID), (None, TRAIN))
    }
    if not any(files.values()):
        common.find_file(root, (TRAIN, VALID), "CheXpert label table (train.csv, valid.csv)")
    test = common.find_file(root, (TEST,), "CheXpert test labels", required=False)
    parts = [_read_one(path, split, root) for split, path in files.items() if path is not None]
    if test is not None:
        parts.append(_read_one(test, "test", root))
    table = pd.concat(parts, ignore_index=True)
    common.unique_names(table, "Image Index", root / "train.csv + valid.csv")
    table.attrs["source"] = " + ".join(p.attrs["source"] for p in parts)
    return common.SourceData(table, files[None] or files["val"], list(HARMONISATION))


def _read_one(path: Path, split: str | None, root: Path) -> pd.DataFrame:
    # The test labels carry no demographics or view columns; they are then missing (views from the file name).
    required = (PATH,) + CHEXPERT_OBSERVATIONS if split == "test" else HEADER
    raw = common.read_csv(path, required, "CheXpert label table")
    raw[PATH] = raw[PATH].str.strip()
    common.reject(raw, raw[PATH].isna() | (raw[PATH] == ""), path, "an empty Path", PATH, "Every row names its image.")
    relative = raw[PATH].map(_without_prefix)
    ids = relative.str.extract(_PATH_PATTERN)
    common.reject(
        raw,
        ids[0].isna(),
        path,
        "a Path not of the form [CheXpert-v1.0*/]<split>/patientNNNNN/studyN/viewN_<view>.jpg",
        PATH,
        f"Use the file as published at {URL}.",
    )
    patient, study = ids[0].astype("int64"), ids[1].astype("int64")
    for col in (SEX, AGE, FRONTAL_LATERAL, AP_PA):
        if col not in raw.columns:
            raw[col] = pd.NA
    age = (
        pd.to_numeric(raw[AGE].str.strip(), errors="coerce")
        if raw[AGE].notna().any()
        else pd.Series(float("nan"), index=raw.index)
    )
    bad_age = age.isna() & raw[AGE].notna() & (raw[AGE].astype(str).str.strip() != "")
    common.reject(
        raw, bad_age, path, "an Age that is not a number", PATH, "Fix those cells or leave them blank (missing)."
    )
    lateral = _lateral(raw)
    view = raw[AP_PA].astype("string").str.strip().str.upper().where(~lateral, "LATERAL")
    view = view.where(~view.isin(["LL", "RL"]), "LATERAL")  # a few "Frontal" rows are lateral decubitus views
    findings = common.label_codes(raw, CHEXPERT_OBSERVATIONS, path, PATH)
    table = common.standard_table(
        raw,
        image=relative,
        patient=patient,
        visit=common.visit_order(patient, study),
        age=age,
        sex=common.sex_codes(raw[SEX].astype("string"), _SEXES),
        view=view.astype(object).where(view.notna(), None),
        path=relative.map(lambda p: str(root / p)),
        frontal=~lateral & ~view.isin(["LATERAL"]).fillna(False),
        findings=findings,
        official_split=pd.Series(split, index=raw.index, dtype=object),
        source=path.name,
    )
    return table


def _without_prefix(path: str) -> str:
    """``CheXpert-v1.0-small/valid/...`` -> ``valid/...``; a path without the prefix is kept."""
    first, _, rest = path.partition("/")
    return rest if first not in SPLIT_FOLDERS and rest else path


def _lateral(raw: pd.DataFrame) -> pd.Series:
    given = raw[FRONTAL_LATERAL].astype("string").str.strip()
    from_name = raw[PATH].str.contains(r"_lateral\.", regex=True)
    return given.eq("Lateral").fillna(False) | (given.isna() & from_name)
