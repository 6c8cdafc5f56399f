"""``CXRDataModule``: ChestX-ray14 (real or demo) as train/val/test loaders.

It glues the table side (``nih``, ``cohort``), the pixel side (``dataset``, ``cache``) and the
batch-level preprocessing (``augment``) together; the logic lives in those modules.
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

from cxr_lightning import files, labels
from cxr_lightning.data import augment as augmentation
from cxr_lightning.data import cohort, nih
from cxr_lightning.data.cache import ImageCache, cache_root, compute_fingerprint
from cxr_lightning.data.dataset import CXRDataset, find_unreadable
from cxr_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ON_MISSING = ("error", "skip")


class CXRDataModule(pl.LightningDataModule):
    """ChestX-ray14 read exactly as NIH ships it, split by patient.

    Args mirror ``conf/data/*.yaml``; see the README's configuration section.
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
        on_missing: str = "error",
        verify_images: bool = False,
        cache: bool = False,
        augment: Mapping[str, Any] | None = None,
        mean: float = augmentation.DEFAULT_MEAN,
        std: float = augmentation.DEFAULT_STD,
    ) -> None:
        super().__init__()
        if source not in ("demo", "nih"):
            raise ConfigError(f"data.source={source!r}: expected 'demo' or 'nih'.")
        if source == "nih" and not root:
            raise ConfigError("data=nih needs data.root=DIR, the folder holding the NIH download.")
        if on_missing not in ON_MISSING:
            raise ConfigError(f"data.on_missing={on_missing!r}: expected one of {list(ON_MISSING)}.")
        if (fold is None) != (folds is None):
            raise ConfigError("data.fold and data.folds go together: data.fold=k data.folds=K (0 <= k < K).")
        if folds is not None and not (folds >= 2 and 0 <= fold < folds):
            raise ConfigError(f"data.fold={fold} data.folds={folds}: need folds >= 2 and 0 <= fold < folds.")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must lie strictly between 0 and 1.")
        self.source = source
        self.root = Path(root).expanduser() if root else None
        self.cache_dir = Path(cache_dir).expanduser()
        self.demo_params = dict(demo or {})
        self.label_table = label_table
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.fold, self.folds = fold, folds
        self.prior_labels = bool(prior_labels)
        self.label_names = labels.label_names(drop_no_finding)
        self.on_missing = on_missing
        self.verify_images = bool(verify_images)
        self.use_cache = bool(cache)
        self.mean, self.std = float(mean), float(std)
        aug = dict(augment or {})
        self.augment_enabled = bool(aug.pop("enabled", True))
        self.augmenter = augmentation.BatchAugment(**aug)
        self._tables: dict[str, pd.DataFrame] | None = None
        self.label_table_name: str | None = None
        self.bbox_table: pd.DataFrame | None = None
        self.image_cache: ImageCache | None = None

    # ----------------------------------------------------------------------------------------
    # Setup
    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup(): the place to generate the
        # demo and build the image cache once, so DDP ranks only open the cache (see dataset()).
        self._resolve_root()
        if self.use_cache and self.image_cache is None:
            self.image_cache = self.build_cache()

    def build_cache(self, workers: int | None = None) -> ImageCache:
        """Decode and resize every image of the label table (all splits) into the cache for
        ``image_size``, or reuse the existing one when its fingerprint matches; ``workers``
        decoding processes (default ``num_workers``, at least one; 0: in this process)."""
        self.setup()
        return ImageCache.get_or_build(
            paths=self._cache_images["path"].tolist(),
            names=self._cache_images["Image Index"].tolist(),
            size=self.image_size,
            cache_root=cache_root(self.cache_dir, self.root),
            fingerprint_extra=self._label_table_digest,
            workers=max(1, self.num_workers) if workers is None else workers,
        )

    def _resolve_root(self) -> Path:
        if self.source == "demo" and self.root is None:
            from cxr_lightning.data import demo

            self.root = demo.ensure_demo(self.cache_dir, **self.demo_params)
        assert self.root is not None
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist. Point it at the folder of the NIH download "
                f"(see README, 'Using the real dataset')."
            )
        return self.root

    def setup(self, stage: str | None = None) -> None:
        if self._tables is not None:
            return
        root = self._resolve_root()
        table_path = nih.find_label_table(root) if self.label_table == "auto" else root / self.label_table
        full = nih.read_label_table(table_path)
        self.label_table_name = table_path.name
        log.info("Label table: %s (%d rows)", table_path, len(full))

        if self.prior_labels:
            # On the full table, so a previous visit counts even when its image is not in the run.
            full = cohort.add_prior_visits(full, self.label_names)
        table = nih.attach_paths(full, root, on_missing=self.on_missing)
        if self.verify_images:
            table = self._drop_unreadable(table)

        table["split"] = cohort.split_by_patient(
            table, nih.read_split_lists(root), self.val_fraction, self.test_fraction, self.split_seed
        )
        if self.folds is not None:
            table["split"] = self._fold_split(table)
        cohort.check_patient_disjoint(table, "split")

        encoded = labels.encode_labels(table["Finding Labels"], self.label_names, source=table_path.name)
        table[[f"label:{n}" for n in self.label_names]] = encoded
        train_rows = table["split"] == "train"
        _, self.age_fill = cohort.encode_demographics(table[train_rows])
        demographics, _ = cohort.encode_demographics(table, age_fill=self.age_fill)
        table[demographics.columns] = demographics
        prior_cols = [c for c in table.columns if c.startswith(cohort.PRIOR_PREFIX)] + (
            [cohort.HAS_PRIOR] if self.prior_labels else []
        )
        self.meta_cols = list(demographics.columns) + prior_cols
        self.label_cols = [f"label:{n}" for n in self.label_names]

        self._tables = {s: table[table["split"] == s].reset_index(drop=True) for s in SPLITS}
        for split, t in self._tables.items():
            if t.empty:
                raise DataError(f"The {split} split of {root} is empty; check the split lists and fractions.")
        self.label_stats = cohort.label_statistics(self._tables["train"][self.label_cols].to_numpy(), self.label_names)
        bbox_path = root / nih.BBOX_TABLE
        self.bbox_table = nih.read_bbox_table(bbox_path) if bbox_path.exists() else None
        # The images a cache of this data holds, in row order (its fingerprint depends on them).
        self._cache_images = table[["Image Index", "path"]].reset_index(drop=True)
        self._label_table_digest = files.file_digest(table_path)
        log.info(
            "Splits: %s images; %s patients",
            {s: len(t) for s, t in self._tables.items()},
            {s: t["Patient ID"].nunique() for s, t in self._tables.items()},
        )

    def _fold_split(self, table: pd.DataFrame) -> pd.Series:
        trainval = table["split"] != "test"
        fold_ids = cohort.patient_folds(table[trainval], self.folds, self.split_seed)
        split = table["split"].copy()
        split[trainval] = np.where(fold_ids == self.fold, "val", "train")
        return split

    def _drop_unreadable(self, table: pd.DataFrame) -> pd.DataFrame:
        bad = find_unreadable(table["path"].tolist(), workers=max(1, self.num_workers))
        if not bad:
            return table
        if self.on_missing == "error":
            raise DataError(
                f"{len(bad)} image(s) cannot be read, e.g. {bad[:5]}. Replace them, or pass "
                f"data.on_missing=skip to leave them out of the run."
            )
        log.warning("Leaving out %d unreadable image(s) (data.on_missing=skip), e.g. %s", len(bad), bad[:5])
        return table[~table["path"].isin(set(bad))]

    def _opened_cache(self) -> ImageCache | None:
        """The image cache that prepare_data() built (this process or another rank's): opened, never
        built here, and refused when it does not match this data."""
        if not self.use_cache:
            return None
        if self.image_cache is None:
            self.setup()
            fingerprint = compute_fingerprint(
                self._cache_images["path"].tolist(),
                self._cache_images["Image Index"].tolist(),
                self.image_size,
                self._label_table_digest,
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
    @property
    def meta_names(self) -> list[str]:
        return [c.removeprefix("meta:") for c in self.meta_cols]

    @property
    def meta_dim(self) -> int:
        return len(self.meta_cols)

    def split_table(self, split: str) -> pd.DataFrame:
        """One split as a DataFrame: label-table columns, ``path``, ``label:*`` and ``meta:*``."""
        if self._tables is None:
            self.setup()
        if split not in SPLITS:
            raise ConfigError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")
        return self._tables[split]

    def save_split(self, out_dir: str | os.PathLike) -> Path:
        """Write the validation patients to ``val_patients.txt`` so that a run can be reproduced."""
        val = np.sort(self.split_table("val")["Patient ID"].unique())
        path = Path(out_dir) / "val_patients.txt"
        files.write_text(path, "".join(f"{p}\n" for p in val))
        return path

    # ----------------------------------------------------------------------------------------
    # Loaders
    def dataset(self, split: str) -> CXRDataset:
        return CXRDataset(
            self.split_table(split),
            label_cols=self.label_cols,
            meta_cols=self.meta_cols,
            image_size=self.image_size,
            cache=self._opened_cache(),
        )

    def loader(self, split: str, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        # A sampler (the benchmark's draws with replacement) replaces shuffling.
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False, sampler=self._eval_sampler("val"))

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False, sampler=self._eval_sampler("test"))

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

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Per batch on the device: the CPU workers only copy uint8 pixels.
        images = batch["image"].float().div_(255.0)
        if self.augment_enabled and self.trainer is not None and self.trainer.training:
            images = self.augmenter.train()(images)
        batch["image"] = augmentation.normalize(images, self.mean, self.std)
        return batch
