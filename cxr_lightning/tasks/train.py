"""The train task behind ``python -m cxr_lightning.train [group=option ...]``: fit, test the best
checkpoint and write ``metrics.json``.

Example: ``python -m cxr_lightning.train backbone=efficientnet_b3 head=fusion_residual``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from cxr_lightning import files
from cxr_lightning.callbacks import FitThroughput
from cxr_lightning.checkpoints import AtomicCheckpointIO
from cxr_lightning.data import nih
from cxr_lightning.run_dir import RunDir
from cxr_lightning.selection import selection_mode
from cxr_lightning.tasks.build import box_weight, build_callbacks, build_datamodule, build_model, with_cam_layer
from cxr_lightning.tasks.resume import resolve_resume
from cxr_lightning.tasks.validate import validate_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint and write ``metrics.json``; returns the metrics."""
    cfg, ckpt_path = _resolve_and_check(cfg)
    run = _run_dir(cfg)
    dm, model = build_datamodule(cfg), build_model(cfg)
    throughput = FitThroughput()
    trainer = _build_trainer(cfg, run, [*build_callbacks(cfg), throughput])
    if trainer.is_global_zero:
        files.write_text(run.config, OmegaConf.to_yaml(cfg, resolve=True))
    fit_metrics = _fit(trainer, model, dm, ckpt_path, run)
    checkpoint = _monitoring_checkpoint(trainer)
    test_metrics = _test_best(trainer, model, dm, cfg, checkpoint)
    metrics = _run_metrics(cfg, run, trainer, model, dm, throughput, checkpoint, fit_metrics, test_metrics)
    if trainer.is_global_zero:
        _write_metrics(run, metrics)
    return metrics


