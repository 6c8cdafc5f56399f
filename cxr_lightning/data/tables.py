"""From a run's sources (:class:`~cxr_lightning.data.spec.DataSpec`) to the split tables it trains and
is scored on, as pure functions in named steps.

:func:`build_tables` reads each source (:func:`source_table`): the publisher's files into the
standard table (:mod:`.sources`), its findings harmonised into the run's label space under the
source's uncertainty policy (for the labels and the previous visit's labels alike), the
non-frontal views left out and counted, every patient given a split (the publisher's, or drawn
by patient), and only then the images looked for. Several sources are pooled into one table with
their patient IDs prefixed by the source's name (:func:`pool`); the demographics are encoded with
the training split's age median, or a checkpoint's (:func:`add_demographics`).

The model learns its label names and metadata layout from :func:`output_labels` and
:func:`meta_names`, which read the config (and at most a lab's label table), so a model can be
built before any image is read and checked against the tables later.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data import cohort, label_spaces, leakage, nih
from cxr_lightning.data.boxes import box_fold_split, check_box_folds
from cxr_lightning.data.dataset import find_unreadable
from cxr_lightning.data.label_spaces import LabelSpace
from cxr_lightning.data.sources.base import Source
from cxr_lightning.data.sources.common import FINDING_PREFIX, FRONTAL, UNCERTAIN, SourceData
from cxr_lightning.data.spec import ON_MISSING, SPLITS, UNCERTAIN_POLICIES, DataSpec, SourceSpec
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import file_digest

log = logging.getLogger(__name__)

__all__ = ["ON_MISSING", "SPLITS", "UNCERTAIN_POLICIES", "SplitTables", "build_tables", "meta_names", "output_labels"]
LABEL_PREFIX, META_PREFIX = "label:", "meta:"
SOURCE = "source"  # the split tables' column naming each image's source (the run's name for it)


def label_space(spec: DataSpec, readers: Sequence[Source] | None = None) -> LabelSpace:
    """The run's output labels: a checkpoint's (``spec.label_names``), else the labels of the space
    whose concept at least one source of the run gives (``union``: all of those concepts)."""
    if spec.label_names is not None:
        try:
            return label_spaces.from_checkpoint(spec.label_space, spec.label_names)
        except ConfigError as exc:
            raise ConfigError(f"data.labels: {exc}") from None
    readers = readers if readers is not None else [s.create(_root(spec, s)) for s in spec.sources]
    given = [r.concepts() for r in readers]
    space = label_spaces.resolve(spec.label_space, given, spec.drop_no_finding)
    scored = {c for concepts in given for c in concepts}
    keep = [i for i, c in enumerate(space.concepts) if c in scored]
    if not keep:
        raise ConfigError(
            f"labels={spec.label_space}: no source of the run gives any of its labels {list(space.labels)}."
        )
    return LabelSpace(space.name, tuple(space.labels[i] for i in keep), tuple(space.concepts[i] for i in keep))


def output_labels(spec: DataSpec) -> list[str]:
    """The model's output labels, in order (see :func:`label_space`)."""
    return list(label_space(spec).labels)


def meta_names(label_names: Sequence[str], prior_labels: bool) -> list[str]:
    """The metadata vector's layout (names without the ``meta:`` prefix), in the order the model
    receives it: the demographics, then with ``prior_labels`` the previous visit's labels and
    ``has_prior``."""
    columns = list(cohort.DEMOGRAPHIC_COLUMNS)
    if prior_labels:
        columns += [cohort.PRIOR_PREFIX + n for n in label_names] + [cohort.HAS_PRIOR]
    return [c.removeprefix(META_PREFIX) for c in columns]


