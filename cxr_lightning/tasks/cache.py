"""The cache task behind ``python -m cxr_lightning.cache``: build (or verify) the image cache
of a data config, exactly where a training run with the same data options looks for it."""
from __future__ import annotations

import os

from omegaconf import DictConfig

from cxr_lightning.data.cache import ImageCache
from cxr_lightning.tasks.build import build_datamodule


def build_cache(cfg: DictConfig) -> ImageCache:
    """Build (or reuse) the cache that the data module of ``cfg.data`` reads, decoding in
    ``cfg.workers`` processes (null: one per core; 0: in this process)."""
    workers = cfg.get("workers")
    dm = build_datamodule(cfg)
    if dm.source == "demo":
        dm.prepare_data()  # the demo must exist before its images can be cached
    return dm.build_cache(workers=(os.cpu_count() or 1) if workers is None else int(workers))
