"""Feature-map views of token outputs, for Grad-CAM on transformer backbones.

Grad-CAM weighs the channels of a ``(B, C, h, w)`` map; a ViT block emits ``(B, prefix + h*w, C)``
tokens and a timm Swin stage ``(B, h, w, C)`` channels-last maps, which pytorch_grad_cam rejects
("Invalid grads shape"). The library takes a ``reshape_transform`` for exactly this and ships none
that knows a model's prefix tokens or its input size, so the two views are written here, once.
A backbone config names its view as ``cam_reshape: vit | swin`` (null: the layer is a map already).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cxr_lightning.errors import ConfigError

CAM_RESHAPES: tuple[str, ...] = ("vit", "swin")
ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def vit_tokens_to_map(tokens: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int) -> torch.Tensor:
    """``(B, prefix + h*w, C)`` tokens -> ``(B, C, h, w)``: the prefix (class, register and
    distillation tokens) has no place in the image and is dropped."""
    h, w = int(grid[0]), int(grid[1])
    if tokens.ndim != 3 or tokens.shape[1] != num_prefix_tokens + h * w:
        raise ConfigError(
            f"cam_reshape=vit expects (B, {num_prefix_tokens} + {h}x{w} tokens, C) at the CAM layer for this "
            f"input, got {tuple(tokens.shape)}; set backbone.cam_layer to a transformer block's layer "
            "(e.g. blocks.11.norm1) or backbone.cam_reshape=null for a convolutional map."
        )
    patches = tokens[:, num_prefix_tokens:, :]
    return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def channels_last_to_map(maps: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, C)`` (timm's Swin stages and final norm) -> ``(B, C, h, w)``."""
    if maps.ndim != 4:
        raise ConfigError(
            f"cam_reshape=swin expects a (B, h, w, C) map at the CAM layer, got {tuple(maps.shape)}; "
            "set backbone.cam_layer to a Swin stage or its final norm (e.g. norm)."
        )
    return maps.permute(0, 3, 1, 2)


def cam_reshape_transform(kind: str | None, model: nn.Module, input_hw: Sequence[int]) -> ReshapeTransform | None:
    """The ``reshape_transform`` for pytorch_grad_cam of ``model`` (timm, or a folder format's
    encoder) fed ``input_hw`` images.

    ViT: the number of prefix tokens comes from the model (``num_prefix_tokens``) and the token
    grid from the input size and patch size, so any input size the model accepts maps correctly.
    """
    if kind is None:
        return None
    if kind == "swin":
        return channels_last_to_map
    if kind == "vit":
        # A timm ViT keeps its patch size on patch_embed; a folder format's encoder on itself.
        patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is None:
            raise ConfigError(
                f"cam_reshape=vit needs a vision transformer (a patch_embed with patch_size); "
                f"{type(model).__name__} has none. Set backbone.cam_reshape=null or swin."
            )
        grid = (int(input_hw[0]) // int(patch[0]), int(input_hw[1]) // int(patch[1]))
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        if not getattr(model, "tokens_batch_first", True):  # (tokens, B, C): open_clip's older towers
            return lambda tokens: vit_tokens_to_map(tokens.transpose(0, 1), grid, prefix)
        return lambda tokens: vit_tokens_to_map(tokens, grid, prefix)
    raise ConfigError(f"backbone.cam_reshape={kind!r} is unknown; use one of {list(CAM_RESHAPES)} or null.")