@dataclass
class SourceTables:
    """One source's part of the run: its frontal rows with their split, and what was left out."""

    spec: SourceSpec
    table: pd.DataFrame
    label_table: Path
    unavailable_labels: list[str]
    left_out: dict[str, int]
    bbox_table: pd.DataFrame | None = None
    # NIH's boxed-image protocol as applied to this source (boxes.BoxFolds.record()), else None.
    box_protocol: dict | None = None
    # Every frontal row with its split, before only the needed splits' images are looked for
    # (``spec.only_splits``): what the cross-source leakage rule is decided on.
    all_splits: pd.DataFrame | None = None


@dataclass
class SplitTables:
    """What :func:`build_tables` derives from a run's sources.

    ``tables[split]`` holds the standard-table columns (:mod:`.sources.common`), ``path``,
    ``split``, ``source`` (the run's name for the image's source), one ``label:<name>`` column
    per output label (0/1; NaN where the image does not count for the label: uncertain under
    ``data.uncertain=ignore``, or a label its source does not give) and the ``meta:<name>``
    columns, in model order. ``left_out`` counts the rows of the sources' files that no split
    holds, by reason (``view LATERAL``...); ``per_source`` keeps each source's own account.
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
    label_space: str = "nih14"
    per_source: dict[str, SourceTables] = field(default_factory=dict)

    @property
    def box_protocol(self) -> dict | None:
        """NIH's boxed-image protocol (``data.boxes.folds``) as applied, per source that has it."""
        applied = {n: p.box_protocol for n, p in self.per_source.items() if p.box_protocol is not None}
        return applied or None

    @property
    def label_cols(self) -> list[str]:
        return [LABEL_PREFIX + n for n in self.label_names]

    @property
    def meta_cols(self) -> list[str]:
        return [META_PREFIX + n for n in self.meta_names]

    def images(self) -> pd.DataFrame:
        """``Image Index``, ``path`` and ``source`` of every image of every split, in a stable order."""
        return pd.concat([self.tables[s][[nih.IMAGE, "path", SOURCE]] for s in SPLITS], ignore_index=True)

    def scored_labels(self, source: str) -> list[str]:
        """The output labels that source ``source`` gives."""
        missing = set(self.per_source[source].unavailable_labels) if source in self.per_source else set()
        return [n for n in self.label_names if n not in missing]


def build_tables(spec: DataSpec, workers: int = 1) -> SplitTables:
    """Read every source of ``spec`` and build the run's split tables; see :class:`SplitTables`.

    ``spec.label_names`` and ``spec.age_fill`` fix the labels and the age imputation to a
    checkpoint's (scored on other data); ``spec.only_splits`` (evaluate) asks for those splits' rows
    and images only: the others may be empty or absent, and their missing images are no error.
    """
    kinds = {s.name: s.source for s in spec.sources}
    # Before any file is read: RSNA pooled with NIH images needs the file that links its twins.
    mappings = leakage.check_pooling(kinds, {s.name: _root(spec, s) for s in spec.sources},
                                     {s.name: s.options for s in spec.sources})
    readers = [s.create(_root(spec, s)) for s in spec.sources]
    if check_box_folds(spec.boxes) is not None and not any(r.nih_layout for r in readers):
        names = ", ".join(s.source for s in spec.sources)
        raise ConfigError(f"data.boxes.folds is NIH's boxed-image protocol; data={names} has no NIH box list.")
    space = label_space(spec, readers)
    parts = [source_table(spec, s, reader, space, workers) for s, reader in zip(spec.sources, readers)]
    table = pool(parts, spec.pooled)
    twins_left_out: dict[str, int] = {}
    if sum(k in leakage.NIH_NAMED + leakage.MAPPED for k in kinds.values()) > 1:
        table, twins_left_out = without_twins(table, parts, kinds, mappings, spec)
    table, age_fill = add_demographics(table, spec, parts)
    tables = split_tables(table, spec)
    names = list(space.labels)
    label_cols = [LABEL_PREFIX + n for n in names]
    stats_rows = tables["train"] if len(tables["train"]) else table
    stats = cohort.label_statistics(stats_rows[label_cols].to_numpy(dtype=float), names)
    unavailable = [n for n in names if all(n in p.unavailable_labels for p in parts)]
    left_out: dict[str, int] = {}
    for p in parts:
        for reason, n in p.left_out.items():
            key = f"{p.spec.name}: {reason}" if spec.pooled else reason
            left_out[key] = left_out.get(key, 0) + n
    left_out.update(twins_left_out)
    boxes = [p.bbox_table for p in parts if p.bbox_table is not None]
    return SplitTables(
        tables=tables,
        label_names=names,
        meta_names=meta_names(names, spec.prior_labels),
        age_fill=float(age_fill),
        label_stats=stats,
        bbox_table=pd.concat(boxes, ignore_index=True) if boxes else None,
        label_table=parts[0].label_table,
        label_table_digest=_digest([p.label_table for p in parts]),
        source=spec.source,
        unavailable_labels=unavailable,
        left_out=left_out,
        label_space=space.name,
        per_source={p.spec.name: p for p in parts},
    )


