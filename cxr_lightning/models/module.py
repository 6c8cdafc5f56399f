"""``CXRClassifier``: backbone -> head -> loss and metrics, as a LightningModule.

Everything needed to use a trained model later (label names, metadata layout, image size and
normalisation, loss weights, the composed config) is a constructor argument and therefore saved
in every checkpoint's hyperparameters; :func:`load_model` rebuilds the model from the checkpoint
alone.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torchmetrics import MeanMetric

from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.faults import check_finite_loss
from cxr_lightning.losses import create_loss
from cxr_lightning.metrics import LabelMetrics
from cxr_lightning.models.backbones import create_backbone
from cxr_lightning.models.heads import create_head

log = logging.getLogger(__name__)
# _log_metrics logs values torchmetrics has already synchronised across DDP ranks.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level")
STAGES = ("train", "val", "test")


class CXRClassifier(pl.LightningModule):
    def __init__(
        self,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        label_names: Sequence[str],
        meta_names: Sequence[str],
        pos_frac: Sequence[float],
        image_size: int,
        mean: float,
        std: float,
        age_fill: float | None = None,
        channels_last: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.label_names = list(label_names)
        self.meta_names = list(meta_names)
        head_cfg = dict(head)
        head_name = head_cfg.pop("name")
        # metadata_only has no image branch: no backbone to build, run or keep in DDP's buckets.
        self.backbone: nn.Module | None = None
        in_features = 0
        if _head_uses_image(head_name):
            self.backbone = create_backbone(
                backbone["name"],
                pretrained=bool(backbone.get("pretrained", False)),
                weights=backbone.get("weights"),
                global_pool=backbone.get("global_pool", "avg"),
            )
            in_features = self.backbone.num_features
            if backbone.get("freeze") and backbone.get("unfreeze_at_epoch") is None:
                BaseFinetuning.freeze(self.backbone, train_bn=False)
        self.head = create_head(
            head_name,
            in_features=in_features,
            meta_dim=len(self.meta_names),
            num_labels=len(self.label_names),
            **head_cfg,
        )
        pos = torch.tensor(list(pos_frac), dtype=torch.float32)
        loss_cfg = dict(loss)
        self.criterion = create_loss(loss_cfg.pop("name"), pos_weight=1.0 - pos, neg_weight=pos, **loss_cfg)
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
    def cam_layer(self) -> nn.Module:
        """The layer Grad-CAM hooks, named by the backbone's config."""
        if self.backbone is None:
            raise ConfigError("head=metadata_only has no image branch to explain.")
        return self.backbone.get_layer(self.hparams.backbone["cam_layer"])

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"], batch["meta"])
        loss = self.criterion(logits, batch["labels"])
        check_finite_loss(self, batch, stage, loss, logits)
        getattr(self, f"{stage}_metrics").update(logits.detach().float(), batch["labels"].int())
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

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        cfg = self.hparams.optimizer
        if cfg.get("name", "adam") != "adam":
            raise ConfigError(f"optimizer.name={cfg['name']!r}: only 'adam' is provided.")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
        scheduler = cfg.get("scheduler")
        if scheduler is None:
            return optimizer
        if scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}
        if scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
            return {"optimizer": optimizer, "lr_scheduler": sched}
        raise ConfigError(f"optimizer.scheduler={scheduler!r}: expected null, 'plateau' or 'cosine'.")


def _head_uses_image(name: str) -> bool:
    from cxr_lightning.models.heads import HEADS

    if name not in HEADS:
        raise ConfigError(f"Unknown head {name!r}; valid heads: {sorted(HEADS)}.")
    return bool(getattr(HEADS[name], "uses_image", True))


def load_model(ckpt_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CXRClassifier:
    """Rebuild a trained model from its checkpoint alone, in eval mode, without downloading weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}") from exc
    hparams = ckpt.get("hyper_parameters")
    if not hparams or "label_names" not in hparams:
        raise CheckpointError(f"{path} is not a cxr-lightning checkpoint (no label names in its hyperparameters).")
    hparams = dict(hparams)
    # The state dict holds the trained weights: never fetch or load pretrained ones again.
    hparams["backbone"] = {**hparams["backbone"], "pretrained": False, "weights": None}
    # channels_last is a training-speed choice for GPUs, not part of the model.
    hparams["channels_last"] = False
    model = CXRClassifier(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()

