"""Checks of a composed config that run before any expensive work (data loading, model building).

:func:`validate_config` reads only the config, a folder listing and at most a checkpoint's
hyperparameters, so a typo fails in a second with a message that says what to pass instead,
not after the label table, the image index and a model have been built.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cxr_lightning.checkpoints import checkpoint_hparams
from cxr_lightning.errors import CheckpointError, ConfigError, DataError
from cxr_lightning.models.heads import head_class
from cxr_lightning.tasks.build import expected_label_names, expected_meta_names, optimizer_factory, scheduler_factory

log = logging.getLogger(__name__)
_warned: set[str] = set()


def validate_config(cfg: DictConfig, ckpt_path: str | os.PathLike | None = None) -> None:
    """Raise ConfigError/DataError/CheckpointError for a config that cannot run; ``ckpt_path`` is the
    checkpoint a fit will continue from (see :func:`cxr_lightning.faults.resolve_resume`)."""
    check_data_root(cfg.data)
    check_backbone(cfg.backbone, int(cfg.data.image_size))
    check_head(cfg.head.name)
    check_loss(cfg.loss.name)
    check_optimizer(cfg)
    _check_metadata_use(cfg)
    check_finetuning(cfg.backbone)
    if ckpt_path:
        check_checkpoint_fits(cfg, ckpt_path)


def check_finetuning(backbone: DictConfig) -> None:
    """The head-then-backbone schedule (models/finetune.py) is one the model can follow; it runs the
    same on one device or under DDP (the backbone's parameters are registered from the start)."""
    at, scale = backbone.get("unfreeze_at_epoch"), backbone.get("finetune_lr_scale", 0.1)
    if at is None:
        return
    if not isinstance(at, int) or isinstance(at, bool) or at < 0:
        raise ConfigError(f"backbone.unfreeze_at_epoch={at!r}: expected an epoch number (0, 1, ...) or null.")
    if not backbone.get("freeze"):
        raise ConfigError(
            f"backbone.unfreeze_at_epoch={at} without backbone.freeze=true: the backbone trains from epoch 0 "
            "anyway. Pass backbone.freeze=true to train the head alone first, or backbone.unfreeze_at_epoch=null."
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ConfigError(f"backbone.finetune_lr_scale={scale!r}: expected a positive number (the backbone's lr / lr).")


def check_data_root(data: DictConfig) -> None:
    """The data root exists and holds the label table (a demo without a root is generated later)."""
    from cxr_lightning.data import nih

    # data/nih.yaml says root: ???, which its demo defaults turn into null when composed.
    root = None if OmegaConf.is_missing(data, "root") else data.get("root")
    if not root:
        if data.get("source") == "nih":
            raise ConfigError(
                f"data=nih needs data.root=DIR: the folder holding the NIH download ({nih.LABEL_TABLE}, "
                f"{nih.TRAIN_VAL_LIST}, {nih.TEST_LIST}, {nih.BBOX_TABLE}, images_001/ ... images_012/)."
            )
        return
    table = data.get("label_table", "auto")
    if table == "auto":
        nih.find_label_table(Path(root).expanduser())  # DataError: which files NIH provides, where they go
        return
    path = Path(root).expanduser() / str(table)
    if not path.is_file():
        raise DataError(
            f"data.label_table={table}: {path} does not exist. Put the table in data.root or pass "
            f"data.label_table=auto to use the first of {list(nih.LABEL_TABLES)} found there."
        )


def check_backbone(backbone: DictConfig, image_size: int) -> None:
    from cxr_lightning.models.backbones import check_name_and_pool

    name = str(backbone.name)
    check_name_and_pool(name, backbone.get("global_pool", "avg"))
    minimum = int(backbone.get("min_input_size", 32))
    if image_size < minimum:
        raise ConfigError(
            f"data.image_size={image_size} is below {name}'s minimum input size of {minimum} px; "
            f"pass data.image_size={minimum} or larger."
        )


def check_head(name: str) -> None:
    head_class(name)


def check_loss(name: str) -> None:
    from cxr_lightning.losses import LOSSES

    if name not in LOSSES:
        raise ConfigError(f"loss.name={name!r} is unknown; valid losses: {sorted(LOSSES)} (loss=<name>).")


def check_optimizer(cfg: DictConfig) -> None:
    """The optimizer (and scheduler) configs build, and accept their arguments, on a stand-in parameter."""
    import torch

    probe = [torch.nn.Parameter(torch.zeros(1))]
    try:
        optimizer = optimizer_factory(cfg)(probe)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer={OmegaConf.to_container(cfg.optimizer)}: {exc}") from None
    make_scheduler = scheduler_factory(cfg)
    if make_scheduler is not None:
        try:
            make_scheduler(optimizer)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"scheduler={OmegaConf.to_container(cfg.scheduler, resolve=True)}: {exc}") from None


def check_checkpoint_fits(cfg: DictConfig, ckpt_path: str | os.PathLike) -> None:
    """The checkpoint a fit continues from has this config's labels, metadata, backbone and head."""
    hparams = checkpoint_hparams(ckpt_path, trust=bool(cfg.get("trust_checkpoint", False)))
    problems = []
    labels = expected_label_names(cfg.data)
    if list(hparams["label_names"]) != labels:
        problems.append(
            f"it predicts {len(hparams['label_names'])} labels, this config {len(labels)} "
            "(set data.drop_no_finding as in that run)"
        )
    meta = expected_meta_names(cfg.data)
    if list(hparams.get("meta_names", [])) != meta:
        problems.append(
            f"it expects metadata {_short(hparams.get('meta_names', []))}, this config gives {_short(meta)} "
            "(set data.prior_labels and data.drop_no_finding as in that run)"
        )
    for group in ("backbone", "head"):
        trained = (hparams.get(group) or {}).get("name")
        if trained is not None and trained != cfg[group].name:
            problems.append(f"it was trained with {group}.name={trained}, this config asks for {cfg[group].name}")
    if problems:
        raise CheckpointError(
            f"Cannot continue training from {ckpt_path}: " + "; ".join(problems)
            + ". Use the checkpoint's settings, or start a new run (resume=null ckpt_path=null)."
        )


def _check_metadata_use(cfg: DictConfig) -> None:
    head = head_class(cfg.head.name)
    if cfg.data.get("prior_labels", True) and not getattr(head, "uses_meta", True):
        _warn_once(
            f"head={cfg.head.name} ignores metadata, so data.prior_labels=true only adds inputs the model "
            "never reads; use head=fusion or fusion_residual to learn from prior visits."
        )


def _warn_once(message: str) -> None:
    # Once per process: a sweep running many fits in one process should not repeat it.
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return f"{names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)} values)"