# --- the steps -------------------------------------------------------------------------------------
def read_source(spec: SourceSpec, reader: Source, space: LabelSpace) -> tuple[SourceData, pd.DataFrame, list[str]]:
    """The source's standard table with its ``label:`` columns in ``space`` under its uncertainty
    policy, and the labels of ``space`` it does not give."""
    data = reader.read()
    full = data.table
    log.info("Label table: %s (%d rows, source %s)", data.label_table, len(full), spec.name)
    concepts = concept_codes(full, reader)
    encoded = encode_labels(concepts, space, spec.uncertain)
    unavailable = [label for label, c in zip(space.labels, space.concepts) if c not in concepts.columns]
    if unavailable:
        log.info("%s gives no label for %s: masked (NaN) for its images", spec.name, ", ".join(unavailable))
    full[[LABEL_PREFIX + n for n in space.labels]] = encoded
    return data, full, unavailable


def concept_codes(table: pd.DataFrame, reader: Source) -> pd.DataFrame:
    """``(N, concepts)`` codes of the standard table's ``finding:`` columns under the reader's harmonisation."""
    findings = table[[c for c in table.columns if c.startswith(FINDING_PREFIX)]]
    findings = findings.rename(columns=lambda c: c.removeprefix(FINDING_PREFIX))
    return label_spaces.concept_codes(findings, reader.harmonisation)


def encode_labels(concepts: pd.DataFrame, space: LabelSpace, uncertain: str) -> np.ndarray:
    """``(N, L)`` labels of ``space`` from concept codes under the uncertainty policy: 0/1, NaN
    where the image does not count (uncertain under ``ignore``; a concept the source lacks)."""
    out = np.full((len(concepts), len(space.labels)), np.nan)
    replacement = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    for j, concept in enumerate(space.concepts):
        if concept in concepts.columns:
            values = concepts[concept].to_numpy(dtype=float)
            out[:, j] = np.where(values == UNCERTAIN, replacement, values)
    return out


def source_table(spec: DataSpec, s: SourceSpec, reader: Source, space: LabelSpace, workers: int = 1) -> SourceTables:
    """One source read, labelled, restricted to frontal views, split by patient, with its images found."""
    data, full, unavailable = read_source(s, reader, space)
    if spec.prior_labels:
        # Once, on the full table: a previous visit counts even when its image is not in the run.
        encoded = full[[LABEL_PREFIX + n for n in space.labels]].to_numpy(dtype=float)
        full = cohort.add_prior_visits(
            full, list(space.labels), encoded=encoded, images_per_visit=not reader.nih_layout
        )
    frontal, left_out = frontal_views(full, s.name, dict(data.left_out))
    split = assign_splits(frontal, reader, spec)
    frontal["split"] = split
    frontal[SOURCE] = s.name
    table = find_images(frontal, reader, spec, workers)
    return SourceTables(s, table, data.label_table, unavailable, left_out, reader.read_boxes(),
                        split.attrs.get("box_protocol"), all_splits=frontal[[nih.IMAGE, nih.PATIENT, "split", SOURCE]])


