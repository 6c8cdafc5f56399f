"""``DataSpec``: the data options of a run (``conf/data/*.yaml``), validated once and passed everywhere.

The data module, the split tables, ``inspect`` and the tasks read this one object; a run's
sources are :class:`SourceSpec` entries, one for ``data=<source>``, several for ``data=pooled``
(``data.sources``: name -> {source, root, uncertain?, weight?, label_table?, and a source's own
options such as data=csv's table/columns/label_map}).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_lightning.data import label_spaces, sources
from cxr_lightning.data.boxes import check_box_folds
from cxr_lightning.data.images import MAX_PIXELS
from cxr_lightning.data.samplers import check_sampler
from cxr_lightning.errors import ConfigError

ON_MISSING = ("error", "skip")
# data.uncertain: what a labeller's "uncertain" (-1) becomes. ignore: the image does not count
# for that label (NaN: masked in the losses and metrics); ones / zeros: a positive / a negative.
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
SPLITS = ("train", "val", "test")
POOLED = "pooled"
# keys of one data.sources entry besides a source's own options
SOURCE_KEYS = ("source", "root", "uncertain", "weight", "label_table")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a run: ``name`` (the run's name for it; prefixes its patients when pooled),
    the registered ``source``, where its files are and how its labels are read."""

    name: str
    source: str
    root: Path | None
    label_table: str = "auto"
    uncertain: str = "ignore"
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def create(self, root: Path | None = None) -> sources.Source:
        """The source's reader (``root`` overrides, for the demo's generated folder)."""
        return sources.create(self.source, root or self.root, self.label_table, self.options)

    @property
    def nih_layout(self) -> bool:
        return sources.get(self.source).nih_layout


