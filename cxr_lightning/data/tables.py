"""From a dataset's files to the split tables a run trains and is scored on, as one pure function.

:func:`build_tables` reads the source's files into the standard table (:mod:`.sources`), encodes
the findings once under the uncertainty policy (for the labels and for the previous visit's
labels alike), leaves out and counts the non-frontal views, assigns every patient to a split,
encodes the demographics with the training split's age median (or a checkpoint's) and computes
the training label statistics. The data module calls it in ``setup()``; the model learns its
label names and metadata layout from :func:`output_labels` and :func:`meta_names`, which depend
on the config alone, so a model can be built before any data is read and checked against the
tables later.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning import labels
from cxr_lightning.data import boxes as box_lists
from cxr_lightning.data import cohort, harmonise, nih, sources
from cxr_lightning.data.sources.common import FINDING_PREFIX, FRONTAL, UNCERTAIN
from cxr_lightning.data.dataset import find_unreadable
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import file_digest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ON_MISSING = ("error", "skip")
# data.uncertain: what a labeller's "uncertain" (-1) becomes. ignore: the image does not count
# for that label (NaN in its label column); ones / zeros: a positive / a negative.
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
LABEL_PREFIX, META_PREFIX = "label:", "meta:"


def output_labels(drop_no_finding: bool, source: str = "nih", label_names: Sequence[str] | None = None) -> list[str]:
    """The model's output labels, in order: ``label_names`` when given (an NIH checkpoint's,
    scored on another source), else the NIH labels ``source`` gives."""
    if label_names is not None:
        unknown = [n for n in label_names if n not in labels.ALL_LABELS]
        if unknown:
            raise ConfigError(f"data.labels: unknown label(s) {unknown}; known are {list(labels.ALL_LABELS)}.")
        return list(label_names)
    sources.get(source)
    names = harmonise.available_labels(source)
    return [n for n in names if not (drop_no_finding and n == labels.NO_FINDING)]


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

    ``tables[split]`` holds the standard-table columns (:mod:`.sources.common`), ``path``,
    ``split``, one ``label:<name>`` column per output label (0/1; NaN where the image does not
    count for the label: uncertain under ``data.uncertain=ignore``, or a label the source lacks)
    and the ``meta:<name>`` columns, in model order. ``left_out`` counts the rows of the source's
    files that no split holds, by reason (``view LATERAL``...).
    """

    tables: dict[str, pd.DataFrame]
    label_names: list[str]
    meta_names: list[str]
    age_fill: float
    label_stats: pd.DataFrame
    bbox_table: pd.DataFrame | None
    label_table: Path
    label_table_digest: str
    source: str = "nih"
    unavailable_labels: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    # NIH's boxed-image protocol (data.boxes.folds), as applied: boxes.BoxFolds.record().
    box_protocol: dict | None = None

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
    source: str = "nih",
    label_table: str = "auto",
    label_names: Sequence[str] | None = None,
    drop_no_finding: bool = False,
    prior_labels: bool = True,
    uncertain: str = "ignore",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    fold: int | None = None,
    folds: int | None = None,
    on_missing: str = "error",
    verify_images: bool = False,
    workers: int = 1,
    age_fill: float | None = None,
    max_pixels: int | None = None,
    box_folds: dict | None = None,
) -> SplitTables:
    """Read the dataset ``source`` at ``root`` and build its split tables; see :class:`SplitTables`.

    ``label_names`` and ``age_fill`` fix the labels and the age imputation to a checkpoint's (an
    NIH model scored on another source); the training split may then be empty.
    """
    if on_missing not in ON_MISSING:
        raise ConfigError(f"data.on_missing={on_missing!r}: expected one of {list(ON_MISSING)}.")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"data.uncertain={uncertain!r}: expected one of {list(UNCERTAIN_POLICIES)}.")
    root = Path(root)
    reader = sources.get(source)
    data = reader.read(root, label_table)
    full = data.table
    log.info("Label table: %s (%d rows, source %s)", data.label_table, len(full), source)
    names = output_labels(drop_no_finding, source, label_names)
    unavailable = [n for n in names if n not in data.available]
    if unavailable:
        log.info("%s gives no label for %s: reported as unavailable", source, ", ".join(unavailable))

    # Once, on the full table: a previous visit counts even when its image is not in the run.
    encoded = encode_findings(full, names, uncertain)
    label_cols = [LABEL_PREFIX + n for n in names]
    full[label_cols] = encoded
    if prior_labels:
        full = cohort.add_prior_visits(full, names, encoded=encoded, images_per_visit=source not in harmonise.NATIVE_SOURCES)
    left_out = dict(data.left_out)
    lateral = ~full[FRONTAL].astype(bool)
    if lateral.any():
        views = full.loc[lateral, nih.VIEW].fillna("unknown").astype(str).value_counts()
        left_out.update({f"view {v}": int(n) for v, n in views.items()})
        log.info("Frontal views only: left out %d image(s) of %s (%s)", int(lateral.sum()), source,
                 ", ".join(f"{v}: {n}" for v, n in views.items()))
    frontal = full.loc[~lateral]
    frontal.attrs.update(full.attrs)
    table = reader.attach_paths(frontal, root, on_missing)
    if verify_images:
        table = _drop_unreadable(table, on_missing, workers, max_pixels)

    table["split"] = reader.split(table, root, val_fraction, test_fraction, split_seed)
    native = source in harmonise.NATIVE_SOURCES
    bbox_path = root / nih.BBOX_TABLE
    bbox_table = nih.read_bbox_table(bbox_path) if native and bbox_path.exists() else None
    box_protocol = None
    if folds is not None:
        table["split"] = _fold_split(table, fold, folds, split_seed)
    if box_folds is not None:
        if not native:
            raise ConfigError(f"data.boxes.folds is NIH's boxed-image protocol; data={source} has no NIH box list.")
        # After the train_val folds: the boxed patients it moves train in every one of them.
        table["split"], moved = box_lists.box_fold_split(
            table, table["split"], bbox_table, seed=split_seed, **box_folds
        )
        box_protocol = moved.record()
        log.info("NIH boxed-image protocol: %s", box_protocol["test"])
    cohort.check_patient_disjoint(table, "split")

    train = table[table["split"] == "train"]
    if age_fill is None and not native and train[nih.AGE].isna().all():
        # A source without ages (MIMIC without MIMIC-IV's patients table): every age is flagged
        # missing, so the fill is a constant the model cannot tell from any other.
        log.warning("%s gives no ages in its training split: all flagged missing (meta:age_missing=1)", source)
        age_fill = 0.0
    if age_fill is None:
        _, age_fill = cohort.encode_demographics(train, missing_as_unknown=not native)
    demographics, _ = cohort.encode_demographics(table, age_fill=age_fill, missing_as_unknown=not native)
    table[demographics.columns] = demographics

    tables = {s: table[table["split"] == s].reset_index(drop=True) for s in SPLITS}
    fixed = label_names is not None
    for split, part in tables.items():
        if part.empty and not (fixed and split == "train"):
            raise DataError(f"The {split} split of {root} is empty; check the split lists and fractions.")
    log.info(
        "Splits: %s images; %s patients",
        {s: len(t) for s, t in tables.items()},
        {s: t[nih.PATIENT].nunique() for s, t in tables.items()},
    )
    stats_rows = tables["train"] if len(tables["train"]) else table
    return SplitTables(
        tables=tables,
        label_names=names,
        meta_names=meta_names(names, prior_labels),
        age_fill=float(age_fill),
        label_stats=cohort.label_statistics(stats_rows[label_cols].to_numpy(dtype=float), names),
        bbox_table=bbox_table,
        label_table=data.label_table,
        label_table_digest=file_digest(data.label_table),
        source=source,
        unavailable_labels=unavailable,
        left_out=left_out,
        box_protocol=box_protocol,
    )