def frontal_views(full: pd.DataFrame, name: str, left_out: dict[str, int]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The frontal rows, and ``left_out`` with the other views counted by view."""
    lateral = ~full[FRONTAL].astype(bool)
    if lateral.any():
        views = full.loc[lateral, nih.VIEW].fillna("unknown").astype(str).value_counts()
        left_out.update({f"view {v}": int(n) for v, n in views.items()})
        log.info(
            "Frontal views only: left out %d image(s) of %s (%s)",
            int(lateral.sum()),
            name,
            ", ".join(f"{v}: {n}" for v, n in views.items()),
        )
    frontal = full.loc[~lateral].copy()
    frontal.attrs.update(full.attrs)
    return frontal, left_out


def assign_splits(table: pd.DataFrame, reader: Source, spec: DataSpec) -> pd.Series:
    """Every row's split from the label table alone (never from which images are on disk, so
    inspect, train and evaluate agree): the source's own, then ``data.fold`` of ``data.folds``."""
    split = reader.split(table, spec.val_fraction, spec.test_fraction, spec.split_seed)
    if spec.folds is not None:
        trainval = split != "test"
        fold_ids = cohort.patient_folds(table[trainval], spec.folds, spec.split_seed)
        split = split.copy()
        split[trainval] = np.where(fold_ids == spec.fold, "val", "train")
    box_folds = check_box_folds(spec.boxes)
    protocol = None
    if box_folds is not None and reader.nih_layout:
        # After the train_val folds: the boxed patients moved train in every one of them.
        split, moved = box_fold_split(table, split, reader.read_boxes(), seed=spec.split_seed, **box_folds)
        protocol = moved.record()
        log.info("NIH boxed-image protocol (%s): %s", reader.name, protocol["test"])
    cohort.check_patient_disjoint(table.assign(split=split), "split")
    # Read by source_table into the run's record of the protocol (metrics.json's box_protocol).
    split.attrs["box_protocol"] = protocol
    return split


def needed_splits(spec: DataSpec) -> tuple[str, ...]:
    return SPLITS if spec.only_splits is None else tuple(spec.only_splits)


def find_images(table: pd.DataFrame, reader: Source, spec: DataSpec, workers: int = 1) -> pd.DataFrame:
    """The rows of the needed splits whose image is there (``data.on_missing``), with ``path``;
    with ``data.verify_images``, only the readable ones."""
    needed = table["split"].isin(needed_splits(spec))
    if not needed.all():
        log.info(
            "Only the %s split(s) are needed: %d row(s) of other splits are not looked for",
            "/".join(needed_splits(spec)),
            int((~needed).sum()),
        )
        attrs = dict(table.attrs)
        table = table.loc[needed]
        table.attrs.update(attrs)
    if table.empty:
        raise DataError(
            f"{reader.root}: no row in the {'/'.join(needed_splits(spec))} split(s); check data.root "
            "and the split files."
        )
    found = reader.attach_paths(table, spec.on_missing).reset_index(drop=True)
    if spec.verify_images:
        found = _drop_unreadable(found, spec.on_missing, workers, spec.max_pixels)
    return found


