"""Tiny random foundation models saved in their published folder formats, for tests that load them
as backbones (``backbone.weights=FOLDER``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Unequal channel statistics, so the grey-to-RGB normalisation is tested, not the identity.
MEAN, STD = [0.40, 0.50, 0.60], [0.20, 0.25, 0.30]
DINO_SIZE = 56


def write_dinov2(folder: Path, registers: int = 0):
    """A tiny random DINOv2 saved as microsoft/rad-dino is: config.json, model.safetensors, preprocessor_config.json."""
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=DINO_SIZE,
                  patch_size=14, layerscale_value=0.5)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    model.eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "image_mean": MEAN, "image_std": STD,
         "crop_size": {"height": DINO_SIZE, "width": DINO_SIZE}}))
    return model
