"""Box-guided training (``loss.box_weight > 0``): pull each boxed finding's class map into its box.

The class map is Grad-CAM's (Selvaraju et al. 2017) at the backbone's ``cam_layer``, kept
differentiable: ``cam = relu(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of
``d logit_c / d A_k``, taken with ``create_graph=True``. Why this map and not another:

* the heads are MLPs (and gated fusions) over pooled features, so there is no linear classifier on
  the feature map to read a CAM (Zhou et al. 2016) or patch scores (Li et al. 2018, "Thoracic
  disease identification and localization with limited supervision") from; Grad-CAM's map exists
  for every backbone and every head that sees the image;
* it is the map ``explain`` scores (pointing game, IoBB), so training moves what is evaluated;
* it is cheap: the gradient to ``A`` runs through the layers after the CAM layer, global pooling
  and the head only (nothing when the CAM layer is the backbone's last; the backbone's last stage
  at ``backbone.cam_stride: 16``, as in ``experiment=box_study_demo``), once per round of the
  batch's boxed pairs (each image's r-th pair in round r), on the boxed images only.

The attention term of one (image, finding) pair works on the map before Grad-CAM's ReLU, in
logit units: ``z_ij = sum_k (sum_{i'j'} d logit_c / d A_{k,i'j'}) A_{k,ij}``, which for a linear
classifier on globally pooled features is exactly the class activation map of Zhou et al. (the logit
cell ``ij`` alone would give; their mean is the logit). Its softmax, with one extra "null" cell of
logit 0 (no evidence anywhere: where Grad-CAM's ReLU puts its zero), is a distribution over where
the evidence lies; the term is the cross-entropy of the event "inside the finding's boxes":

    ``-log( sum_ij m_ij exp(z_ij) / (1 + sum_ij exp(z_ij)) )``,

``m`` the fraction of each CAM cell covered by the boxes. It has no degenerate minimum:

* an empty map (every ``z`` very negative, so Grad-CAM is blank) puts the mass on the null cell:
  the cost grows without bound, where the share-outside term it replaces scored such a map 0 and
  trained maps to switch off (issue #22: 127 blank maps of 133 on the demo);
* a constant map (any height) costs at least ``-log(box area share)``;
* a map with half its mass inside costs about ``log 2``, one inside the box tends to 0;
* the gradient never dies: it flows through the pre-ReLU map, so a map that is already blank is
  pulled back up inside the box, and it saturates once the evidence is inside (no unbounded push).

The total adds ``box_weight`` times its mean over the batch's boxed pairs to the classification
loss, the weight warmed up linearly over ``loss.box_warmup_epochs`` so the classifier learns first
(:func:`warmup_factor`). pytorch-grad-cam computes the same map, but detached in numpy, so it
cannot be trained through.

The boxes arrive with the batch (``boxes``, ``box_labels``, ``box_readers``: only the training
split's, see :mod:`cxr_lightning.data.boxes`) in pixels of the un-augmented image;
:func:`box_targets` draws them (the union of a pair's boxes, or with ``fusion="majority"`` the
pixels at least two of its readers marked) and moves them with the batch's augmentation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("union", "majority")
NO_READER = -1  # box_readers value of a box without a reader id (a single-reader source)


def box_targets(
    boxes: torch.Tensor, box_labels: torch.Tensor, size: tuple[int, int], augment: nn.Module | None = None,
    box_readers: torch.Tensor | None = None, fusion: str = "union",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` ``(P, 2)`` (image, label) with at least one box and ``masks`` ``(P, H, W)`` in [0, 1],
    moved like the images by ``augment`` (its ``warp_like_last``; call after it augmented the batch).

    ``fusion="union"``: 1 inside any of the pair's boxes. ``"majority"``: 1 where at least two of the
    pair's readers (``box_readers``, one id per box) drew a box; a pair whose boxes come from one
    reader (NIH, RSNA: no second opinion to vote with) keeps that reader's union. A pair whose
    majority is empty (two readers who drew disjoint boxes) is dropped: it says nowhere."""
    if fusion not in FUSIONS:
        raise ValueError(f"box fusion {fusion!r}: expected one of {FUSIONS}")
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
    if fusion == "majority" and box_readers is not None and len(pairs):
        readers = box_readers[image_idx, slot]
        # One mask per (pair, reader): the reader's own boxes as a union; then count readers per pixel.
        keys, of_key = torch.unique(torch.stack([pair_of_box, readers], 1), dim=0, return_inverse=True)
        per_reader = inside.new_zeros(len(keys), height, width).index_add_(0, of_key, inside).clamp_(max=1.0)
        votes = inside.new_zeros(len(pairs), height, width).index_add_(0, keys[:, 0], per_reader)
        n_readers = torch.bincount(keys[:, 0], minlength=len(pairs))
        needed = torch.where(n_readers >= 2, 2.0, 1.0).to(votes)
        masks = (votes >= needed[:, None, None]).float()
        keep = masks.flatten(1).any(1)
        pairs, masks = pairs[keep], masks[keep]
    else:
        masks = inside.new_zeros(len(pairs), height, width)
        masks = masks.index_add_(0, pair_of_box, inside).clamp_(max=1.0)  # the union of the pair's boxes
    if augment is not None and hasattr(augment, "warp_like_last") and len(pairs):
        masks = augment.warp_like_last(masks, pairs[:, 0])
    return pairs, masks


