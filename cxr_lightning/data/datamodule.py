"""``CXRDataModule``: a run's sources (one dataset, or several pooled) as train/val/test loaders.

It glues the table side (:func:`~cxr_lightning.data.tables.build_tables`) and the pixel side
(``dataset``, ``cache``) together, and hands the model its training augmentation; the logic
lives in those modules and the options in one :class:`~cxr_lightning.data.spec.DataSpec`.
``prepare_data`` (one process per node) generates the demo and builds the image caches (one per
source); ``setup`` (every process) only reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from cxr_lightning.data.augment import BatchAugment
from cxr_lightning.data.boxes import ImageBoxes, check_training_boxes, image_boxes, with_image_sizes
from cxr_lightning.data.cache import ImageCache, SourceCaches, cache_root, compute_fingerprint
from cxr_lightning.data.dataset import CXRDataset, collate_readable
from cxr_lightning.data.demo import demo_dir, ensure_demo
from cxr_lightning.data.samplers import build_sampler, sampling_weights, weighted_label_statistics
from cxr_lightning.data.spec import DataSpec
from cxr_lightning.data.tables import SOURCE, SPLITS, SplitTables, build_tables, label_space, meta_names
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import write_text

log = logging.getLogger(__name__)


class CXRDataModule(pl.LightningDataModule):
    """Chest X-ray datasets read exactly as their publishers ship them (NIH's ChestX-ray14, the
    demo, an external source of :mod:`cxr_lightning.data.sources`, a lab's own table, or several
    of them pooled), split by patient.

    Built from a :class:`~cxr_lightning.data.spec.DataSpec` (``spec=``), or from the keys of
    ``conf/data/*.yaml`` as Hydra passes them (see the README's configuration section).
    """

    def __init__(self, spec: DataSpec | None = None, **options: Any) -> None:
        super().__init__()
        if spec is None:
            spec = DataSpec.from_options(**options)
        elif options:
            spec = spec.replace(**options)
            spec.check()
        self.spec = spec
        self.source = spec.source
        self.cache_dir = spec.cache_dir
        self.demo_params = dict(spec.demo)
        first = spec.sources[0]
        # The demo's folder is known before it exists: prepare_data generates it there.
        self.roots = {s.name: s.root or demo_dir(self.cache_dir, **self.demo_params) for s in spec.sources}
        self.root = self.roots[first.name]
        self.label_table = first.label_table
        self.image_size = int(spec.image_size)
        self.batch_size = int(spec.batch_size)
        self.num_workers = int(spec.num_workers)
        self.space = label_space(spec)
        self.label_names = list(self.space.labels)
        self.meta_names = meta_names(self.label_names, spec.prior_labels)
        self.use_cache = bool(spec.cache)
        self.sampler = spec.sampler
        self.no_finding_keep = float(spec.no_finding_keep)
        self.sampler_seed = int(spec.sampler_seed)
        # Box-guided training (loss.box_weight > 0; tasks.build sets it): training samples carry
        # their boxes. Validation and test samples never do.
        self.train_boxes = bool(spec.train_boxes)
        aug = dict(spec.augment or {})
        # Read by the model's preprocessing while its trainer trains (CXRClassifier.on_after_batch_transfer).
        self.augment: BatchAugment | None = (
            BatchAugment(**{k: v for k, v in aug.items() if k != "enabled"}) if aug.pop("enabled", True) else None
        )
        self.tables: SplitTables | None = None
        self.image_cache: ImageCache | SourceCaches | None = None
        self.max_pixels = spec.max_pixels
        # Files a Trainer's loader could not decode (data.on_missing=skip), counted in metrics.json.
        self.skipped_images: set[str] = set()

    @property
    def uncertain(self) -> str:
        """``data.uncertain`` of the run (of each source: ``name=policy`` joined, when they differ)."""
        policies = {s.name: s.uncertain for s in self.spec.sources}
        if len(set(policies.values())) == 1:
            return next(iter(policies.values()))
        return ", ".join(f"{n}={u}" for n, u in policies.items())

    # ----------------------------------------------------------------------------------------
    # Setup
    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup(): the place to generate the
        # demo and build the image cache once, so DDP ranks only open the cache (see dataset()).
        for s in self.spec.sources:
            if s.source == "demo":
                ensure_demo(self.cache_dir, **self.demo_params)
        if self.use_cache and self.image_cache is None:
            self.image_cache = self.build_cache()

    def _cache_inputs(self) -> dict[str, tuple[list[str], list[str], Path, str]]:
        """Per source: the (paths, names) of its images in the run, its cache root and fingerprint extra."""
        self.setup()
        images = self.tables.images()
        out = {}
        for name in self.tables.per_source:
            rows = images[images[SOURCE] == name]
            out[name] = (
                rows["path"].tolist(),
                rows["Image Index"].tolist(),
                cache_root(self.cache_dir, self.roots[name]),
                self._source_digest(name),
            )
        return out

    def _source_digest(self, name: str) -> str:
        from cxr_lightning.files import file_digest

        if len(self.tables.per_source) == 1:
            return self.tables.label_table_digest
        return file_digest(self.tables.per_source[name].label_table)

    def build_cache(self, workers: int | None = None) -> ImageCache | SourceCaches:
        """Decode and resize every image of the run (all splits) into its source's cache for
        ``image_size``, or reuse the existing one when its fingerprint matches; ``workers``
        decoding processes (default ``num_workers``, at least one; 0: in this process)."""
        caches = {
            name: ImageCache.get_or_build(
                paths=paths,
                names=names,
                size=self.image_size,
                cache_root=root,
                fingerprint_extra=extra,
                workers=max(1, self.num_workers) if workers is None else workers,
            )
            for name, (paths, names, root, extra) in self._cache_inputs().items()
        }
        return next(iter(caches.values())) if len(caches) == 1 else SourceCaches(caches)

    def setup(self, stage: str | None = None) -> None:
        if self.tables is not None:
            return
        for s in self.spec.sources:
            root = self.roots[s.name]
            if not root.is_dir():
                hint = (
                    "Lightning's Trainer calls prepare_data() first, which generates it"
                    if s.source == "demo"
                    else f"Point it at the folder of the {s.source} download (see README, 'Using the real dataset')"
                )
                raise DataError(f"data.root={root} does not exist. {hint}.")
        tables = build_tables(self.spec, workers=self.num_workers)
        if tables.label_names != self.label_names or tables.meta_names != self.meta_names:
            raise DataError(
                f"{self.root}: the tables' labels or metadata differ from the config's ({tables.meta_names})."
            )
        self.tables = tables
        if self.train_boxes:
            total = len(tables.bbox_table) if tables.bbox_table is not None else 0
            check_training_boxes(self.training_boxes().count, self.source, total)

    def _opened_cache(self) -> ImageCache | SourceCaches | None:
        """The image caches that prepare_data() built (this process or another rank's): opened, never
        built here, and refused when they do not match this data."""
        if not self.use_cache:
            return None
        if self.image_cache is None:
            caches = {}
            for name, (paths, names, root, extra) in self._cache_inputs().items():
                fingerprint = compute_fingerprint(paths, names, self.image_size, extra)
                try:
                    caches[name] = ImageCache.open(root, self.image_size, fingerprint)
                except DataError as exc:
                    raise DataError(
                        f"{exc} The data module's prepare_data(), which Lightning calls before setup(), builds it too."
                    ) from exc
            self.image_cache = next(iter(caches.values())) if len(caches) == 1 else SourceCaches(caches)
        return self.image_cache

    # ----------------------------------------------------------------------------------------
    # What the rest of the framework reads
    def _tables(self) -> SplitTables:
        if self.tables is None:
            self.setup()
        return self.tables

    @property
    def meta_dim(self) -> int:
        return len(self.meta_names)

    @property
    def meta_cols(self) -> list[str]:
        return self._tables().meta_cols

    @property
    def label_cols(self) -> list[str]:
        return self._tables().label_cols

    @property
    def label_stats(self) -> pd.DataFrame:
        """Per-label statistics of the training images as the sampler feeds them (expected counts
        per epoch): what the weighted BCE's class weights are taken from."""
        tables = self._tables()
        if self.sampler == "random" and not self.spec.pooled:
            return tables.label_stats
        return weighted_label_statistics(self._train_labels(), self._train_weights(), self.label_names)

    def _train_labels(self) -> np.ndarray:
        return self.split_table("train")[self.label_cols].to_numpy(dtype=float)

    def _train_weights(self) -> np.ndarray | None:
        """Each training image's expected draws per epoch: ``data.sampler``'s, and pooled, scaled
        so that each source's share of the draws is its ``weight`` over the sum of weights."""
        labels = self._train_labels()
        if not self.spec.pooled:
            return sampling_weights(self.sampler, labels, self.label_names, self.no_finding_keep)
        from cxr_lightning.data.samplers import source_weights

        train = self.split_table("train")
        shares = {s.name: s.weight for s in self.spec.sources}
        return source_weights(
            train[SOURCE].to_numpy(), shares, self.sampler, labels, self.label_names, self.no_finding_keep
        )

    @property
    def sampler_record(self) -> dict[str, Any]:
        """The training sampler as plain data, for the checkpoint's hyperparameters."""
        record: dict[str, Any] = {"name": self.sampler, "seed": self.sampler_seed}
        if self.sampler == "undersample_no_finding":
            record["no_finding_keep"] = self.no_finding_keep
        if self.spec.pooled:
            record["source_weights"] = {s.name: float(s.weight) for s in self.spec.sources}
        return record

    def training_boxes(self) -> ImageBoxes:
        """The boxes of the training split's images (never of a validation or test patient)."""
        return image_boxes(
            self.split_table("train"), self.bbox_table, self.label_names, self.image_size, concepts=self.space.concepts
        )

    @property
    def box_protocol(self) -> dict | None:
        """NIH's boxed-image protocol as applied to this run's split (``data.boxes.folds``), per source
        that has NIH's layout, else None."""
        return self._tables().box_protocol

    @property
    def age_fill(self) -> float:
        return self._tables().age_fill

    @property
    def bbox_table(self) -> pd.DataFrame | None:
        return self._tables().bbox_table

    @property
    def localization_sources(self) -> list[str]:
        """The sources whose boxes localisation is scored on (explain): those in NIH's layout (NIH,
        the demo) when the run has one, else every source. A pooled box source (VinDr-CXR, RSNA)
        brings its boxes as training material; its validation or test boxes are another dataset's
        readers (and RSNA's images NIH's own), so scores mixing them would be comparable neither
        with NIH's published localisation figures nor across runs pooling other sources."""
        per_source = self._tables().per_source
        nih_like = [name for name, part in per_source.items() if part.spec.nih_layout]
        return nih_like or list(per_source)

    def localization_boxes(self, table: pd.DataFrame) -> pd.DataFrame | None:
        """The boxes of :attr:`localization_sources` on the rows of ``table`` (split-table rows:
        ``Image Index``, ``path``, ``source``), each carrying the size it is measured in
        (:func:`~cxr_lightning.data.boxes.with_image_sizes`); None when those sources have no boxes."""
        tables = self._tables()
        names = self.localization_sources
        parts = [tables.per_source[n].bbox_table for n in names if tables.per_source[n].bbox_table is not None]
        if not parts:
            return None
        rows = table[table[SOURCE].isin(names)] if SOURCE in table.columns else table
        return with_image_sizes(pd.concat(parts, ignore_index=True), rows)

    @property
    def label_table_name(self) -> str:
        return self._tables().label_table.name

    def split_table(self, split: str) -> pd.DataFrame:
        """One split as a DataFrame: label-table columns, ``path``, ``label:*`` and ``meta:*``."""
        if split not in SPLITS:
            raise ConfigError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")
        return self._tables().tables[split]

    def save_split(self, out_dir: str | os.PathLike) -> Path:
        """Write the validation patients to ``val_patients.txt`` so that a run can be reproduced."""
        val = (
            np.sort(self.split_table("val")["Patient ID"].astype(str).unique())
            if self.spec.pooled
            else np.sort(self.split_table("val")["Patient ID"].unique())
        )
        path = Path(out_dir) / "val_patients.txt"
        write_text(path, "".join(f"{p}\n" for p in val))
        return path

    # ----------------------------------------------------------------------------------------
    # Loaders
    def dataset(self, split: str, skip_unreadable: bool = False) -> CXRDataset:
        return CXRDataset(
            self.split_table(split),
            label_cols=self.label_cols,
            meta_cols=self.meta_cols,
            image_size=self.image_size,
            cache=self._opened_cache(),
            boxes=self.training_boxes() if split == "train" and self.train_boxes else None,
            max_pixels=self.max_pixels,
            skip_unreadable=skip_unreadable,
        )

    def record_skipped(self, files: list[str]) -> None:
        """Note the files a Trainer's batch left out (:func:`~cxr_lightning.data.dataset.collate_readable`)."""
        self.skipped_images.update(map(str, files))

    def loader(
        self, split: str, shuffle: bool, sampler: Sampler | None = None, skip_unreadable: bool = False
    ) -> DataLoader:
        # A sampler (the benchmark's draws with replacement) replaces shuffling. Only a Trainer's
        # loaders skip an image that fails to decode: evaluation needs one prediction per table row.
        return DataLoader(
            self.dataset(split, skip_unreadable),
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            **({"collate_fn": collate_readable} if skip_unreadable else {}),
        )

    @property
    def _skips(self) -> bool:
        return self.spec.on_missing == "skip"

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True, sampler=self.train_sampler(), skip_unreadable=self._skips)

    def train_sampler(self) -> Sampler | None:
        """``data.sampler``'s training sampler for this rank (None for ``random``: shuffled).

        It is a DistributedSampler built with the trainer's world size and rank, which Lightning
        leaves in place under DDP and reseeds through ``set_epoch``; see :mod:`~cxr_lightning.data.samplers`."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        labels = self._train_labels()
        if self.spec.pooled:
            from cxr_lightning.data.samplers import WeightedDraw

            return WeightedDraw(self._train_weights(), self.sampler_seed, world, rank)
        return build_sampler(
            self.sampler, labels, self.label_names, self.no_finding_keep, self.sampler_seed, world, rank
        )

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False, sampler=self._eval_sampler("val"), skip_unreadable=self._skips)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False, sampler=self._eval_sampler("test"), skip_unreadable=self._skips)

    def _eval_sampler(self, split: str) -> Sampler | None:
        """Under DDP, each validation/test image goes to exactly one rank.

        Lightning's default DistributedSampler pads a split to a multiple of the world size by
        repeating images, which the rank-synchronised AUROC and loss would count twice; so N GPUs
        would score a checkpoint differently from one. Evaluation has no gradient all-reduce, so
        ranks may run one batch more or less than each other."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(
            range(len(self.split_table(split))),
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=False,
        )
