"""The one preprocessing of the framework: decoded uint8 pixels -> the float input of the network.

Training (``CXRClassifier.on_after_batch_transfer``), evaluation and explanation (through
:mod:`cxr_lightning.inference`), prediction and export all call the model's own
:class:`Preprocess`, built from the normalisation stored in its checkpoint, so none of them can
drift from the others. It runs once per batch on whatever device the batch is on; augmentation,
a data concern, slots in between scaling and normalising.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# One-channel equivalents of the ImageNet statistics (means of the RGB means 0.485/0.456/0.406 and
# of the stds 0.229/0.224/0.225; timm uses the same 0.449/0.226 for grey input). ImageNet
# weights adapted to one channel (timm sums the first conv over RGB) see a grey image as R=G=B,
# so the averaged statistics keep their activations closest to those they were trained with.
DEFAULT_MEAN = 0.449
DEFAULT_STD = 0.226
PIXEL_MAX = 255.0


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """float32 in ``[0, 1]``: ``uint8`` input is divided by 255; float input is taken to be in
    ``[0, 1]`` already (the output of :class:`~cxr_lightning.data.augment.BatchAugment`)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(PIXEL_MAX)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"preprocessing expects uint8 or float images, got {images.dtype}")


def normalize(images: torch.Tensor, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> torch.Tensor:
    """``(x / 255 - mean) / std`` as float32 (see :func:`to_unit` for the input range)."""
    return (to_unit(images) - mean) / std


UNIT_RANGE = (0.0, 1.0)


class Preprocess(nn.Module):
    """``(B, 1, H, W)`` uint8 pixels -> ``(lo + (hi - lo) * to_unit(x) [augmented] - mean) / std``.

    ``input_range = (lo, hi)`` is the span a backbone's weights saw black and white as: ``(0, 1)``
    for ImageNet-style ``mean``/``std`` normalisation, ``(-1024, 1024)`` with ``mean=0, std=1`` for
    torchxrayvision's models.
    """

    def __init__(
        self, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD, input_range: Sequence[float] = UNIT_RANGE
    ) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"std={std}: the normalisation needs a positive standard deviation.")
        low, high = (float(v) for v in input_range)
        if not high > low:
            raise ValueError(f"input_range={list(input_range)}: needs [low, high] with high > low.")
        self.mean, self.std, self.input_range = float(mean), float(std), (low, high)

    def forward(
        self, images: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        unit = to_unit(images)
        if augment is not None:
            unit = augment(unit)
        low, high = self.input_range
        # One affine map: (low + (high - low) * x - mean) / std.
        return unit * ((high - low) / self.std) + ((low - self.mean) / self.std)

    def describe(self) -> dict[str, float | list[float]]:
        """What a deployment must apply before the exported graph (travels with exports):
        ``((x / pixel_max) * (hi - lo) + lo - mean) / std`` with ``input_range = [lo, hi]``."""
        return {"pixel_max": PIXEL_MAX, "input_range": list(self.input_range), "mean": self.mean, "std": self.std}

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, input_range={list(self.input_range)}"
