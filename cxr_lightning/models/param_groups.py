"""The optimizer's parameter groups: the one function that decides which parameters train at which
learning rate.

Every group is a dict ``torch.optim`` accepts, with a ``"name"`` (the learning-rate monitor's label,
and what :mod:`cxr_lightning.models.finetune` looks groups up by) and an ``"lr"`` relative to the
optimizer config's ``lr`` through ``"lr_scale"``. Splitting a group further (per-layer rates) means
returning more dicts from :func:`param_groups`, each with its own name and scale.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

HEAD, BACKBONE = "head", "backbone"


def param_groups(model: nn.Module, lr: float, backbone: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``[{"name": "head", ...}, {"name": "backbone", ...}]`` of ``model``'s trainable parameters.

    ``model.backbone`` (None without an image branch) is its own group at ``lr x
    backbone.finetune_lr_scale`` when the config fine-tunes it after a frozen start
    (``freeze`` with ``unfreeze_at_epoch``), else at ``lr``; every other trainable parameter is the
    head's, at ``lr``. A frozen backbone that never unfreezes has no trainable parameters and no
    group.
    """
    trunk = getattr(model, "backbone", None)
    in_trunk = {id(p) for p in trunk.parameters()} if trunk is not None else set()
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in in_trunk]
    groups = [_group(HEAD, head, lr, 1.0)]
    if trunk is not None:
        trainable = [p for p in trunk.parameters() if p.requires_grad]
        finetuned = bool(backbone.get("freeze")) and backbone.get("unfreeze_at_epoch") is not None
        scale = float(backbone.get("finetune_lr_scale", 0.1)) if finetuned else 1.0
        if trainable:
            groups.append(_group(BACKBONE, trainable, lr, scale))
    return [g for g in groups if g["params"]]


def _group(name: str, params: list[nn.Parameter], lr: float, scale: float) -> dict[str, Any]:
    return {"name": name, "params": params, "lr": lr * scale, "lr_scale": scale}
