"""From a dataset's files to the split tables a run trains and is scored on, as one pure function.

:func:`build_tables` reads the label table, encodes the findings once (for the labels and for
the previous visit's labels alike), assigns every patient to a split, encodes the demographics
with the training split's age median and computes the training label statistics. The data
module calls it in ``setup()``; the model learns its label names and metadata layout from
:func:`output_labels` and :func:`meta_names`, which depend on the config alone, so a model can be
built before any data is read and checked against the tables later.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning import labels
from cxr_lightning.data import cohort, nih
from cxr_lightning.data.dataset import find_unreadable
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import file_digest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ON_MISSING = ("error", "skip")
LABEL_PREFIX, META_PREFIX = "label:", "meta:"


def output_labels(drop_no_finding: bool) -> list[str]:
    """The model's output labels, in order."""
    return labels.label_names(drop_no_finding)


def meta_names(label_names: Sequence[str], prior_labels: bool) -> list[str]:
    """The metadata vector's layout (names without the ``meta:`` prefix), in the order the model
    receives it: the demographics, then with ``prior_labels`` the previous visit's labels and
    ``has_prior``."""
    columns = list(cohort.DEMOGRAPHIC_COLUMNS)
    if prior_labels:
        columns += [cohort.PRIOR_PREFIX + n for n in label_names] + [cohort.HAS_PRIOR]
    return [c.removeprefix(META_PREFIX) for c in columns]


@dataclass
class SplitTables:
    """What :func:`build_tables` derives from a dataset's files.

    ``tables[split]`` holds the label-table columns, ``path``, ``split``, one ``label:<name>``
    column per output label and the ``meta:<name>`` columns, in model order.
    """

    tables: dict[str, pd.DataFrame]
    label_names: list[str]
    meta_names: list[str]
    age_fill: float
    label_stats: pd.DataFrame
    bbox_table: pd.DataFrame | None
    label_table: Path
    label_table_digest: str

    @property
    def label_cols(self) -> list[str]:
        return [LABEL_PREFIX + n for n in self.label_names]

    @property
    def meta_cols(self) -> list[str]:
        return [META_PREFIX + n for n in self.meta_names]

    def images(self) -> pd.DataFrame:
        """``Image Index`` and ``path`` of every image of every split, in a stable order."""
        return pd.concat([self.tables[s][[nih.IMAGE, "path"]] for s in SPLITS], ignore_index=True)


def build_tables(
    root: str | os.PathLike,
    label_table: str = "auto",
    drop_no_finding: bool = False,
    prior_labels: bool = True,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    fold: int | None = None,
    folds: int | None = None,
    on_missing: str = "error",
    verify_images: bool = False,
    workers: int = 1,
) -> SplitTables:
    """Read the dataset at ``root`` (NIH layout) and build its split tables; see :class:`SplitTables`."""
    if on_missing not in ON_MISSING:
        raise ConfigError(f"data.on_missing={on_missing!r}: expected one of {list(ON_MISSING)}.")
    root = Path(root)
    table_path = nih.find_label_table(root) if label_table == "auto" else root / label_table
    full = nih.read_label_table(table_path)
    log.info("Label table: %s (%d rows)", table_path, len(full))
    names = output_labels(drop_no_finding)

    # Once, on the full table: a previous visit counts even when its image is not in the run.
    encoded = labels.encode_labels(full[nih.FINDING_LABELS], names, source=table_path.name)
    label_cols = [LABEL_PREFIX + n for n in names]
    full[label_cols] = encoded
    if prior_labels:
        full = cohort.add_prior_visits(full, names, encoded=encoded)
    table = nih.attach_paths(full, root, on_missing=on_missing)
    if verify_images:
        table = _drop_unreadable(table, on_missing, workers)

    table["split"] = cohort.split_by_patient(table, nih.read_split_lists(root), val_fraction, test_fraction, split_seed)
    if folds is not None:
        table["split"] = _fold_split(table, fold, folds, split_seed)
    cohort.check_patient_disjoint(table, "split")

    _, age_fill = cohort.encode_demographics(table[table["split"] == "train"])
    demographics, _ = cohort.encode_demographics(table, age_fill=age_fill)
    table[demographics.columns] = demographics

    tables = {s: table[table["split"] == s].reset_index(drop=True) for s in SPLITS}
    for split, part in tables.items():
        if part.empty:
            raise DataError(f"The {split} split of {root} is empty; check the split lists and fractions.")
    bbox_path = root / nih.BBOX_TABLE
    log.info(
        "Splits: %s images; %s patients",
        {s: len(t) for s, t in tables.items()},
        {s: t[nih.PATIENT].nunique() for s, t in tables.items()},
    )
    return SplitTables(
        tables=tables,
        label_names=names,
        meta_names=meta_names(names, prior_labels),
        age_fill=age_fill,
        label_stats=cohort.label_statistics(tables["train"][label_cols].to_numpy(), names),
        bbox_table=nih.read_bbox_table(bbox_path) if bbox_path.exists() else None,
        label_table=table_path,
        label_table_digest=file_digest(table_path),
    )


def _fold_split(table: pd.DataFrame, fold: int | None, folds: int, seed: int) -> pd.Series:
    trainval = table["split"] != "test"
    fold_ids = cohort.patient_folds(table[trainval], folds, seed)
    split = table["split"].copy()
    split[trainval] = np.where(fold_ids == fold, "val", "train")
    return split


def _drop_unreadable(table: pd.DataFrame, on_missing: str, workers: int) -> pd.DataFrame:
    bad = find_unreadable(table["path"].tolist(), workers=max(1, workers))
    if not bad:
        return table
    if on_missing == "error":
        raise DataError(
            f"{len(bad)} image(s) cannot be read, e.g. {bad[:5]}. Replace them, or pass "
            f"data.on_missing=skip to leave them out of the run."
        )
    log.warning("Leaving out %d unreadable image(s) (data.on_missing=skip), e.g. %s", len(bad), bad[:5])
    return table[~table["path"].isin(set(bad))]