@dataclass(frozen=True)
class DataSpec:
    """Every ``data.*`` option; see ``conf/data/demo.yaml`` for what each one does."""

    sources: tuple[SourceSpec, ...]
    label_space: str = "nih14"
    label_names: tuple[str, ...] | None = None  # a checkpoint's outputs, scored on other data
    age_fill: float | None = None
    drop_no_finding: bool = False
    prior_labels: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    fold: int | None = None
    folds: int | None = None
    on_missing: str = "error"
    verify_images: bool = False
    only_splits: tuple[str, ...] | None = None  # evaluate: only these splits' rows and images must be there
    cache_dir: Path = Path(".cache")
    demo: Mapping[str, Any] = field(default_factory=dict)
    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 2
    cache: bool = False
    augment: Mapping[str, Any] | None = None
    sampler: str = "random"
    no_finding_keep: float = 0.5
    sampler_seed: int = 0
    train_boxes: bool = False
    # NIH's boxed-image protocol: {folds, fold, trained} (cxr_lightning.data.boxes.check_box_folds).
    boxes: Mapping[str, Any] | None = None
    max_pixels: int = MAX_PIXELS  # the decoder's pixel budget per image (data/images.py)
    boxes: Mapping[str, Any] | None = None  # data.boxes: NIH's boxed-image protocol (data/boxes.py)

    # --------------------------------------------------------------------------------------------
    @property
    def pooled(self) -> bool:
        return len(self.sources) > 1 or self.sources[0].name != self.sources[0].source

    @property
    def source(self) -> str:
        """``data.source``: the one source's name, or ``pooled``."""
        return POOLED if self.pooled else self.sources[0].source

    def replace(self, **changes: Any) -> DataSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(
        cls,
        source: str = "demo",
        root: str | os.PathLike | None = None,
        label_table: str = "auto",
        uncertain: str = "ignore",
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        labels: Any = None,
        label_space: str | None = None,
        table: str | None = None,
        columns: Mapping[str, Any] | None = None,
        label_map: Mapping[str, str] | None = None,
        cache_dir: str | os.PathLike = ".cache",
        demo: Mapping[str, Any] | None = None,
        reader_vote: str | None = None,
        **options: Any,
    ) -> DataSpec:
        """The spec of a data config's keys (as Hydra composes ``conf/data/<name>.yaml``), checked.

        ``labels`` is a checkpoint's list of output labels (scoring it on other data); the run's
        label space is ``label_space`` (``labels=`` group)."""
        known = {f.name for f in dataclasses.fields(cls)} - {
            "sources",
            "label_names",
            "label_space",
            "cache_dir",
            "demo",
        }
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"Unknown data option(s) {unknown}; the data options are "
                f"{sorted(known | {'source', 'root', 'label_table', 'uncertain', 'sources', 'labels'})}."
            )
        own = {k: v for k, v in (("table", table), ("columns", columns), ("label_map", label_map)) if v is not None}
        if sources:
            if not isinstance(sources, Mapping) or not sources:
                raise ConfigError("data.sources must map a name to {source, root, ...}; see conf/data/pooled.yaml.")
            specs = tuple(_source_spec(str(name), entry, label_table, uncertain) for name, entry in sources.items())
            specs = tuple(_with_reader_vote(s, reader_vote) for s in specs)
        else:
            if source == POOLED:
                raise ConfigError(
                    "data=pooled needs data.sources: a mapping name -> {source, root, uncertain?, weight?}."
                )
            specs = (
                SourceSpec(
                    str(source),
                    str(source),
                    Path(root).expanduser() if root else None,
                    label_table,
                    uncertain,
                    1.0,
                    own,
                ),
            )
            specs = tuple(_with_reader_vote(s, reader_vote) for s in specs)
        if isinstance(labels, str):  # labels=<space> composed into data.labels by an old config
            label_space, labels = labels, None
        spec = cls(
            sources=specs,
            label_space=label_spaces.check_name(label_space or "nih14"),
            label_names=tuple(str(n) for n in labels) if labels is not None else None,
            cache_dir=Path(cache_dir).expanduser(),
            demo=dict(demo or {}),
            **options,
        )
        spec.check()
        return spec

    def check(self) -> None:
        for s in self.sources:
            sources.get(s.source)  # ConfigError naming the known sources
            if s.uncertain not in UNCERTAIN_POLICIES:
                raise ConfigError(
                    f"data.uncertain={s.uncertain!r} ({s.name}): expected one of {list(UNCERTAIN_POLICIES)}."
                )
            if s.source != "demo" and not s.root:
                where = f"data.sources.{s.name}.root" if self.pooled else "data.root"
                raise ConfigError(
                    f"data={s.source} needs {where}=DIR: "
                    + (sources.get(s.source).hint or f"the folder holding the {s.source} download.")
                )
            if not (isinstance(s.weight, (int, float)) and s.weight > 0):
                raise ConfigError(
                    f"data.sources.{s.name}.weight={s.weight!r}: must be a positive number (its share of draws)."
                )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names {names} repeat.")
        if self.on_missing not in ON_MISSING:
            raise ConfigError(f"data.on_missing={self.on_missing!r}: expected one of {list(ON_MISSING)}.")
        if (self.fold is None) != (self.folds is None):
            raise ConfigError("data.fold and data.folds go together: data.fold=k data.folds=K (0 <= k < K).")
        if self.folds is not None and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            raise ConfigError(f"data.fold={self.fold} data.folds={self.folds}: need folds >= 2 and 0 <= fold < folds.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must lie strictly between 0 and 1.")
        unknown = sorted(set(self.only_splits or ()) - set(SPLITS))
        if unknown:
            raise ConfigError(f"split={unknown[0]!r}: expected one of {list(SPLITS)}.")
        check_sampler(self.sampler, self.no_finding_keep)
        check_box_folds(self.boxes)
        mp = self.max_pixels
        if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1:
            raise ConfigError(f"data.max_pixels={mp!r}: the pixel budget is a positive number of pixels.")


def _with_reader_vote(spec: SourceSpec, reader_vote: str | None) -> SourceSpec:
    """``data.reader_vote`` for a source that has several readers (VinDr-CXR), unless its own
    ``data.sources.<name>.reader_vote`` says otherwise."""
    if reader_vote is None or "reader_vote" not in sources.get(spec.source).options or "reader_vote" in spec.options:
        return spec
    return dataclasses.replace(spec, options={**spec.options, "reader_vote": reader_vote})


def _source_spec(name: str, entry: Any, label_table: str, uncertain: str) -> SourceSpec:
    if not isinstance(entry, Mapping) or "source" not in entry:
        raise ConfigError(f"data.sources.{name}: expected {{source: <name>, root: DIR, ...}}, got {entry!r}.")
    entry = dict(entry)
    options = {k: v for k, v in entry.items() if k not in SOURCE_KEYS and v is not None}
    root = entry.get("root")
    weight = entry.get("weight", 1.0)
    return SourceSpec(
        name=name,
        source=str(entry["source"]),
        root=Path(str(root)).expanduser() if root else None,
        label_table=str(entry.get("label_table") or label_table),
        uncertain=str(entry.get("uncertain") or uncertain),
        weight=float(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else weight,
        options=options,
    )
