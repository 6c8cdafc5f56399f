"""``CXRDataModule``: ChestX-ray14 (real or demo) as train/val/test loaders.

It glues the table side (:func:`~cxr_lightning.data.tables.build_tables`) and the pixel side
(``dataset``, ``cache``) together, and hands the model its training augmentation; the logic
lives in those modules. ``prepare_data`` (one process per node) generates the demo and builds the
image cache; ``setup`` (every process) only reads.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from cxr_lightning.data.augment import BatchAugment
from cxr_lightning.data.boxes import ImageBoxes, check_box_folds, check_training_boxes, image_boxes
from cxr_lightning.data.cache import ImageCache, cache_root, compute_fingerprint
from cxr_lightning.data import images
from cxr_lightning.data.dataset import CXRDataset, collate_readable
from cxr_lightning.data.demo import demo_dir, ensure_demo
from cxr_lightning.data import sources
from cxr_lightning.data.samplers import build_sampler, check_sampler, sampling_weights, weighted_label_statistics
from cxr_lightning.data.tables import (
    ON_MISSING,
    SPLITS,
    UNCERTAIN_POLICIES,
    SplitTables,
    build_tables,
    meta_names,
    output_labels,
)
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import write_text

log = logging.getLogger(__name__)


class CXRDataModule(pl.LightningDataModule):
    """A chest X-ray dataset read exactly as its publisher ships it (``source``: NIH's
    ChestX-ray14, the demo, or an external source of :mod:`cxr_lightning.data.sources`), split by
    patient.

    Args mirror ``conf/data/*.yaml``; see the README's configuration section. ``labels`` and
    ``age_fill`` fix the output labels and the age imputation to a checkpoint's, for scoring it
    on a source it was not trained on (``tasks.build.datamodule_for``).
    """

    def __init__(
        self,
        source: str = "demo",
        root: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike = ".cache",
        demo: Mapping[str, Any] | None = None,
        label_table: str = "auto",
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        fold: int | None = None,
        folds: int | None = None,
        prior_labels: bool = True,
        drop_no_finding: bool = False,
        uncertain: str = "ignore",
        labels: list[str] | None = None,
        age_fill: float | None = None,
        on_missing: str = "error",
        verify_images: bool = False,
        cache: bool = False,
        augment: Mapping[str, Any] | None = None,
        sampler: str = "random",
        no_finding_keep: float = 0.5,
        sampler_seed: int = 0,
        boxes: Mapping[str, Any] | None = None,
        train_boxes: bool = False,
        max_pixels: int = images.MAX_PIXELS,
    ) -> None:
        super().__init__()
        sources.get(source)  # ConfigError naming the known sources
        if source != "demo" and not root:
            raise ConfigError(f"data={source} needs data.root=DIR, the folder holding the {source} download.")
        if uncertain not in UNCERTAIN_POLICIES:
            raise ConfigError(f"data.uncertain={uncertain!r}: expected one of {list(UNCERTAIN_POLICIES)}.")
        if on_missing not in ON_MISSING:
            raise ConfigError(f"data.on_missing={on_missing!r}: expected one of {list(ON_MISSING)}.")
        if (fold is None) != (folds is None):
            raise ConfigError("data.fold and data.folds go together: data.fold=k data.folds=K (0 <= k < K).")
        if folds is not None and not (folds >= 2 and 0 <= fold < folds):
            raise ConfigError(f"data.fold={fold} data.folds={folds}: need folds >= 2 and 0 <= fold < folds.")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must lie strictly between 0 and 1.")
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ConfigError(f"data.max_pixels={max_pixels!r}: the pixel budget is a positive number of pixels.")
        self.max_pixels = max_pixels
        # Files a Trainer's loader could not decode (data.on_missing=skip), counted in metrics.json.
        self.skipped_images: set[str] = set()
        self.source = source
        self.cache_dir = Path(cache_dir).expanduser()
        self.demo_params = dict(demo or {})
        # The demo's folder is known before it exists: prepare_data generates it there.
        self.root = Path(root).expanduser() if root else demo_dir(self.cache_dir, **self.demo_params)
        self.label_table = label_table
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.split_options = {
            "source": source,
            "label_table": label_table,
            "label_names": list(labels) if labels is not None else None,
            "age_fill": float(age_fill) if age_fill is not None else None,
            "uncertain": uncertain,
            "drop_no_finding": bool(drop_no_finding),
            "prior_labels": bool(prior_labels),
            "val_fraction": float(val_fraction),
            "test_fraction": float(test_fraction),
            "split_seed": int(split_seed),
            "fold": fold,
            "folds": folds,
            "on_missing": on_missing,
            "verify_images": bool(verify_images),
            "box_folds": check_box_folds(boxes),
        }
        self.label_names = output_labels(bool(drop_no_finding), source, labels)
        self.meta_names = meta_names(self.label_names, bool(prior_labels))
        self.use_cache = bool(cache)
        check_sampler(sampler, no_finding_keep)
        self.sampler = sampler
        self.no_finding_keep = float(no_finding_keep)
        self.sampler_seed = int(sampler_seed)
        # Box-guided training (loss.box_weight > 0; tasks.build sets it): training samples carry
        # their boxes. Validation and test samples never do.
        self.train_boxes = bool(train_boxes)
        aug = dict(augment or {})
        # Read by the model's preprocessing while its trainer trains (CXRClassifier.on_after_batch_transfer).
        self.augment: BatchAugment | None = BatchAugment(**{k: v for k, v in aug.items() if k != "enabled"}) \
            if aug.pop("enabled", True) else None
        self.tables: SplitTables | None = None
        self.image_cache: ImageCache | None = None

    # ----------------------------------------------------------------------------------------
    # Setup
    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup(): the place to generate the
        # demo and build the image cache once, so DDP ranks only open the cache (see dataset()).
        if self.source == "demo":
            ensure_demo(self.cache_dir, **self.demo_params)
        if self.use_cache and self.image_cache is None:
            self.image_cache = self.build_cache()

    def build_cache(self, workers: int | None = None) -> ImageCache:
        """Decode and resize every image of the label table (all splits) into the cache for
        ``image_size``, or reuse the existing one when its fingerprint matches; ``workers``
        decoding processes (default ``num_workers``, at least one; 0: in this process)."""
        self.setup()
        images = self.tables.images()
        return ImageCache.get_or_build(
            paths=images["path"].tolist(),
            names=images["Image Index"].tolist(),
            size=self.image_size,
            cache_root=cache_root(self.cache_dir, self.root),
            fingerprint_extra=self.tables.label_table_digest,
            workers=max(1, self.num_workers) if workers is None else workers,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.tables is not None:
            return
        if not self.root.is_dir():
            hint = ("Lightning's Trainer calls prepare_data() first, which generates it" if self.source == "demo"
                    else f"Point it at the folder of the {self.source} download (see README, 'Using the real dataset')")
            raise DataError(f"data.root={self.root} does not exist. {hint}.")
        tables = build_tables(self.root, workers=self.num_workers, max_pixels=self.max_pixels, **self.split_options)
        if tables.label_names != self.label_names or tables.meta_names != self.meta_names:
            raise DataError(f"{self.root}: the tables' labels or metadata differ from the config's ({tables.meta_names}).")
        self.tables = tables
        if self.train_boxes:
            total = len(tables.bbox_table) if tables.bbox_table is not None else 0
            check_training_boxes(self.training_boxes().count, self.source, total)

    def _opened_cache(self) -> ImageCache | None:
        """The image cache that prepare_data() built (this process or another rank's): opened, never
        built here, and refused when it does not match this data."""
        if not self.use_cache:
            return None
        if self.image_cache is None:
            self.setup()
            images = self.tables.images()
            fingerprint = compute_fingerprint(
                images["path"].tolist(), images["Image Index"].tolist(), self.image_size, self.tables.label_table_digest
            )
            try:
                self.image_cache = ImageCache.open(cache_root(self.cache_dir, self.root), self.image_size, fingerprint)
            except DataError as exc:
                raise DataError(
                    f"{exc} The data module's prepare_data(), which Lightning calls before setup(), builds it too."
                ) from exc
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
        if self.sampler == "random":
            return tables.label_stats
        labels = tables.tables["train"][self.label_cols].to_numpy()
        weights = sampling_weights(self.sampler, labels, self.label_names, self.no_finding_keep)
        return weighted_label_statistics(labels, weights, self.label_names)

    @property
    def sampler_record(self) -> dict[str, Any]:
        """The training sampler as plain data, for the checkpoint's hyperparameters."""
        record: dict[str, Any] = {"name": self.sampler, "seed": self.sampler_seed}
        if self.sampler == "undersample_no_finding":
            record["no_finding_keep"] = self.no_finding_keep
        return record

    def training_boxes(self) -> ImageBoxes:
        """The boxes of the training split's images (never of a validation or test patient)."""
        return image_boxes(self.split_table("train"), self.bbox_table, self.label_names, self.image_size)

    @property
    def box_protocol(self) -> dict | None:
        """NIH's boxed-image protocol as applied to this split (``data.boxes.folds``), else None."""
        return self._tables().box_protocol

    @property
    def age_fill(self) -> float:
        return self._tables().age_fill

    @property
    def bbox_table(self) -> pd.DataFrame | None:
        return self._tables().bbox_table

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
        val = np.sort(self.split_table("val")["Patient ID"].unique())
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
        return self.split_options["on_missing"] == "skip"

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True, sampler=self.train_sampler(), skip_unreadable=self._skips)

    def train_sampler(self) -> Sampler | None:
        """``data.sampler``'s training sampler for this rank (None for ``random``: shuffled).

        It is a DistributedSampler built with the trainer's world size and rank, which Lightning
        leaves in place under DDP and reseeds through ``set_epoch``; see :mod:`~cxr_lightning.data.samplers`."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        labels = self.split_table("train")[self.label_cols].to_numpy()
        return build_sampler(self.sampler, labels, self.label_names, self.no_finding_keep, self.sampler_seed, world, rank)

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
            range(len(self.split_table(split))), num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
