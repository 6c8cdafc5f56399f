"""Checks of a composed config that run before any expensive work (data loading, model building)."""
from __future__ import annotations

from omegaconf import DictConfig

from cxr_lightning.errors import ConfigError


def validate_config(cfg: DictConfig) -> None:
    image_size = int(cfg.data.image_size)
    minimum = int(cfg.backbone.get("min_input_size", 32))
    if image_size < minimum:
        raise ConfigError(
            f"data.image_size={image_size} is below {cfg.backbone.name}'s minimum input size of {minimum} px; "
            f"pass data.image_size={minimum} or larger."
        )