def cell_logits(activations: torch.Tensor, logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Differentiable pre-ReLU class maps ``(P, h, w)`` of ``logits[pairs[p, 0], pairs[p, 1]]`` at
    ``activations`` ``(B, C, h, w)`` (the CAM layer's output in the same forward pass), in logit
    units: ``h * w`` times Grad-CAM's weighted sum (module docstring)."""
    maps = activations.new_zeros(len(pairs), *activations.shape[-2:], dtype=torch.float32)
    # One backward per round, round r holding each image's r-th pair: image b's logits depend on
    # A[b] alone, so a sum over distinct images gives each its own gradient. Rounds number the most
    # pairs any image has, fewer than the batch's distinct findings (each a backward through every
    # layer above the CAM layer, twice with the second-order pass).
    order = torch.argsort(pairs[:, 0], stable=True)
    images = pairs[order, 0]
    first = torch.searchsorted(images, images, side="left")
    rounds = torch.empty_like(order)
    rounds[order] = torch.arange(len(order), device=order.device) - first
    for r in range(int(rounds.max()) + 1 if len(rounds) else 0):
        chosen = (rounds == r).nonzero(as_tuple=True)[0]
        rows = pairs[chosen, 0]
        (grad,) = torch.autograd.grad(logits[rows, pairs[chosen, 1]].sum(), activations, create_graph=True)
        weight = grad[rows].float().sum(dim=(2, 3), keepdim=True)
        maps = maps.index_copy(0, chosen, (weight * activations[rows].float()).sum(dim=1))
    return maps


def gradcam_maps(activations: torch.Tensor, logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's maps ``(P, h, w)`` (``relu(sum_k alpha_k A_k)``, ``alpha_k`` the gradient's
    spatial mean), differentiable: the map explain scores, before its min-max scaling."""
    z = cell_logits(activations, logits, pairs)
    return F.relu(z) / float(z.shape[-2] * z.shape[-1])


def attention_loss(z: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``-log`` the share of the null-celled softmax of the pre-ReLU maps ``z``
    ``(P, h, w)`` inside ``masks`` ``(P, H, W)`` (box coverage, downsampled to the map's cells by
    area); 0 for no pairs. Computed in log space: cell logits may be large."""
    if len(z) == 0:
        return z.sum()
    cover = F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), z.shape[-2:]).squeeze(1).flatten(1)
    flat = z.float().flatten(1)
    # A box moved off the image by augmentation covers no cell: nothing to pull towards.
    covered = cover.sum(1) > 0
    if not covered.any():
        return z.sum() * 0.0
    flat, cover = flat[covered], cover[covered]
    inside = torch.logsumexp(flat + torch.log(cover.clamp_min(1e-12)), dim=1)
    total = torch.logsumexp(torch.cat([flat, flat.new_zeros(len(flat), 1)], dim=1), dim=1)
    return (total - inside).mean()


def box_attention_loss(
    activations: torch.Tensor, logits: torch.Tensor, pairs: torch.Tensor, masks: torch.Tensor,
) -> torch.Tensor:
    """:func:`attention_loss` of the :func:`cell_logits` of ``pairs``."""
    if len(pairs) == 0:
        return logits.sum() * 0.0
    return attention_loss(cell_logits(activations, logits, pairs), masks)


def warmup_factor(step: int, steps_per_epoch: int, warmup_epochs: float) -> float:
    """The share of ``box_weight`` applied at optimiser step ``step``: 0 at the start, rising linearly
    to 1 after ``warmup_epochs`` epochs (1 throughout when ``warmup_epochs`` is 0)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, step / (warmup_epochs * max(1, steps_per_epoch)))


@contextlib.contextmanager
def capture_output(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs ``layer`` produces inside the block, in a list (a forward hook, removed after)."""
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()