def without_twins(
    table: pd.DataFrame,
    parts: Sequence[SourceTables],
    kinds: Mapping[str, str],
    mappings: Mapping[str, Path],
    spec: DataSpec,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """``table`` after the cross-source leakage rule (:func:`leakage.leave_out_twins`), decided on
    every split's rows even when this job reads only some (evaluate reads test and val): an RSNA
    test image whose NIH twin trains must leave the test split the same way training saw it go."""
    def decide(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
        return leakage.leave_out_twins(frame, leakage.nih_twins(frame, kinds, mappings, SOURCE), kinds,
                                       source_col=SOURCE)

    if spec.only_splits is None:
        return decide(table)
    decided, counts = decide(pool([dataclasses.replace(p, table=p.all_splits) for p in parts], spec.pooled))
    split = decided.set_index([SOURCE, nih.IMAGE])["split"]
    now = split.reindex(pd.MultiIndex.from_frame(table[[SOURCE, nih.IMAGE]])).to_numpy()
    kept = pd.notna(now) & np.isin(now.astype(str), needed_splits(spec))
    out = table.loc[kept].assign(split=now[kept])
    out.attrs.update(table.attrs)
    return out.reset_index(drop=True), counts


def pool(parts: Sequence[SourceTables], pooled: bool) -> pd.DataFrame:
    """The sources' rows as one table; pooled, each patient ID is prefixed by its source's name
    (``nih:17``, ``chexpert:64541``), so no two sources' patients ever collide."""
    frames = []
    for p in parts:
        frame = p.table
        if pooled:
            frame = frame.assign(**{nih.PATIENT: p.spec.name + ":" + frame[nih.PATIENT].astype(str)})
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    table.attrs["source"] = " + ".join(str(p.table.attrs.get("source", p.spec.name)) for p in parts)
    return table


def add_demographics(table: pd.DataFrame, spec: DataSpec, parts: Sequence[SourceTables]) -> tuple[pd.DataFrame, float]:
    """``table`` with the demographic ``meta:`` columns; missing ages filled with the training
    split's median (or ``spec.age_fill``), and a source's missing sexes and views flagged unknown
    unless it is in NIH's layout (which records them all)."""
    age_fill = spec.age_fill
    train = table[table["split"] == "train"]
    native = all(p.spec.nih_layout for p in parts)
    if age_fill is None and not native and train[nih.AGE].isna().all():
        # A source without ages (MIMIC without MIMIC-IV's patients table): every age is flagged
        # missing, so the fill is a constant the model cannot tell from any other.
        log.warning("%s gives no ages in its training split: all flagged missing (meta:age_missing=1)", spec.source)
        age_fill = 0.0
    if age_fill is None:
        _, age_fill = cohort.encode_demographics(train, missing_as_unknown=not native)
    blocks = []
    for p in parts:
        rows = table[SOURCE] == p.spec.name
        demographics, _ = cohort.encode_demographics(
            table[rows], age_fill=age_fill, missing_as_unknown=not p.spec.nih_layout
        )
        blocks.append(demographics)
    demographics = pd.concat(blocks).loc[table.index]
    table = table.copy()
    table[demographics.columns] = demographics
    return table, float(age_fill)


def split_tables(table: pd.DataFrame, spec: DataSpec) -> dict[str, pd.DataFrame]:
    """One table per split; each needed split must hold images (a checkpoint's labels may leave
    train empty: an external source scored only)."""
    tables = {s: table[table["split"] == s].reset_index(drop=True) for s in SPLITS}
    fixed = spec.label_names is not None
    for split in needed_splits(spec):
        if tables[split].empty and not (fixed and split == "train"):
            roots = ", ".join(str(s.root) for s in spec.sources)
            raise DataError(f"The {split} split of {roots} is empty; check the split lists and fractions.")
    log.info(
        "Splits: %s images; %s patients",
        {s: len(t) for s, t in tables.items()},
        {s: t[nih.PATIENT].nunique() for s, t in tables.items()},
    )
    return tables


# --- helpers ---------------------------------------------------------------------------------------
def _root(spec: DataSpec, s: SourceSpec) -> Path | None:
    if s.root is None and s.source == "demo":
        from cxr_lightning.data.demo import demo_dir

        return demo_dir(spec.cache_dir, **dict(spec.demo))
    return s.root


def _digest(paths: Sequence[Path]) -> str:
    digests = [file_digest(p) for p in paths]
    return digests[0] if len(digests) == 1 else "+".join(digests)


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
    return table[~table["path"].isin(set(bad))].reset_index(drop=True)
