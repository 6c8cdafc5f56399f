"""Labelled heatmap overlays: PNG files and a grid for TensorBoard.

An uninformative heatmap (no gradient, or blank) is never shown quietly: its title carries a
marker in red.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.utils.image import show_cam_on_image
from torchvision.utils import make_grid

from cxr_lightning.explain.cams import EMPTY_HEATMAP, NO_GRADIENT, is_blank
from cxr_lightning.explain.localization import Box
from cxr_lightning.files import atomic_path


def overlay_title(title: str, heatmap: np.ndarray, zero_gradient: bool = False) -> str:
    """``title`` with a marker when the heatmap carries nothing, so a blank is never quiet."""
    if NO_GRADIENT in title or EMPTY_HEATMAP in title:
        return title
    if zero_gradient:
        return f"{NO_GRADIENT}: {title}"
    if is_blank(np.asarray(heatmap)):
        return f"{EMPTY_HEATMAP}: {title}"
    return title


def render_overlay(
    image: np.ndarray | torch.Tensor,
    heatmap: np.ndarray,
    title: str,
    zero_gradient: bool = False,
    min_width: int = 256,
    title_lines: int = 2,
    boxes: Sequence[Box] = (),
) -> np.ndarray:
    """``(H', W', 3)`` uint8 RGB: heatmap (jet) blended on the grey image under a title banner.

    Small images are upscaled to ``min_width`` so the title stays legible; the banner always has
    ``title_lines`` lines (longer titles are truncated), so overlays of one size stack in a grid.
    ``boxes`` (ground truth, ``(x, y, w, h)`` in the image's pixels) are outlined in green.
    """
    grey = _display_image(image)
    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heatmap.shape != grey.shape:
        heatmap = np.asarray(
            Image.fromarray(heatmap, mode="F").resize(grey.shape[::-1], Image.Resampling.BILINEAR)
        )
    blended = show_cam_on_image(
        np.repeat(grey[..., None], 3, axis=2), np.clip(heatmap, 0, 1), use_rgb=True
    )
    picture = Image.fromarray(blended)
    if picture.width < min_width:
        scale = min_width / picture.width
        picture = picture.resize((min_width, round(picture.height * scale)), Image.Resampling.BILINEAR)
    _draw_boxes(picture, boxes, picture.width / grey.shape[1], picture.height / grey.shape[0])

    font_size = max(10, picture.width // 20)
    font = ImageFont.load_default(size=font_size)
    chars_per_line = max(8, int(picture.width / (0.6 * font_size)))
    marked = overlay_title(title, heatmap, zero_gradient)
    alarm = NO_GRADIENT in marked or EMPTY_HEATMAP in marked
    lines = textwrap.wrap(marked, chars_per_line)
    if len(lines) > title_lines:
        lines = lines[:title_lines]
        lines[-1] = lines[-1][: chars_per_line - 1] + "…"
    banner_h = title_lines * (font_size + 4) + 4
    canvas = Image.new("RGB", (picture.width, picture.height + banner_h), "black")
    canvas.paste(picture, (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * (font_size + 4)), line, fill="red" if alarm else "white", font=font)
    return np.array(canvas)


def _draw_boxes(picture: Image.Image, boxes: Sequence[Box], sx: float, sy: float) -> None:
    draw = ImageDraw.Draw(picture)
    width = max(1, picture.width // 128)
    for x, y, w, h in boxes:
        draw.rectangle([x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1], outline=(0, 255, 0), width=width)


def save_overlay(
    image: np.ndarray | torch.Tensor,
    heatmap: np.ndarray,
    path: str | os.PathLike,
    title: str,
    zero_gradient: bool = False,
    boxes: Sequence[Box] = (),
) -> Path:
    """Write :func:`render_overlay` as a PNG, atomically; returns ``path``."""
    rendered = Image.fromarray(render_overlay(image, heatmap, title, zero_gradient, boxes=boxes))
    with atomic_path(path, suffix=".png") as tmp:
        rendered.save(tmp, format="PNG")
    return Path(path)


def cam_grid(
    images: Sequence[np.ndarray] | torch.Tensor,
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str],
    zero_gradient: Sequence[bool] | None = None,
    nrow: int = 4,
    boxes: Sequence[Sequence[Box]] | None = None,
) -> torch.Tensor:
    """``(3, H, W)`` float tensor in [0, 1] of labelled overlays, for ``SummaryWriter.add_image``.

    All images must share one size (one batch). ``boxes[i]``: ground-truth boxes of tile ``i``.
    """
    if not len(images) == len(heatmaps) == len(titles):
        raise ValueError(
            f"cam_grid needs as many images, heatmaps and titles; got "
            f"{len(images)}, {len(heatmaps)}, {len(titles)}"
        )
    if len(images) == 0:
        raise ValueError("cam_grid needs at least one image")
    flags = zero_gradient if zero_gradient is not None else [False] * len(images)
    tile_boxes = boxes if boxes is not None else [()] * len(images)
    tiles = [
        torch.from_numpy(render_overlay(img, hm, t, bool(z), boxes=b)).permute(2, 0, 1)
        for img, hm, t, z, b in zip(images, heatmaps, titles, flags, tile_boxes)
    ]
    return make_grid(torch.stack(tiles).float() / 255.0, nrow=nrow, padding=2)


def _display_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W)`` float32 in [0, 1] from a uint8 or float (possibly normalised) grey image."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"overlay needs one grey image (H, W) or (1, H, W), got shape {np.shape(image)}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0.0 and hi <= 1.0:
        return array
    # normalised input: stretch to the full grey range for display
    return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)