def _resolve_and_check(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """Which run directory and checkpoint (resume=auto|PATH, ckpt_path=FILE), then every cheap check,
    then the seed."""
    # The CAM layer by name first: a run's config.yaml names it, and resume=auto compares configs.
    cfg = with_cam_layer(cfg)
    cfg, ckpt_path = resolve_resume(cfg)
    validate_config(cfg, ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    return cfg, ckpt_path


def _run_dir(cfg: DictConfig) -> RunDir:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return RunDir(out)


def _build_trainer(cfg: DictConfig, run: RunDir, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The configured Trainer with its loggers and the atomic, trust-checking checkpoint IO."""
    # A progress bar redrawn in a file (nohup, SLURM, CI) is noise; EpochLog's lines say it there.
    bar = {} if sys.stdout.isatty() else {"enable_progress_bar": False}
    if bar:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=[hydra.utils.instantiate(c) for c in cfg.get("logger", {}).values()],
        plugins=[AtomicCheckpointIO(trust=bool(cfg.get("trust_checkpoint", False)), run_dir=run.root)],
        **bar,
    )


def _fit(
    trainer: pl.Trainer, model: pl.LightningModule, dm: Any, ckpt_path: str | None, run: RunDir
) -> dict[str, float]:
    """Fit (resuming from ``ckpt_path``), save the split, and return the metrics the fit ended with."""
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        dm.save_split(run.root)
    # Read before testing: trainer.test replaces the callback metrics.
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _monitoring_checkpoint(trainer: pl.Trainer) -> pl.callbacks.ModelCheckpoint | None:
    # trainer.checkpoint_callback may be another Checkpoint subclass than the monitoring one.
    return next(
        (c for c in trainer.callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor), None
    )


def _best_path(checkpoint: pl.callbacks.ModelCheckpoint | None) -> str:
    return checkpoint.best_model_path if checkpoint is not None else ""


def _test_best(
    trainer: pl.Trainer, model: pl.LightningModule, dm: Any, cfg: DictConfig,
    checkpoint: pl.callbacks.ModelCheckpoint | None,
) -> dict[str, float]:
    """The test metrics of the best checkpoint (of the last weights without one); empty with
    ``test_after_fit=false``."""
    if not cfg.get("test_after_fit", True):
        return {}
    results = trainer.test(model, datamodule=dm, ckpt_path=_best_path(checkpoint) or None)
    return {k: float(v) for k, v in results[0].items()} if results else {}


def _run_metrics(
    cfg: DictConfig, run: RunDir, trainer: pl.Trainer, model: pl.LightningModule, dm: Any,
    throughput: FitThroughput, checkpoint: pl.callbacks.ModelCheckpoint | None,
    fit_metrics: dict[str, float], test_metrics: dict[str, float],
) -> dict[str, Any]:
    """The content of ``metrics.json``: test figures, checkpoints, selection, throughput, data and setup."""
    per_source = pooled_test_figures(model, dm, cfg) if test_metrics and dm.spec.pooled else {}
    boxes = dm.training_boxes() if box_weight(cfg) > 0 else None
    boxes_record = {"count": boxes.count if boxes else 0, "by_source": boxes.by_source if boxes else {}}
    return {
        **{k.replace("/", "."): v for k, v in test_metrics.items()},
        "best_checkpoint": _best_path(checkpoint),
        "last_checkpoint": str(run.last_checkpoint),
        "selection": {
            "metric": cfg.selection.metric,
            "mode": selection_mode(cfg.selection.metric),
            "best": (
                float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None
            ),
        },
        "best_val_loss": _best_val_loss(checkpoint, fit_metrics, cfg.selection.metric),
        **throughput.summary(trainer),
        "params": sum(p.numel() for p in model.parameters()),
        "label_table": dm.label_table_name,
        "label_names": dm.label_names,
        "label_space": dm.space.name,
        "meta_names": dm.meta_names,
        # A pooled run's test figures per source, over the labels each one scores.
        "per_source": per_source,
        "n_images": {s: len(dm.split_table(s)) for s in ("train", "val", "test")},
        "n_patients": {s: int(dm.split_table(s)[nih.PATIENT].nunique()) for s in ("train", "val", "test")},
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "loss": cfg.loss.name,
        # What the training images were drawn by, the class weights it implied, and the boxes
        # (all of training patients) the loss was guided by.
        "sampler": dict(model.hparams.get("sampler") or dm.sampler_record),
        "pos_frac": list(model.hparams.pos_frac or []),
        "box_weight": box_weight(cfg),
        "boxes_trained_on": boxes_record["count"],
        # The same boxes per source and label, the pairs the box term saw, and NIH's protocol.
        "boxes_trained_on_by_source": boxes_record["by_source"],
        "box_pairs_seen": int(model.box_pairs_seen),
        "box_loss_mean": model.box_loss_sum / model.box_loss_steps if model.box_loss_steps else None,
        # Rows of the sources' files no split holds, by reason (laterals, an NIH twin held out...).
        "left_out": {str(k): int(v) for k, v in dm.tables.left_out.items()},
        "box_protocol": dm.box_protocol,
        "seed": cfg.seed,
        "image_size": dm.image_size,
        # Images the loaders could not decode and left out (data.on_missing=skip), each counted once.
        "images_skipped": len(getattr(dm, "skipped_images", ())),
        "images_skipped_files": sorted(getattr(dm, "skipped_images", ()))[:100],
        "final_val": {k.replace("/", "."): v for k, v in fit_metrics.items() if k.startswith("val/")},
    }


def _write_metrics(run: RunDir, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` and log where the run's files are."""
    files.write_json(run.metrics, metrics)
    log.info("Run directory: %s", run.root)
    log.info("  metrics:     %s", run.metrics)
    log.info("  checkpoint:  %s", metrics["best_checkpoint"] or run.checkpoints)
    log.info("  TensorBoard: tensorboard --logdir %s", run.root)


def pooled_test_figures(model: pl.LightningModule, dm: Any, cfg: DictConfig) -> dict[str, Any]:
    """Each source's test mean AUROC with patient-bootstrap intervals (``n_boot``, default 200), for
    the weights ``trainer.test`` restored (the best checkpoint's)."""
    from cxr_lightning import inference
    from cxr_lightning.data.tables import SOURCE
    from cxr_lightning.evaluation.statistics import per_source_auroc

    table = dm.split_table("test")
    probs = inference.predict_probabilities(model, dm.loader("test", shuffle=False), inference.default_device())
    scored = {name: dm.tables.scored_labels(name) for name in dm.tables.per_source}
    return per_source_auroc(table[dm.label_cols].to_numpy(dtype=float), probs, table[nih.PATIENT].to_numpy(),
                            table[SOURCE].to_numpy(), scored, dm.label_names, n_boot=int(cfg.get("n_boot", 200)),
                            seed=int(cfg.seed))


def _best_val_loss(
    checkpoint: pl.callbacks.ModelCheckpoint | None, fit_metrics: dict[str, float], metric: str,
) -> float | None:
    """The best checkpoint's val/loss when it selects by loss; otherwise the last epoch's."""
    if metric == "val/loss":
        return float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None
    return fit_metrics.get("val/loss")
