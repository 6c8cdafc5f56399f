"""Fault tolerance: resuming interrupted runs, checkpoints that survive crashes and SIGTERM, and a
clear stop when training diverges.

- :func:`resolve_resume` turns ``resume=auto|PATH`` (or ``ckpt_path=``) into the run directory to
  write into and the checkpoint to continue from.
- :class:`AtomicCheckpointIO` writes every checkpoint Lightning saves to a temporary file beside it
  and renames it into place, and refuses to write a model whose weights are no longer finite.
- :class:`CheckpointOnSigterm` saves ``checkpoints/last.ckpt`` when a SIGTERM (SLURM preemption,
  ``kill``) stops a fit; Lightning defers the signal to the end of the current batch.
- :func:`check_finite_loss` stops every process when a loss is NaN/inf, naming the step and images.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from cxr_lightning import files
from cxr_lightning.errors import CheckpointError, ConfigError, TrainingError

log = logging.getLogger(__name__)

# The exit status of a process ended by SIGTERM, so schedulers see a preempted run as not finished.
EXIT_SIGTERM = 128 + int(signal.SIGTERM)
LAST_CHECKPOINT = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
# Keys that differ between two invocations of the same experiment.
RUN_SPECIFIC_KEYS = ("paths", "hydra", "resume", "ckpt_path")
RESUMED_NOTE = "resumed_into.txt"
_SHOW = 8  # image names shown in an error message


# --------------------------------------------------------------------------------------------------
# Resuming


def resolve_resume(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """The config to run (``paths.output_dir`` pointing at the run to continue) and the checkpoint.

    ``resume=null``: a new run; ``ckpt_path=FILE`` starts it from that checkpoint's training state.
    ``resume=auto``: continue this output directory if it holds a checkpoint to resume from
    (:func:`latest_checkpoint`); else the most recent interrupted run (such a checkpoint, no
    ``metrics.json``) beside it whose ``config.yaml`` matches this config; else start a new run.
    ``resume=DIR`` (a run directory) or ``resume=DIR/checkpoints/X.ckpt``: continue that run from
    that checkpoint.
    Continuing another directory leaves a ``resumed_into.txt`` note in this invocation's directory.
    """
    from cxr_lightning.build import resolve_ckpt_path

    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    out = Path(cfg.paths.output_dir)
    if resume and ckpt_path:
        raise ConfigError(
            f"resume={resume} and ckpt_path={ckpt_path} both given: resume continues a run directory, "
            "ckpt_path starts a new run from a checkpoint file. Pass one of them."
        )
    if not resume:
        return cfg, resolve_ckpt_path(ckpt_path, out)
    if str(resume) == "auto":
        run = find_interrupted_run(cfg)
        if run is None:
            log.info("resume=auto: no interrupted run of this config beside %s; starting a new run.", out)
            return cfg, None
        checkpoint = latest_checkpoint(run)
    else:
        run, checkpoint = _run_of(Path(str(resume)).expanduser())
        differences = config_differences(cfg, run)
        if differences:
            log.warning("resume=%s: this config differs from the run's config.yaml: %s", resume, "; ".join(differences))
    if run.resolve() != out.resolve():
        if rank_zero_only.rank == 0:
            files.write_text(out / RESUMED_NOTE, f"This invocation continued the run in {run}\nfrom {checkpoint}\n")
        cfg = copy.deepcopy(cfg)
        cfg.paths.output_dir = str(run)
    log.info("Resuming %s from %s", run, checkpoint)
    return cfg, str(checkpoint)


def find_interrupted_run(cfg: DictConfig) -> Path | None:
    """The run ``resume=auto`` continues: see :func:`resolve_resume`."""
    out = Path(cfg.paths.output_dir)
    if latest_checkpoint(out) is not None:
        return out  # hydra.run.dir=<old run> resume=auto
    if not out.parent.is_dir():
        return None
    interrupted = [d for d in out.parent.iterdir() if d.is_dir() and d != out and _is_interrupted(d)]
    matching = [d for d in interrupted if not config_differences(cfg, d)]
    if interrupted and not matching:
        nearest = max(interrupted, key=_last_checkpoint_time)
        log.info(
            "resume=auto: %d interrupted run(s) beside %s have another config (e.g. %s: %s).",
            len(interrupted), out, nearest.name, "; ".join(config_differences(cfg, nearest)[:3]),
        )
    return max(matching, key=_last_checkpoint_time, default=None)


def config_differences(cfg: DictConfig, run: Path) -> list[str]:
    """``key: saved -> current`` for every setting in which ``cfg`` differs from ``run/config.yaml``,
    ignoring :data:`RUN_SPECIFIC_KEYS`; a run without a readable config.yaml differs in everything."""
    saved_path = run / "config.yaml"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    except Exception as exc:  # missing or unreadable: it cannot be matched
        return [f"{saved_path} unreadable ({type(exc).__name__})"]
    # Resolve as if this config ran in that directory, so paths derived from it compare equal.
    current = copy.deepcopy(cfg)
    current.paths.output_dir = str(run)
    flat_saved = _flatten(_without_run_keys(saved))
    flat_current = _flatten(_without_run_keys(OmegaConf.to_container(current, resolve=True)))
    keys = sorted(set(flat_saved) | set(flat_current))
    return [
        f"{k}: {flat_saved.get(k, '<absent>')} -> {flat_current.get(k, '<absent>')}"
        for k in keys
        if flat_saved.get(k, "<absent>") != flat_current.get(k, "<absent>")
    ]


def latest_checkpoint(run: Path) -> Path | None:
    """The newer of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` files Lightning writes
    when SLURM signals a requeue (``--signal=USR1@90``); None when the run has neither."""
    candidates = [run / "checkpoints" / LAST_CHECKPOINT, *run.glob("hpc_ckpt_*.ckpt")]
    return max((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)


def _run_of(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for ``resume=PATH``."""
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise CheckpointError(
                f"resume={path}: no checkpoints/{LAST_CHECKPOINT} in that folder. Pass a training run "
                "directory (outputs/<task>/<time>/) or one of its checkpoints/*.ckpt files."
            )
        return path, checkpoint
    if path.is_file():
        if path.parent.name != "checkpoints":
            raise CheckpointError(
                f"resume={path}: the checkpoint is not inside a run directory's checkpoints/ folder. "
                f"To start a new run from it, pass ckpt_path={path} instead."
            )
        return path.parent.parent, path
    raise CheckpointError(f"resume={path} does not exist; pass a run directory, a .ckpt file, or resume=auto.")


def _is_interrupted(run: Path) -> bool:
    return latest_checkpoint(run) is not None and not _has_complete_metrics(run)


def _has_complete_metrics(run: Path) -> bool:
    try:
        return isinstance(json.loads((run / "metrics.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def _last_checkpoint_time(run: Path) -> float:
    return latest_checkpoint(run).stat().st_mtime


def _without_run_keys(container: Any) -> dict:
    return {k: v for k, v in dict(container).items() if k not in RUN_SPECIFIC_KEYS}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


# --------------------------------------------------------------------------------------------------
# Checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint is written to a temporary file in its folder, synced and renamed into place.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a copy
    (not atomic) when that folder is on another file system. A model whose weights hold NaN/inf is
    not written at all, so a diverged state never replaces the last good checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        bad = non_finite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingError(
                f"Not writing checkpoint {path}: the model's weights hold NaN/inf values ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}), so training has diverged. The checkpoints already in "
                f"{path.parent} are kept. Lower optimizer.lr, set trainer.gradient_clip_val=1.0 or use "
                "trainer.precision=32-true, and restart from the last good checkpoint (ckpt_path=FILE)."
            )
        with files.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def non_finite_weights(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` with any NaN or inf."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


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
        return Path(trainer.default_root_dir) / "checkpoints"


# --------------------------------------------------------------------------------------------------
# Divergence


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
        return table["Image Index"].iloc[rows].astype(str).tolist()
    except Exception:  # no data module (a bare model) or another layout: name the rows
        return [f"{stage} row {r}" for r in rows]


def _last_checkpoint(trainer: pl.Trainer | None) -> str:
    callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        last = Path(callback.dirpath) / LAST_CHECKPOINT
        if last.is_file():
            return f"the last good checkpoint is {last}"
    return "no checkpoint was written before it"
