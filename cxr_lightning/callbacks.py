"""Lightning callbacks that Lightning itself does not provide."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cxr_lightning import files
from cxr_lightning.progress import duration
from cxr_lightning.run_dir import CHECKPOINTS, LAST_CHECKPOINT

log = logging.getLogger(__name__)


class EpochHistory(pl.callbacks.Checkpoint):
    """One CSV row per epoch with every epoch-level metric: the run's training history.

    Lightning's CSVLogger deletes its file when a run resumes into the same directory; this one
    keeps the epochs before the resume point, so a resumed run ends with its whole history.
    It is a ``Checkpoint`` because Lightning runs those epoch-end hooks after the
    LightningModule's, when the epoch's training metrics exist.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({k: _scalar(v) for k, v in trainer.callback_metrics.items() if "/" in k})
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        history = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()
        if not history.empty:
            history = history[history["epoch"] < trainer.current_epoch]
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        files.write_text(self.path, history.to_csv(index=False))


class LogSampleImages(pl.Callback):
    """Log a grid of the first validation batch, as the model sees it, to TensorBoard once."""

    def __init__(self, n: int = 8) -> None:
        self.n = n
        self.done = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.done or trainer.sanity_checking or batch_idx != 0 or "image" not in batch:
            return
        self.done = True
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        images = batch["image"][: self.n].detach().float().cpu()
        grid = torchvision.utils.make_grid(images, nrow=min(self.n, 8), normalize=True, scale_each=True)
        writer.add_image("samples/val", grid, global_step=trainer.global_step)


def tensorboard_writer(trainer: pl.Trainer):
    """The run's TensorBoard SummaryWriter, or None when no TensorBoard logger is attached."""
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.TensorBoardLogger):
            return logger.experiment
    return None


def _scalar(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class FitThroughput(pl.Callback):
    """Epochs, training images and seconds of this invocation's fit.

    Training time runs from each epoch's start to its last training batch (loading included,
    validation and checkpointing excluded), and images are counted from the batches actually
    trained on, so resumed runs and ``limit_train_batches`` give true rates.
    """

    def __init__(self) -> None:
        self.start_epoch = 0
        self.images = 0
        self.train_seconds = 0.0
        self.fit_seconds = 0.0
        self._fit_started = 0.0
        self._last = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_epoch = trainer.current_epoch
        self._fit_started = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._last
        self._last = now
        self.images += len(batch.get("labels", ())) * trainer.world_size  # none: every image skipped

    def on_train_end(self, trainer, pl_module) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started

    def summary(self, trainer: pl.Trainer) -> dict[str, float | int | None]:
        epochs = trainer.current_epoch - self.start_epoch
        return {
            "epochs": trainer.current_epoch,
            "epochs_this_invocation": epochs,
            "train_images": self.images,
            "fit_seconds": self.fit_seconds,
            "seconds_per_epoch": self.fit_seconds / epochs if epochs else None,
            "train_images_per_second": self.images / self.train_seconds if self.train_seconds else None,
        }


class CheckpointOnSigterm(pl.Callback):
    """Save ``<dirpath>/last.ckpt`` when SIGTERM stops a fit, so ``resume=auto`` loses nothing.

    Lightning catches SIGTERM, finishes the current batch and raises ``SIGTERMException``; this hook
    runs then, while the trainer's state is consistent. Other exceptions (a crash, a NaN loss, Ctrl+C
    in the middle of an optimizer step) save nothing: their state may be broken.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None) -> None:
        self.dirpath = Path(dirpath) if dirpath else None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:
            return
        path = self._dirpath(trainer) / LAST_CHECKPOINT
        trainer.save_checkpoint(path)
        log.warning(
            "SIGTERM: saved %s at epoch %d, global step %d; continue with the same command plus resume=auto.",
            path, trainer.current_epoch, trainer.global_step,
        )

    def _dirpath(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
        return Path(trainer.default_root_dir) / CHECKPOINTS


class EpochLog(pl.callbacks.Checkpoint):
    """One log line per epoch, terminal or not (the progress bar leaves nothing readable in a file):
    ``epoch 3/5  train loss 1.234  val loss 1.301  val AUROC 0.812 (best 0.815 @2)  41 s  eta 1m22s``.

    A ``Checkpoint`` for the reason :class:`EpochHistory` is one: its epoch-end hook runs after the
    LightningModule's, when the epoch's training and validation metrics exist. Epochs count from 1.
    """

    def __init__(self) -> None:
        self.best: tuple[float, int] | None = None
        self._epoch_started = 0.0
        self._seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._epoch_started
        self._seconds.append(seconds)
        epoch, metrics = trainer.current_epoch + 1, trainer.callback_metrics
        parts = [f"epoch {epoch}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0
                 else f"epoch {epoch}"]
        for key, name in (("train/loss", "train loss"), ("val/loss", "val loss")):
            if key in metrics:
                parts.append(f"{name} {_scalar(metrics[key]):.3f}")
        if "val/auroc_mean" in metrics:
            auroc = _scalar(metrics["val/auroc_mean"])
            if auroc == auroc and (self.best is None or auroc > self.best[0]):
                self.best = (auroc, epoch)
            best = f" (best {self.best[0]:.3f} @{self.best[1]})" if self.best is not None else ""
            parts.append(f"val AUROC {auroc:.3f}{best}")
        parts.append(duration(seconds))
        left = (trainer.max_epochs or 0) - epoch
        if left > 0:
            recent = self._seconds[-3:]
            parts.append(f"eta {duration(left * sum(recent) / len(recent))}")
        log.info("  ".join(parts))


class ModelSummary(pl.callbacks.ModelSummary):
    """Lightning's layer table without its FLOPs column and total, which count only models given an
    ``example_input_array`` (ours have none: their input size is a config value) and otherwise
    print a column of zeros."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        # _format_summary_table is Lightning's own text layout; no public switch drops the column.
        from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        lines = [line for line in table.splitlines() if total_flops or "total flops" not in line.lower()]
        log.info("\n%s", "\n".join(lines))