def encode_findings(table: pd.DataFrame, names: Sequence[str], uncertain: str) -> np.ndarray:
    """``(N, L)`` labels from the standard table's ``finding:`` codes under the uncertainty policy:
    0/1, NaN where the image does not count (uncertain under ``ignore``; a label the source lacks)."""
    out = np.full((len(table), len(names)), np.nan)
    for j, name in enumerate(names):
        col = FINDING_PREFIX + name
        if col not in table.columns:
            continue  # unavailable in this source
        values = table[col].to_numpy(dtype=float)
        replacement = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
        out[:, j] = np.where(values == UNCERTAIN, replacement, values)
    return out


def _fold_split(table: pd.DataFrame, fold: int | None, folds: int, seed: int) -> pd.Series:
    trainval = table["split"] != "test"
    fold_ids = cohort.patient_folds(table[trainval], folds, seed)
    split = table["split"].copy()
    split[trainval] = np.where(fold_ids == fold, "val", "train")
    return split


def _drop_unreadable(table: pd.DataFrame, on_missing: str, workers: int, max_pixels: int | None = None) -> pd.DataFrame:
    bad = find_unreadable(table["path"].tolist(), workers=max(1, workers), max_pixels=max_pixels)
    if not bad:
        return table
    if on_missing == "error":
        raise DataError(
            f"{len(bad)} image(s) cannot be read, e.g. {bad[:5]}. Replace them, or pass "
            f"data.on_missing=skip to leave them out of the run."
        )
    log.warning("Leaving out %d unreadable image(s) (data.on_missing=skip), e.g. %s", len(bad), bad[:5])
    return table[~table["path"].isin(set(bad))]
