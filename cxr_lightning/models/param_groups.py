"""The optimiser's parameter groups: one function, so every recipe names its groups the same way.

Each group carries ``name`` (``backbone.<group>`` or ``head.<group>``), ``lr_scale`` (its learning
rate over the optimiser's) and the ``lr`` and ``weight_decay`` it trains with; torch optimisers read
the last two per group, and a scheduler scales every group's ``lr`` alike, so the ratios hold for
the whole run. :mod:`cxr_lightning.models.finetune` finds the backbone's groups by their name.

* ``backbone.finetune_lr_scale``: a backbone fine-tuned after a frozen start (``freeze`` with
  ``unfreeze_at_epoch``) trains at this fraction of the head's rate (the seed's EfficientNet-B3
  recipe); its rate is held at 0 until the unfreeze epoch by :mod:`.finetune`.
* ``layer_decay``: layer-wise learning-rate decay (BEiT, Bao et al. 2022; MAE, He et al. 2022)
  over the *stages* the timm model's own ``group_matcher(coarse=True)`` defines, mapped by timm's
  ``group_parameters``: for a ViT of depth ``D`` each block is a stage, the embedding is layer 0,
  block ``i`` layer ``i + 1`` and the final norm joins the last block, so block ``i`` trains at
  ``layer_decay ** (D - 1 - i)`` and the embedding at ``layer_decay ** D`` times the head's rate
  (BEiT/MAE's own code puts the final norm one layer higher, so each of their blocks trains a
  factor ``layer_decay`` lower than here). A CNN's stages are its resolution stages (ResNet: stem
  and layer1-4; DenseNet: stem and four dense blocks with their transitions), not its ~60 layers,
  which would leave the stem at ``layer_decay ** 60``: frozen in effect. The mapping is logged. A
  backbone without a ``group_matcher`` (no defined layer order) is refused with a ConfigError.
* ``no_decay_norm_bias``: no weight decay on biases, norm weights and the parameters timm lists
  in the model's ``no_weight_decay()`` (position embeddings, class token), as AdamW recipes do.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Collection, Mapping
from typing import Any

from timm.models import group_parameters
from timm.optim import param_groups_weight_decay
from torch import nn

from cxr_lightning.errors import ConfigError

log = logging.getLogger(__name__)

HEAD, BACKBONE = "head", "backbone"
# Keys of the optimizer config read here, not passed to the optimiser class (tasks/build.py strips them).
GROUP_KEYS: tuple[str, ...] = ("layer_decay", "no_decay_norm_bias")


def is_backbone_group(group: Mapping[str, Any]) -> bool:
    return str(group.get("name", "")).split(".")[0] == BACKBONE


def param_groups(
    backbone: nn.Module | None,
    head: nn.Module,
    optimizer: Mapping[str, Any],
    backbone_cfg: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Groups of the trainable parameters of ``backbone`` (a timm model, or None) and ``head`` for
    the ``optimizer`` config (its ``lr``, ``weight_decay`` and :data:`GROUP_KEYS`) and the backbone
    config (``freeze``, ``unfreeze_at_epoch``, ``finetune_lr_scale``)."""
    if optimizer.get("lr") is None:
        raise ConfigError(
            "The optimizer config has no lr: set optimizer.lr=... (the head's rate; the backbone's follows from it)."
        )
    lr = float(optimizer["lr"])
    weight_decay = float(optimizer.get("weight_decay", 0.0))
    layer_decay = optimizer.get("layer_decay")
    no_decay = bool(optimizer.get("no_decay_norm_bias", False)) or layer_decay is not None
    groups = []
    if backbone is not None:
        backbone_cfg = backbone_cfg or {}
        staged = bool(backbone_cfg.get("freeze")) and backbone_cfg.get("unfreeze_at_epoch") is not None
        scale = float(backbone_cfg.get("finetune_lr_scale", 0.1)) if staged else 1.0
        groups += [
            _named(g, BACKBONE, i, lr, scale)
            for i, g in enumerate(_backbone_groups(backbone, weight_decay, layer_decay, no_decay))
        ]
    groups += [_named(g, HEAD, i, lr, 1.0) for i, g in enumerate(_plain_groups(head, weight_decay, no_decay))]
    return [g for g in groups if g["params"]]


def _backbone_groups(model: nn.Module, weight_decay: float, layer_decay: float | None, no_decay: bool) -> list[dict]:
    skip = model.no_weight_decay() if no_decay and hasattr(model, "no_weight_decay") else ()
    if layer_decay is not None:
        return _layer_decay_groups(model, weight_decay, float(layer_decay), skip)
    return _plain_groups(model, weight_decay, no_decay, skip)


def _plain_groups(module: nn.Module, weight_decay: float, no_decay: bool, skip=()) -> list[dict]:
    if not no_decay:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay,
                 "lr_scale": 1.0, "name": "all"}]
    # timm returns the groups without decay first, and drops an empty one: named by their decay.
    groups = param_groups_weight_decay(module, weight_decay=weight_decay, no_weight_decay_list=skip)
    return [{**g, "lr_scale": 1.0, "name": "decay" if g["weight_decay"] else "no_decay"} for g in groups]


def stage_map(model: nn.Module) -> dict[str, int]:
    """Parameter name -> stage (0: the input end) of a timm model, from its ``group_matcher``."""
    if not callable(getattr(model, "group_matcher", None)):
        raise ConfigError(
            f"optimizer.layer_decay is set, but the backbone {type(model).__name__} defines no layer order "
            "(no timm group_matcher), so layer-wise decay has nothing to decay along. Set "
            "optimizer.layer_decay=null."
        )
    return group_parameters(model, model.group_matcher(coarse=True), reverse=True)


def _layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, skip: Collection[str]) -> list[dict]:
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"optimizer.layer_decay={layer_decay}: must be in (0, 1] (BEiT/MAE recipes: 0.65-0.75).")
    stages = stage_map(model)
    top = max(stages.values(), default=0)
    if top == 0:
        raise ConfigError(
            f"optimizer.layer_decay={layer_decay}: the backbone {type(model).__name__} has a single stage, so "
            "layer-wise decay would change nothing. Set optimizer.layer_decay=null."
        )
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    members: dict[int, set[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stage = stages.get(name, top)  # unmatched parameters sit with the last stage, next to the head
        decays = param.ndim > 1 and not any(fnmatch.fnmatch(name, pattern) for pattern in skip)
        below = top - stage
        group = groups.setdefault((below, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": layer_decay ** below,
            "name": f"below{below}_{'decay' if decays else 'no_decay'}",
        })
        group["params"].append(param)
        members.setdefault(stage, set()).add(".".join(name.split(".")[:-1][:2]) or name)
    log.info(
        "layer_decay=%g over the %d stages of %s (learning rate x scale): %s", layer_decay, top + 1,
        type(model).__name__,
        "; ".join(f"{'+'.join(sorted(members[k]))} x{layer_decay ** (top - k):.3g}" for k in sorted(members)),
    )
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], k[1]))]


def _named(group: dict[str, Any], owner: str, index: int, lr: float, owner_scale: float) -> dict[str, Any]:
    scale = float(group.get("lr_scale", 1.0)) * owner_scale
    return {**group, "name": f"{owner}.{group.get('name', index)}", "lr_scale": scale, "lr": lr * scale}
