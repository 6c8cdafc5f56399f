"""CAMs of a whole :class:`~cxr_lightning.explain.inputs.ImageSet`: fed in batches through the one
inference loop (so through the model's own preprocessing), reported once for the whole set, and
laid out as one labelled grid."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from cxr_lightning.explain.cams import CamResult, CamWarning, compute_cams
from cxr_lightning.explain.inputs import ImageSet
from cxr_lightning.explain.overlays import cam_grid
from cxr_lightning.inference import model_batches
from cxr_lightning.models.module import CXRClassifier

GRID_TAG = "cam_grid"


def image_set_cams(
    model: CXRClassifier,
    images: ImageSet,
    targets: Sequence[Sequence[int]] | None,
    top_k: int,
    method: str,
    batch_size: int,
) -> CamResult:
    """CAMs of every image of ``images``, ``batch_size`` images per model call, with one
    :class:`CamWarning` per kind of uninformative CAM naming the images and findings."""
    parts = []
    starts = range(0, len(images), batch_size)
    chunks = ({"image": images.images[i : i + batch_size], "meta": images.meta[i : i + batch_size]} for i in starts)
    device = next(model.parameters()).device
    with warnings.catch_warnings():
        # Reported once below for the whole set, by image name rather than chunk-local index.
        warnings.simplefilter("ignore", CamWarning)
        for start, batch in zip(starts, model_batches(model, chunks, device)):
            parts.append(
                compute_cams(
                    model,
                    batch["input"],
                    batch["meta"],
                    model.cam_layer,
                    targets=None if targets is None else targets[start : start + batch_size],
                    top_k=top_k,
                    method=method,
                    batch_size=batch_size,
                    reshape_transform=model.cam_reshape(batch["input"].shape[-2:]),
                )
            )
    result = CamResult.concat(parts)
    warn_uninformative(result, images.names, model.label_names, model.cam_layer_name)
    return result


def warn_uninformative(result: CamResult, names: Sequence[str], label_names: Sequence[str], layer: str) -> None:
    """A :class:`CamWarning` for CAMs with no gradient at ``layer`` and for blank ones, by name."""
    kinds = (
        (result.zero_gradient, "got NO GRADIENT at", "the logits do not depend on that layer's output; "
         "check the backbone's cam_layer names a layer that feeds the head"),
        (result.empty & ~result.zero_gradient, "are blank (no positive evidence after ReLU) at", ""),
    )
    for mask, what, hint in kinds:
        if not mask.any():
            continue
        which = [f"{names[i]}/{label_names[c]}" for i, c in result.pairs[mask][:5]]
        warnings.warn(
            f"{result.method}: {int(mask.sum())} of {len(mask)} CAMs {what} cam_layer {layer!r}, e.g. "
            f"{which}{' ...' if mask.sum() > 5 else ''}; their overlays are marked. {hint}".rstrip(),
            CamWarning,
            stacklevel=2,
        )


def result_grid(
    images: ImageSet,
    result: CamResult,
    label_names: Sequence[str],
    boxes: Sequence[Sequence[tuple[float, float, float, float]]] | None = None,
) -> torch.Tensor:
    """Every CAM of ``result`` as a labelled overlay in one grid, one image per row."""
    per_image = np.bincount(result.pairs[:, 0]).max() if len(result.pairs) else 1
    return cam_grid(
        images.images[torch.as_tensor(result.pairs[:, 0])],
        result.heatmaps,
        result.titles(label_names),
        result.zero_gradient,
        nrow=int(per_image),
        boxes=boxes,
    )
