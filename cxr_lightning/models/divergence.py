"""A clear stop when training diverges: :func:`check_finite_loss` stops every process when a loss
is NaN/inf, naming the step and the images of the batch."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from cxr_lightning.data import nih
from cxr_lightning.errors import TrainingError

_SHOW = 8  # image names shown in an error message


def check_finite_loss(
    module: pl.LightningModule, batch: Mapping[str, Any], stage: str, loss: torch.Tensor, logits: torch.Tensor
) -> None:
    """Raise :func:`non_finite_loss_error` when ``loss`` is NaN/inf, on every process at once: under DDP
    a rank that stopped alone would leave the others waiting in their next all-reduce until it times out."""
    trainer = module._trainer
    distributed = trainer is not None and trainer.world_size > 1
    if distributed and stage != "train":
        # Ranks may run different numbers of eval batches (no padding, so metrics stay exact): a
        # per-step collective here would meet another rank's metric sync and hang. A NaN eval loss
        # shows in the synced epoch loss, and EarlyStopping(check_finite=True) stops on it.
        return
    finite = bool(torch.isfinite(loss))
    finite_everywhere = trainer.strategy.reduce_boolean_decision(finite, all=True) if distributed else finite
    if finite_everywhere:
        return
    if finite:
        raise TrainingError(
            f"Training stopped: the {stage} loss is NaN/inf on another process at global step "
            f"{module.global_step}; that process's error names the images."
        )
    raise non_finite_loss_error(module, batch, stage, loss, logits)


def non_finite_loss_error(
    module: pl.LightningModule, batch: Mapping[str, Any], stage: str, loss: torch.Tensor, logits: torch.Tensor
) -> TrainingError:
    """A :class:`TrainingError` naming the step, the epoch and the images of a batch whose loss is NaN/inf.

    Rows whose inputs or outputs are themselves non-finite are named when there are any; otherwise
    the whole batch is (the loss is a mean over it).
    """
    trainer = module._trainer
    bad_rows = ~torch.isfinite(logits.detach()).flatten(1).all(1)
    for key in ("image", "meta"):
        if isinstance(batch.get(key), torch.Tensor):
            bad_rows |= ~torch.isfinite(batch[key].detach().float()).flatten(1).all(1)
    blamed = bad_rows if bool(bad_rows.any()) else torch.ones_like(bad_rows)
    rows = batch["index"][blamed.to(batch["index"].device)].tolist() if "index" in batch else []
    names = _image_names(trainer, stage, rows)
    which = "images with non-finite inputs or outputs" if bool(bad_rows.any()) else f"the batch's {len(names)} images"
    shown = ", ".join(names[:_SHOW]) + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")
    where = "outside a Trainer"
    if trainer is not None:
        where = f"global step {module.global_step}, epoch {module.current_epoch}"
    kept = _last_checkpoint(trainer)
    return TrainingError(
        f"Training stopped: the {stage} loss is {loss.item()} at {where}; {which}: {shown or 'unknown'}. "
        f"Nothing is saved from this state ({kept}). Check those images and their label-table rows; if they "
        "are fine, training diverged: lower optimizer.lr, set trainer.gradient_clip_val=1.0 or use "
        "trainer.precision=32-true, then restart from the last good checkpoint (ckpt_path=FILE)."
    )


def _image_names(trainer: pl.Trainer | None, stage: str, rows: list[int]) -> list[str]:
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    try:
        table = datamodule.split_table(stage)
        return table[nih.IMAGE].iloc[rows].astype(str).tolist()
    except Exception:  # no data module (a bare model) or another layout: name the rows
        return [f"{stage} row {r}" for r in rows]


def _last_checkpoint(trainer: pl.Trainer | None) -> str:
    for callback in getattr(trainer, "checkpoint_callbacks", None) or ():
        if (
            isinstance(callback, ModelCheckpoint)
            and callback.last_model_path
            and Path(callback.last_model_path).is_file()
        ):
            return f"the last good checkpoint is {callback.last_model_path}"
    return "no checkpoint was written before it"
