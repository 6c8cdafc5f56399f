"""Head first, then the backbone: a fine-tuning schedule that is a pure function of the epoch.

``backbone.freeze=true`` with ``backbone.unfreeze_at_epoch=K`` trains the head alone for epochs
``0..K-1`` and the backbone from epoch ``K`` at ``finetune_lr_scale`` x the learning rate. Lightning's
``BackboneFinetuning`` does this by adding the backbone to the optimizer at epoch K; a run continued
from a checkpoint then re-freezes it for good (Lightning #21901) and DDP never synchronises it,
having registered only the parameters that required gradients when it wrapped the model (#20340).

Here the backbone is in the optimizer, and requires gradients, from the first step, so DDP's
parameter set never changes. While it is frozen:

- its parameter group's learning rate is held at 0 (what the learning-rate monitor shows),
- its gradients are dropped before each optimizer step, so no optimizer state (Adam moments,
  momentum, weight decay) accrues and it starts fresh at epoch K, as a newly added group would,
- it runs in eval mode (BatchNorm uses and keeps its running statistics, dropout is off), also
  after anything calls ``model.train()``, so its features are the same in training and evaluation.

Every decision reads ``trainer.current_epoch`` only, so a run continued from any checkpoint (before,
at or after epoch K, mid-epoch included) is in exactly the state of the uninterrupted run. The hold
composes with any learning-rate scheduler: each group keeps its scheduled rate in
``group["scheduled_lr"]`` (saved with the optimizer state), schedulers step on that rate through
:func:`scheduled_rates`, and the effective rate is ``scheduled_lr x hold``. The cost of a fixed
parameter set: the head-only epochs compute the backbone's gradients too.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cxr_lightning.models.param_groups import is_backbone_group

SCHEDULED = "scheduled_lr"


@dataclass(frozen=True)
class FinetuneSchedule:
    """When the backbone trains: always (``freeze=false``), never (``freeze=true``, no unfreeze
    epoch) or from ``unfreeze_at_epoch`` on."""

    freeze: bool = False
    unfreeze_at_epoch: int | None = None

    @classmethod
    def from_config(cls, backbone: Mapping[str, Any]) -> "FinetuneSchedule":
        at = backbone.get("unfreeze_at_epoch")
        return cls(bool(backbone.get("freeze", False)), None if at is None else int(at))

    @property
    def staged(self) -> bool:
        """Frozen first, trained later: the backbone is in the optimizer with a held rate."""
        return self.freeze and self.unfreeze_at_epoch is not None

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen during ``epoch``."""
        return self.freeze and (self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch)

    def hold(self, group: Mapping[str, Any], epoch: int) -> float:
        """The factor on ``group``'s scheduled learning rate during ``epoch``: 0 or 1."""
        return 0.0 if is_backbone_group(group) and self.frozen(epoch) else 1.0


def apply_hold(optimizer: torch.optim.Optimizer, schedule: FinetuneSchedule, epoch: int) -> None:
    """Set every group's learning rate to its scheduled rate x the hold of ``epoch``."""
    for group in optimizer.param_groups:
        scheduled = group.setdefault(SCHEDULED, group["lr"])
        group["lr"] = scheduled * schedule.hold(group, epoch)


@contextmanager
def scheduled_rates(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The groups at their scheduled rates while a scheduler reads and changes them; the rates it
    leaves become the new scheduled rates (call :func:`apply_hold` afterwards)."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault(SCHEDULED, group["lr"])
    yield
    for group in optimizer.param_groups:
        group[SCHEDULED] = group["lr"]


def drop_frozen_gradients(backbone: nn.Module | None, schedule: FinetuneSchedule, epoch: int) -> None:
    """Before an optimizer step: a frozen backbone's gradients (already all-reduced under DDP)
    go, so the optimizer neither moves it nor builds state for it."""
    if backbone is not None and schedule.staged and schedule.frozen(epoch):
        for param in backbone.parameters():
            param.grad = None


def set_backbone_mode(backbone: nn.Module | None, schedule: FinetuneSchedule, epoch: int, training: bool) -> None:
    """A frozen backbone in eval mode whatever mode the model is in; else the model's mode."""
    if backbone is not None:
        backbone.train(training and not schedule.frozen(epoch))
