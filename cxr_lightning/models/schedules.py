"""Learning-rate schedules that torch composes but cannot be configured as one ``_target_``."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_epochs: float,
    max_epochs: int,
    steps_per_epoch: int = 1,
    warmup_start_factor: float = 1e-3,
    eta_min: float = 0.0,
) -> SequentialLR:
    """Linear warm-up from ``warmup_start_factor`` x each group's rate over ``warmup_epochs``, then
    cosine decay to ``eta_min`` at ``max_epochs`` (the BEiT/MAE fine-tuning schedule).

    Counted in scheduler steps: ``steps_per_epoch`` of them per epoch (1 when stepped per epoch,
    the number of optimiser steps per epoch when stepped per step). Every group keeps its ratio
    to the others (layer-wise decay) because both parts scale each group's own rate.
    """
    warmup = max(int(round(warmup_epochs * steps_per_epoch)), 1)
    total = max(int(max_epochs * steps_per_epoch), warmup + 1)
    return SequentialLR(
        optimizer,
        [LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup),
         CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=eta_min)],
        milestones=[warmup],
    )
