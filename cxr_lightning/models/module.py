"""``CXRClassifier``: preprocessing -> backbone -> head -> loss and metrics, as a LightningModule.

Everything needed to use a trained model later (label names, metadata layout, image size and
normalisation, loss weights, the composed config) is a constructor argument and therefore saved
in every checkpoint's hyperparameters; :func:`cxr_lightning.checkpoints.load_model` rebuilds the
model from the checkpoint alone. The label names and metadata layout come from the config, so
the model is built before any data is read; the two facts that need the training split (class
weights and the age used for missing ages) are taken from the data module in :meth:`setup`, when
the Trainer has set it up, and recorded in the hyperparameters from there.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.losses import create_loss
from cxr_lightning.metrics import LabelMetrics
from cxr_lightning.models import finetune
from cxr_lightning.models.backbones import backbone_from_config, cam_layer_of
from cxr_lightning.models.box_guidance import FUSIONS, box_attention_loss, box_targets, capture_output, warmup_factor
from cxr_lightning.models.divergence import check_finite_loss
from cxr_lightning.models.folders import resolve as resolve_backbone
from cxr_lightning.models.heads import create_head, head_uses_image
from cxr_lightning.models.param_groups import param_groups
from cxr_lightning.models.preprocess import DEFAULT_MEAN, DEFAULT_STD, UNIT_RANGE, Preprocess
from cxr_lightning.models.reshape import ReshapeTransform, cam_reshape_transform

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")
# The loss config's keys of the box term (read here), not of the classification loss.
BOX_KEYS = ("box_weight", "box_warmup_epochs", "box_fusion")
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class CXRClassifier(pl.LightningModule):
    def __init__(
        self,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        label_names: Sequence[str],
        meta_names: Sequence[str],
        image_size: int,
        label_space: str = "nih14",
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
        input_range: Sequence[float] = UNIT_RANGE,
        pos_frac: Sequence[float] | None = None,
        age_fill: float | None = None,
        sampler: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        config: Mapping[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        scheduler_factory: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        # A folder format's architecture and normalisation, read from its weights folder, travel in
        # the hyperparameters: the checkpoint rebuilds the model without the folder.
        backbone = resolve_backbone(backbone)
        # The factories are code, built from the optimizer/scheduler configs (kept as plain data).
        self.save_hyperparameters(ignore=["optimizer_factory", "scheduler_factory"])
        self.hparams.backbone = backbone
        self.optimizer_factory, self.scheduler_factory = optimizer_factory, scheduler_factory
        self.preprocess = Preprocess(mean, std, input_range)
        self.label_names = list(label_names)
        self.meta_names = list(meta_names)
        head_cfg = dict(head)
        head_name = head_cfg.pop("name")
        # metadata_only has no image branch: no backbone to build, run or keep in DDP's buckets.
        self.backbone: nn.Module | None = None
        in_features = 0
        if head_uses_image(head_name):
            self.backbone = backbone_from_config(backbone, image_size)
            in_features = self.backbone.num_features
        # Head first, then the backbone (see models/finetune.py): a function of the epoch only.
        self.finetune = finetune.FinetuneSchedule.from_config(backbone)
        if self.backbone is not None and self.finetune.freeze and not self.finetune.staged:
            self.backbone.requires_grad_(False)
        self.head = create_head(
            head_name,
            in_features=in_features,
            meta_dim=len(self.meta_names),
            num_labels=len(self.label_names),
            **head_cfg,
        )
        self.box_weight = float(loss.get("box_weight", 0.0))
        if self.box_weight < 0 or (self.box_weight > 0 and self.backbone is None):
            raise ConfigError(f"loss.box_weight={self.box_weight}: must be >= 0, and > 0 needs a head that sees the "
                              f"image (not head={head_name}).")
        self.box_warmup_epochs = float(loss.get("box_warmup_epochs", 0.0) or 0.0)
        self.box_fusion = str(loss.get("box_fusion", "union"))
        if self.box_warmup_epochs < 0:
            raise ConfigError(
                f"loss.box_warmup_epochs={self.box_warmup_epochs}: must be >= 0 (0: full weight from the start)."
            )
        if self.box_fusion not in FUSIONS:
            raise ConfigError(f"loss.box_fusion={self.box_fusion!r}: expected one of {list(FUSIONS)}.")
        # (image, finding) pairs the box term was computed on, this process: metrics.json reports it.
        self.box_pairs_seen = 0
        self.box_loss_sum, self.box_loss_steps = 0.0, 0  # the term's mean over the steps with boxes
        self.criterion: nn.Module | None = None
        if pos_frac is not None:
            self._build_criterion(pos_frac)
        # Attributes, not a ModuleDict: "train" would shadow nn.Module.train.
        self.train_metrics = LabelMetrics(self.label_names)
        self.val_metrics = LabelMetrics(self.label_names)
        self.test_metrics = LabelMetrics(self.label_names)
        # The epoch's mean loss as torchmetrics too, weighted by batch size and summed across DDP
        # ranks on compute(): every cross-rank sync then happens in _log_metrics, on every rank in
        # the same order. Lightning's self.log(sync_dist=True) would all-reduce wherever a
        # rank-zero-only callback (the progress bar) first reads the epoch's metrics, out of step
        # with the label metrics' all-gathers on the other ranks: a DDP deadlock.
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train()

    def _build_criterion(self, pos_frac: Sequence[float]) -> None:
        pos = torch.tensor(list(pos_frac), dtype=torch.float32)
        loss_cfg = dict(self.hparams.loss)
        for key in BOX_KEYS:
            loss_cfg.pop(key, None)
        self.criterion = create_loss(loss_cfg.pop("name"), pos_weight=1.0 - pos, neg_weight=pos, **loss_cfg)
        self.criterion.to(self.device)

    def setup(self, stage: str) -> None:
        """Take the class weights (of the training images as the data module's sampler feeds
        them) and the age fill from the training split, once (a checkpoint already carries them)."""
        if self.criterion is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "label_stats"):
            raise ConfigError(
                "This model has no class weights yet: fit it with a CXRDataModule (trainer.fit(model, datamodule=dm)), "
                "or build it with pos_frac=... ."
            )
        for what, mine, theirs in (
            ("labels", self.label_names, dm.label_names),
            ("metadata", self.meta_names, dm.meta_names),
        ):
            if list(theirs) != list(mine):
                raise DataError(f"The data module gives {what} {list(theirs)}, the model was built for {list(mine)}.")
        self.hparams.pos_frac = [float(v) for v in dm.label_stats["pos_frac"]]
        self.hparams.age_fill = float(dm.age_fill)
        self.hparams.sampler = dict(getattr(dm, "sampler_record", {"name": "random"}))
        self._build_criterion(self.hparams.pos_frac)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Once per batch on the device: dataloader workers only copy uint8 pixels. Lightning's
        # to_onnx also sends its (image, meta) example through here; that is the graph's input.
        if not isinstance(batch, dict):
            return batch
        trainer = self._trainer
        skipped = batch.pop("skipped", None)  # files this batch could not decode (data.on_missing=skip)
        if skipped and trainer is not None and hasattr(trainer.datamodule, "record_skipped"):
            trainer.datamodule.record_skipped(skipped)
        if "image" not in batch:  # every image of the batch was skipped
            return batch
        training = trainer is not None and trainer.training
        augment = getattr(trainer.datamodule, "augment", None) if training else None
        batch["image"] = self.preprocess(batch["image"], augment.train() if augment is not None else None)
        if training and self.box_weight > 0 and "box_labels" in batch:
            batch["box_pairs"], batch["box_masks"] = box_targets(
                batch.pop("boxes"), batch.pop("box_labels"), tuple(batch["image"].shape[-2:]), augment,
                box_readers=batch.pop("box_readers", None), fusion=self.box_fusion,
            )
        return batch

    def train(self, mode: bool = True) -> "CXRClassifier":
        # A frozen backbone stays in eval mode: Lightning (and users) call train() on the whole model.
        super().train(mode)
        finetune.set_backbone_mode(self.backbone, self.finetune, self.current_epoch, mode)
        return self

    # ------------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            features = meta.new_zeros(meta.shape[0], 0)
        else:
            if self.hparams.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            features = self.backbone(image)
        return self.head(features, meta)

    @property
    def cam_layer(self) -> nn.Module | None:
        """The layer Grad-CAM hooks, named by the backbone's config; None for head=metadata_only
        (no image branch; predict and explain refuse it first). Not an error: TorchScript tracing
        reads every attribute of the model."""
        if self.backbone is None:
            return None
        return self.backbone.get_layer(self.cam_layer_name)

    @property
    def cam_layer_name(self) -> str:
        """The dotted path of :attr:`cam_layer`: the config's ``cam_layer``, else its ``cam_layers``
        entry at ``cam_stride``."""
        return cam_layer_of(self.hparams.backbone)

    def cam_reshape(self, input_hw: Sequence[int]) -> ReshapeTransform | None:
        """pytorch_grad_cam's ``reshape_transform`` for ``cam_layer`` on ``input_hw`` inputs:
        token outputs (``backbone.cam_reshape: vit | swin``) as a ``(B, C, h, w)`` map."""
        if self.backbone is None:
            raise ConfigError("head=metadata_only has no image branch to explain.")
        return cam_reshape_transform(self.hparams.backbone.get("cam_reshape"), self.backbone.model, input_hw)

    def _step(self, batch: dict, stage: str) -> torch.Tensor | None:
        if "image" not in batch:  # a batch of only undecodable images (data.on_missing=skip): nothing to learn
            return None
        if stage == "train" and self.box_weight > 0:
            return self._box_guided_step(batch)
        logits = self(batch["image"], batch["meta"])
        return self._scored(batch, stage, logits, self.criterion(logits, batch["labels"]))

    def _box_guided_step(self, batch: dict) -> torch.Tensor:
        if "box_pairs" not in batch:
            raise ConfigError("loss.box_weight > 0 needs training batches with boxes: build the data module with "
                              "train_boxes=True (cxr_lightning.tasks.build.build_datamodule does).")
        weight = self.box_weight * self._box_warmup()
        if weight == 0.0:  # the warm-up's first step: the classifier alone, no second backward
            logits = self(batch["image"], batch["meta"])
            self.log("train/box_weight", 0.0, on_step=True, on_epoch=False, sync_dist=False)
            return self._scored(batch, "train", logits, self.criterion(logits, batch["labels"]))
        with capture_output(self.cam_layer) as outputs:
            logits = self(batch["image"], batch["meta"])
        if not outputs:
            raise ConfigError(f"loss.box_weight > 0: the CAM layer {self.cam_layer_name!r} gave no output "
                              "to guide (a compiled backbone can hide it); set compile=false.")
        box_loss = box_attention_loss(outputs[-1], logits, batch["box_pairs"], batch["box_masks"])
        self.log("train/box_loss", box_loss.detach(), on_step=True, on_epoch=False, sync_dist=False)
        self.log("train/box_weight", weight, on_step=True, on_epoch=False, sync_dist=False)
        self.box_pairs_seen += len(batch["box_pairs"])
        if len(batch["box_pairs"]):
            self.box_loss_sum += float(box_loss.detach())
            self.box_loss_steps += 1
        loss = self.criterion(logits, batch["labels"]) + weight * box_loss
        return self._scored(batch, "train", logits, loss)

    def _box_warmup(self) -> float:
        trainer = self._trainer
        batches = trainer.num_training_batches if trainer is not None else 1
        steps = int(batches) if batches != float("inf") else 1
        return warmup_factor(int(self.global_step), steps, self.box_warmup_epochs)

    def _scored(self, batch: dict, stage: str, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        check_finite_loss(self, batch, stage, loss, logits)
        getattr(self, f"{stage}_metrics").update(logits.detach().float(), batch["labels"])
        getattr(self, f"{stage}_loss").update(loss.detach().float(), weight=len(logits))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch["image"], batch["meta"]))

    def _log_metrics(self, stage: str) -> None:
        metric, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        self.log(f"{stage}/loss", loss.compute(), prog_bar=True, sync_dist=False)  # already synced
        values = metric.compute()
        skipped = metric.skipped_labels()
        if skipped and not self.trainer.sanity_checking:
            valid = len(self.label_names) - len(skipped)
            log.warning(
                "%s AUROC mean over %d/%d labels: no positives or no negatives for %s",
                stage, valid, len(self.label_names), ", ".join(skipped),
            )
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False)
        metric.reset()
        loss.reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")
        # The next epoch's rates before the epoch-start hooks (the learning-rate monitor) read them.
        finetune.apply_hold(self.optimizers(use_pl_optimizer=False), self.finetune, self.current_epoch + 1)

    def on_train_start(self) -> None:
        finetune.apply_hold(self.optimizers(use_pl_optimizer=False), self.finetune, self.current_epoch)

    def on_train_epoch_start(self) -> None:
        finetune.apply_hold(self.optimizers(use_pl_optimizer=False), self.finetune, self.current_epoch)
        self.train()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        finetune.drop_frozen_gradients(self.backbone, self.finetune, self.current_epoch)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        optimizer = scheduler.optimizer
        with finetune.scheduled_rates(optimizer):
            super().lr_scheduler_step(scheduler, metric)
        # An epoch-interval scheduler steps at the end of the epoch: its rates are the next epoch's.
        interval = next((c.interval for c in self.trainer.lr_scheduler_configs if c.scheduler is scheduler), "epoch")
        finetune.apply_hold(optimizer, self.finetune, self.current_epoch + (interval == "epoch"))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ConfigError(
                "No optimizer: build the model with cxr_lightning.tasks.build.build_model(cfg), which makes "
                "one from the optimizer config (optimizer=adam|adamw|sgd)."
            )
        backbone = self.backbone.model if self.backbone is not None else None
        optimizer = self.optimizer_factory(
            param_groups(backbone, self.head, self.hparams.optimizer, self.hparams.backbone)
        )
        if self.scheduler_factory is None:
            return optimizer
        interval = (self.hparams.scheduler or {}).get("interval", "epoch")
        # A per-step schedule counts optimiser steps: it is told how many make an epoch.
        steps = {"steps_per_epoch": self._steps_per_epoch()} if interval == "step" else {}
        # monitor is read by ReduceLROnPlateau only.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer, **steps),
                                                         "monitor": "val/loss", "interval": interval}}

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        return max(1, math.ceil(trainer.estimated_stepping_batches / max(1, trainer.max_epochs or 1)))
