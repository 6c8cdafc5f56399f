"""Turn a composed Hydra config into the objects a run needs: data module, model, callbacks."""
from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import CheckpointError, ConfigError, CXRError
from cxr_lightning.models.module import CXRClassifier


def build_datamodule(cfg: DictConfig) -> CXRDataModule:
    """Instantiate and set up the data module: the model needs its label names and metadata width.

    Its ``prepare_data`` (demo generation, image cache build) is left to ``Trainer.fit``, which runs
    it on one process per node and makes the other DDP ranks wait for it."""
    dm: CXRDataModule = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return dm


def instantiate(cfg, **kwargs):
    """``hydra.utils.instantiate`` that lets the framework's own errors through unwrapped."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except hydra.errors.InstantiationException as exc:
        if isinstance(exc.__cause__, CXRError):
            raise exc.__cause__ from None
        raise


def build_model(cfg: DictConfig, dm: CXRDataModule) -> CXRClassifier:
    model = CXRClassifier(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        head=OmegaConf.to_container(cfg.head, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        label_names=dm.label_names,
        meta_names=dm.meta_names,
        pos_frac=dm.label_stats["pos_frac"].tolist(),
        image_size=dm.image_size,
        mean=dm.mean,
        std=dm.std,
        age_fill=dm.age_fill,
        channels_last=use_channels_last(cfg),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if cfg.get("compile", False) and model.backbone is not None:
        # In place: the state dict keeps its keys, so checkpoints load into uncompiled models.
        model.backbone.compile()
    return model


def use_channels_last(cfg: DictConfig) -> bool:
    """The ``channels_last`` key: true, false, or auto (on when the trainer runs on a CUDA GPU)."""
    value = cfg.get("channels_last", "auto")
    if value == "auto":
        accelerator = str(cfg.trainer.get("accelerator", "auto"))
        return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if not isinstance(value, bool):
        raise ConfigError(f"channels_last={value!r}: expected true, false or auto.")
    return value


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    unfreeze_at = cfg.backbone.get("unfreeze_at_epoch")
    if cfg.backbone.get("freeze") and unfreeze_at is not None:
        # Head first, then the backbone at a smaller learning rate (the seed's EfficientNet-B3 recipe).
        callbacks.append(
            pl.callbacks.BackboneFinetuning(
                unfreeze_backbone_at_epoch=int(unfreeze_at),
                lambda_func=_keep_lr,
                backbone_initial_ratio_lr=float(cfg.backbone.get("finetune_lr_scale", 0.1)),
                should_align=False,
                train_bn=True,
            )
        )
    return callbacks


def _keep_lr(epoch: int) -> float:
    return 1.0


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``auto`` resumes from the run directory's ``last.ckpt`` when there is one."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; pass an existing .ckpt file or ckpt_path=auto.")
    return ckpt_path
