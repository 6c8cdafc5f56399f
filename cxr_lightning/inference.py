"""Running a trained checkpoint over a data split: shared by evaluate, explain and compare."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.models.module import CXRClassifier


def resolve_checkpoint(ckpt_path: str | None, run_dir: str | None) -> Path:
    """``ckpt_path`` as given, or the best checkpoint recorded in ``run_dir/metrics.json``."""
    if ckpt_path:
        return Path(ckpt_path)
    if not run_dir:
        raise ConfigError("Pass ckpt_path=PATH (a .ckpt file) or run_dir=DIR (a training run directory).")
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.is_file():
        best = json.loads(metrics_path.read_text()).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    raise CheckpointError(f"{run_dir} holds no finished run (no metrics.json best checkpoint, no checkpoints/last.ckpt).")


def datamodule_for(model: CXRClassifier, data: Mapping[str, Any] | None = None, **overrides: Any) -> CXRDataModule:
    """The data module the checkpoint was trained on (its composed config), with ``data``/``overrides``
    applied, checked to produce the labels and metadata layout the model expects."""
    trained = dict(model.hparams.config["data"]) if model.hparams.get("config") else {}
    cfg = {**trained, **(dict(data) if data else {}), **overrides}
    cfg.pop("_target_", None)
    cfg["image_size"] = model.hparams.image_size
    dm = CXRDataModule(**cfg)
    dm.prepare_data()
    dm.setup("test")
    check_compatible(model, dm)
    return dm


def check_compatible(model: CXRClassifier, dm: CXRDataModule) -> None:
    if list(dm.label_names) != list(model.hparams.label_names):
        raise CheckpointError(
            f"The checkpoint predicts {len(model.hparams.label_names)} labels {list(model.hparams.label_names)}, "
            f"the data gives {len(dm.label_names)} {list(dm.label_names)}; set data.drop_no_finding to match the checkpoint."
        )
    if list(dm.meta_names) != list(model.hparams.meta_names):
        raise CheckpointError(
            f"The checkpoint expects metadata {list(model.hparams.meta_names)}, the data gives {list(dm.meta_names)}; "
            "set data.prior_labels (and drop_no_finding) as in training."
        )


@torch.no_grad()
def predict_split(
    model: CXRClassifier, dm: CXRDataModule, split: str, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, pd.DataFrame]:
    """Probabilities ``(N, L)`` for every image of ``split``, with the split's table in the same order."""
    model = model.to(device).eval()
    probs = []
    for batch in dm.loader(split, shuffle=False):
        batch = dm.on_after_batch_transfer({k: v.to(device) for k, v in batch.items()}, 0)
        probs.append(torch.sigmoid(model(batch["image"], batch["meta"])).float().cpu())
    return torch.cat(probs).numpy(), dm.split_table(split)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def output_dir(explicit: str | os.PathLike | None, run_dir: str | None, name: str) -> Path:
    """Where an evaluate/explain job writes: ``explicit``, else ``<run_dir>/<name>``."""
    if explicit:
        return Path(explicit)
    if run_dir:
        return Path(run_dir) / name
    raise ConfigError(f"Pass output_dir=DIR or run_dir=DIR for the {name} outputs.")
