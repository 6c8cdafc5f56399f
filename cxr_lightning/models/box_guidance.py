"""Box-guided training (``loss.box_weight > 0``): pull each boxed finding's class map into its box.

The class map is Grad-CAM's (Selvaraju et al. 2017) at the backbone's ``cam_layer``, kept
differentiable: ``cam = relu(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of
``d logit_c / d A_k``, taken with ``create_graph=True``. Why this map and not another:

* the heads are MLPs (and gated fusions) over pooled features, so there is no linear classifier on
  the feature map to read a CAM (Zhou et al. 2016) or patch scores (Li et al. 2018, "Thoracic
  disease identification and localization with limited supervision") from; Grad-CAM's map exists
  for every backbone and every head that sees the image;
* it is the map ``explain`` scores (pointing game, IoBB), so training moves what is evaluated;
* it is cheap: the gradient to ``A`` runs through global pooling and the head only (the CAM layer
  is the backbone's last), once per distinct boxed finding of the batch, on the boxed images only.

The attention term of one (image, finding) pair is the share of the map's mass that falls
outside the finding's boxes: ``sum(cam * (1 - m)) / sum(cam)``, with ``m`` the fraction of each
CAM cell covered by the boxes. It is 0 when the activation lies inside the boxes and grows with the
activation outside, whatever the map's scale; the total adds ``box_weight`` times its mean over
the batch's boxed pairs to the classification loss. pytorch-grad-cam computes the same map, but
detached in numpy, so it cannot be trained through.

The boxes arrive with the batch (``boxes``, ``box_labels``: only the training split's, see
:mod:`cxr_lightning.data.boxes`) in pixels of the un-augmented image; :func:`box_targets` draws
them and moves them with the batch's augmentation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-8


def box_targets(
    boxes: torch.Tensor, box_labels: torch.Tensor, size: tuple[int, int], augment: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` ``(P, 2)`` (image, label) with at least one box and ``masks`` ``(P, H, W)``: 1
    inside the union of that pair's boxes, moved like the images by ``augment`` (its
    ``warp_like_last``; call after it augmented the batch)."""
    height, width = size
    valid = box_labels >= 0
    image_idx, slot = valid.nonzero(as_tuple=True)
    labels = box_labels[image_idx, slot]
    pairs, pair_of_box = torch.unique(torch.stack([image_idx, labels], 1), dim=0, return_inverse=True)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes[image_idx, slot].float()
    inside = (
        ((xs >= b[:, 0:1]) & (xs <= b[:, 2:3]))[:, None, :] & ((ys >= b[:, 1:2]) & (ys <= b[:, 3:4]))[:, :, None]
    ).float()
    masks = torch.zeros(len(pairs), height, width, device=boxes.device)
    masks = masks.index_add_(0, pair_of_box, inside).clamp_(max=1.0)  # the union of the pair's boxes
    if augment is not None and hasattr(augment, "warp_like_last") and len(pairs):
        masks = augment.warp_like_last(masks, pairs[:, 0])
    return pairs, masks


def gradcam_maps(activations: torch.Tensor, logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Differentiable Grad-CAM maps ``(P, h, w)`` of ``logits[pairs[p, 0], pairs[p, 1]]`` at
    ``activations`` ``(B, C, h, w)`` (the CAM layer's output in the same forward pass)."""
    maps = activations.new_zeros(len(pairs), *activations.shape[-2:], dtype=torch.float32)
    for label in pairs[:, 1].unique().tolist():
        chosen = (pairs[:, 1] == label).nonzero(as_tuple=True)[0]
        rows = pairs[chosen, 0]
        # One backward per finding: image b's logit depends on A[b] alone, so a sum over images
        # gives each image its own gradient.
        (grad,) = torch.autograd.grad(logits[rows, label].sum(), activations, create_graph=True)
        alpha = grad[rows].float().mean(dim=(2, 3), keepdim=True)
        maps = maps.index_copy(0, chosen, F.relu((alpha * activations[rows].float()).sum(dim=1)))
    return maps


def attention_loss(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the share of ``cams`` ``(P, h, w)`` outside ``masks`` ``(P, H, W)``
    (box coverage, downsampled to the map's cells by area); 0 for no pairs."""
    if len(cams) == 0:
        return cams.sum()
    cover = F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), cams.shape[-2:]).squeeze(1)
    outside = (cams * (1.0 - cover)).flatten(1).sum(1)
    return (outside / (cams.flatten(1).sum(1) + _EPS)).mean()


def box_attention_loss(activations: torch.Tensor, logits: torch.Tensor, pairs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """:func:`attention_loss` of the :func:`gradcam_maps` of ``pairs``."""
    if len(pairs) == 0:
        return logits.sum() * 0.0
    return attention_loss(gradcam_maps(activations, logits, pairs), masks)


@contextlib.contextmanager
def capture_output(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs ``layer`` produces inside the block, in a list (a forward hook, removed after)."""
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()
