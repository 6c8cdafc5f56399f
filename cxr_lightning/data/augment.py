"""Batch-level training augmentation on whatever device the batch is on.

Dataloader workers only copy uint8 pixels; the model's :class:`~cxr_lightning.models.preprocess.Preprocess`
scales each batch to ``[0, 1]``, applies the data module's :class:`BatchAugment` while training
(on the GPU when there is one) and normalises. The CPU path is the same module applied to a CPU
batch, so there is one augmentation implementation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BatchAugment(nn.Module):
    """Random per-sample affine transform and brightness/contrast for a ``(B, 1, H, W)`` float
    batch in ``[0, 1]``; the identity in eval mode.

    - affine: rotation ``U(-degrees, degrees)``, translation ``U(-translate, translate)`` of the
      image size on each axis, isotropic scale ``U(*scale)``; bilinear resampling, black outside
      the image (what a detector sees beyond the field of view).
    - brightness/contrast as in torchvision's ``ColorJitter``: ``x * b`` with
      ``b ~ U(1 - brightness, 1 + brightness)``, then ``(x - m) * c + m`` around the image mean ``m``
      with ``c ~ U(1 - contrast, 1 + contrast)``, clamped to ``[0, 1]``.
    - ``hflip`` is off by default: the chest is not left-right symmetric (heart on the left).
    - each sample is augmented with probability ``p`` and left exactly unchanged otherwise.

    Random parameters are drawn on the CPU (from ``generator`` or the global torch RNG) and then
    moved to the batch's device, so a seed gives the same transforms on CPU and GPU, and sample
    ``i`` gets the same transform whatever the batch size.
    """

    n_params = 8  # apply, angle, tx, ty, scale, flip, brightness, contrast

    def __init__(
        self,
        degrees: float = 5.0,
        translate: float = 0.05,
        scale: Sequence[float] = (0.95, 1.05),
        brightness: float = 0.1,
        contrast: float = 0.1,
        hflip: bool = False,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale={tuple(scale)}: expected (low, high) with 0 < low <= high")
        ranges = {"degrees": degrees, "translate": translate, "brightness": brightness, "contrast": contrast}
        for name, value in ranges.items():
            if value < 0:
                raise ValueError(f"{name}={value}: must be >= 0")
        if brightness >= 1 or contrast >= 1:
            raise ValueError(f"brightness={brightness}, contrast={contrast}: must be < 1 (factors stay positive)")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p}: must lie in [0, 1]")
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.hflip = bool(hflip)
        self.p = float(p)
        # The geometry of the latest call, (theta, applied), for warp_like_last.
        self.last_geometry: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
            f"brightness={self.brightness}, contrast={self.contrast}, hflip={self.hflip}, p={self.p}"
        )

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training:
            return images
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"BatchAugment expects a float (B, C, H, W) batch in [0, 1], got {images.dtype} {tuple(images.shape)}"
            )
        u = torch.rand(images.shape[0], self.n_params, generator=generator, dtype=torch.float64)
        apply, angle, tx, ty, scale, flip, bright, contr = u.unbind(1)
        apply = apply < self.p
        # Half precision is resampled in float32: grid_sample in fp16 on CPU is unsupported/inexact.
        work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
        x = images.to(work_dtype)
        theta = self._theta(angle, tx, ty, scale, flip, images.shape[-2], images.shape[-1])
        theta = theta.to(device=images.device, dtype=work_dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        b = _uniform(bright, 1 - self.brightness, 1 + self.brightness)
        c = _uniform(contr, 1 - self.contrast, 1 + self.contrast)
        b = b.to(device=images.device, dtype=work_dtype).view(-1, 1, 1, 1)
        c = c.to(device=images.device, dtype=work_dtype).view(-1, 1, 1, 1)
        out = out * b
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * c + mean).clamp_(0.0, 1.0)

        keep = (~apply).to(images.device).view(-1, 1, 1, 1)
        self.last_geometry = (theta, apply.to(images.device))
        return torch.where(keep, x, out).to(images.dtype)

    def warp_like_last(self, maps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``maps`` ``(P, H, W)`` (e.g. box masks) moved by the affine transform the latest call
        gave image ``rows[p]`` of its batch, without the intensity changes; unchanged in eval mode."""
        if not self.training or self.last_geometry is None:
            return maps
        theta, applied = self.last_geometry
        x = maps.unsqueeze(1).to(theta.dtype)
        grid = F.affine_grid(theta[rows], list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(applied[rows].view(-1, 1, 1, 1), warped, x).squeeze(1).to(maps.dtype)

    def _theta(self, angle, tx, ty, scale, flip, height: int, width: int) -> torch.Tensor:
        """Per-sample 2x3 matrices mapping output to input coordinates in ``affine_grid``'s
        normalised space, for the forward transform ``out = S * R * F * in + t`` in pixels."""
        rad = _uniform(angle, -self.degrees, self.degrees) * (math.pi / 180.0)
        s = _uniform(scale, *self.scale)
        # Translation as a fraction of the image; normalised coordinates span 2 per image side.
        t_x = _uniform(tx, -self.translate, self.translate) * 2.0
        t_y = _uniform(ty, -self.translate, self.translate) * 2.0
        sign = torch.where(flip < 0.5, -1.0, 1.0) if self.hflip else torch.ones_like(flip)
        cos, sin = torch.cos(rad), torch.sin(rad)
        # Inverse of S*R in pixel units is R(-a)/s; conjugating by diag(W/2, H/2) brings it to the
        # normalised grid, where a rotation of a non-square image picks up the aspect ratio.
        aspect = height / width
        m00, m01 = cos / s, sin / s * aspect
        m10, m11 = -sin / s / aspect, cos / s
        linear = torch.stack([torch.stack([m00, m01], -1), torch.stack([m10, m11], -1)], 1)  # (B, 2, 2)
        # Undoing the flip comes last on the way back to the input: it negates the x row.
        linear[:, 0, :] *= sign.unsqueeze(-1)
        shift = -(linear @ torch.stack([t_x, t_y], -1).unsqueeze(-1))  # in = linear @ (out - t)
        theta = torch.cat([linear, shift], dim=2)
        return theta


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u
