"""The registry of data sources: each name (``data.source``) -> how its files are read into the
standard table (:mod:`.common`), how its images are found, and how its rows are split.

``nih`` and ``demo`` are NIH's own layout (:mod:`cxr_lightning.data.nih`); the others are the
external datasets, each read exactly as its publisher ships it by its own module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning import labels
from cxr_lightning.data import cohort, nih
from cxr_lightning.data.sources import chexpert, common, mimic_cxr, nih_google, padchest
from cxr_lightning.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """How one dataset is read (``read(root, label_table)``), its images found
    (``attach_paths(table, root, on_missing)``) and its rows split
    (``split(table, root, val_fraction, test_fraction, seed)``)."""

    name: str
    read: Callable[[Path, str], common.SourceData]
    attach_paths: Callable[[pd.DataFrame, Path, str], pd.DataFrame]
    split: Callable[[pd.DataFrame, Path, float, float, int], pd.Series]


def read_nih(root: Path, label_table: str = "auto") -> common.SourceData:
    """NIH's label table (any of its formats) in the standard table: every NIH label, all frontal."""
    path = nih.find_label_table(root) if label_table == "auto" else Path(root) / label_table
    table = nih.read_label_table(path)
    names = labels.label_names()
    encoded = labels.encode_labels(table[nih.FINDING_LABELS], names, source=path.name)
    table[[common.FINDING_PREFIX + n for n in names]] = encoded.astype(float)
    table[common.FRONTAL] = True  # NIH released frontal views only
    table[common.OFFICIAL_SPLIT] = np.nan
    return common.SourceData(table, path, names)


def _nih_split(table: pd.DataFrame, root: Path, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    return cohort.split_by_patient(table, nih.read_split_lists(root), val_fraction, test_fraction, seed)


def _official_split(table: pd.DataFrame, root: Path, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    return cohort.complete_split(table, table[common.OFFICIAL_SPLIT], val_fraction, test_fraction, seed)


def _checked_paths(hint: str) -> Callable[[pd.DataFrame, Path, str], pd.DataFrame]:
    return lambda table, root, on_missing: common.check_paths(table, root, on_missing, hint)


SOURCES: dict[str, Source] = {
    "nih": Source("nih", read_nih, nih.attach_paths, _nih_split),
    "demo": Source("demo", read_nih, nih.attach_paths, _nih_split),
    "chexpert": Source("chexpert", chexpert.read, _checked_paths(
        "Unpack CheXpert so that data.root holds train.csv, valid.csv and the train/ and valid/ folders."),
        _official_split),
    "mimic_cxr": Source("mimic_cxr", mimic_cxr.read, _checked_paths(
        "Download MIMIC-CXR-JPG's files/ folder into data.root (files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg)."),
        _official_split),
    "padchest": Source("padchest", padchest.read, _checked_paths(
        "Unzip PadChest's numbered image folders into data.root (data.root/<ImageDir>/<ImageID>)."),
        _official_split),
    "nih_google": Source("nih_google", nih_google.read, nih.attach_paths, _official_split),
}


def get(name: str) -> Source:
    """The registered source ``name``; ConfigError listing the known ones otherwise."""
    if name not in SOURCES:
        raise ConfigError(f"data.source={name!r}: expected one of {sorted(SOURCES)}.")
    return SOURCES[name]
