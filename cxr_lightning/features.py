"""Frozen backbone features of a split, extracted once and kept on disk for the linear probe.

A cache entry is one safetensors file ``<key>.safetensors`` whose name is the SHA-256 of what the
features depend on: the weights (the bytes of the weights file, or how random weights were
drawn), the backbone's config, the preprocessing, the input size, the images (path, size and
modification time of each, in order) and the split. Changing any of them gives another key, so
an entry is never reused for other inputs. An entry is read back only after checking it (its
stored key, shape, dtype, finite values); one that fails is recomputed and overwritten.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr_lightning.errors import DataError
from cxr_lightning.files import atomic_path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Backbone keys with no effect on the features of a frozen network in eval mode.
_TRAINING_ONLY = frozenset({"freeze", "unfreeze_at_epoch", "finetune_lr_scale", "drop_path_rate", "cam_layer",
                            "cam_layers", "cam_stride", "cam_reshape", "min_input_size", "input_multiple",
                            "weights_help", "weights_required", "input_size"})


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(backbone: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """What the backbone's weights are: the digest of every file of its weights (a file, or a
    folder's weight and config files), timm's pretrained tag, or random weights of ``seed``."""
    weights = backbone.get("weights")
    if weights:
        path = Path(str(weights)).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
            else [path]
        return {"files": {p.name if not path.is_dir() else p.relative_to(path).as_posix(): file_digest(p)
                          for p in files}}
    if backbone.get("pretrained"):
        return {"timm_pretrained": str(backbone.get("name"))}
    return {"random_init_seed": int(seed)}


def images_fingerprint(paths: Sequence[str]) -> str:
    """SHA-256 over the images in order: path, size and modification time of each."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    """The cache key of ``parts`` (plain data): SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def feature_key_parts(backbone: Mapping[str, Any], preprocessing: Mapping[str, Any], image_size: int,
                      image_paths: Sequence[str], split: str, seed: int) -> dict[str, Any]:
    """Everything the features of ``split`` depend on (see the module docstring)."""
    return {
        "weights": weights_fingerprint(backbone, seed),
        "backbone": {k: v for k, v in backbone.items() if k not in _TRAINING_ONLY and k != "weights"},
        "preprocessing": dict(preprocessing),
        "image_size": int(image_size),
        "images": images_fingerprint(image_paths),
        "n_images": len(image_paths),
        "split": split,
    }


@torch.no_grad()
def extract_features(backbone: nn.Module, preprocess: nn.Module, loader: Iterable[dict],
                     device: str | torch.device) -> np.ndarray:
    """Pooled features ``(N, F)`` float32 of every batch of ``loader``, in its order, in eval mode."""
    backbone = backbone.to(device).eval()
    out = []
    for batch in loader:
        if batch.get("skipped"):
            # Feature rows must stay aligned with the split's rows (labels, patients, the cache key).
            raise DataError(
                f"{len(batch['skipped'])} image(s) of the split could not be decoded (first: {batch['skipped'][0]}); "
                "the probe needs every image of its splits. Pass data.verify_images=true so unreadable files are "
                "left out of the splits before features are extracted."
            )
        out.append(backbone(preprocess(batch["image"].to(device))).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, int(getattr(backbone, "num_features", 0))), np.float32)


class FeatureCache:
    """Feature matrices on disk under ``directory``, one file per key."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, n_rows: int) -> tuple[np.ndarray, dict[str, str]] | None:
        """The features stored under ``key`` and the entry's metadata, or None when absent or not
        what ``key`` promises."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as handle:
                metadata = dict(handle.metadata() or {})
                stored = metadata.get("key")
                features = handle.get_tensor("features") if "features" in handle.keys() else None
        except Exception as err:  # noqa: BLE001 -- safetensors raises several unrelated types on bad files
            log.warning("feature cache %s is unreadable (%s); extracting again", path, err)
            return None
        if (stored != key or features is None or features.dtype != np.float32 or features.ndim != 2
                or features.shape[0] != n_rows or not np.isfinite(features).all()):
            log.warning("feature cache %s does not hold %d finite float32 rows for its key; extracting again", path,
                        n_rows)
            return None
        return features, metadata

    def save(self, key: str, features: np.ndarray, parts: Mapping[str, Any],
             extra: Mapping[str, str] | None = None) -> Path:
        """Write ``features`` under ``key``; ``parts`` (what the key covers) and ``extra`` go into
        the file's metadata."""
        from safetensors.numpy import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**{str(k): str(v) for k, v in (extra or {}).items()}, "key": key,
                    "parts": json.dumps(parts, sort_keys=True, default=str)}
        with atomic_path(path) as tmp:
            save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, str(tmp), metadata=metadata)
        return path
