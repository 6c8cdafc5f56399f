"""Grad-CAM explanations for the multi-label classifier, and their localisation scores against the
NIH ChestX-ray14 bounding boxes.

The CAMs themselves come from ``pytorch_grad_cam``; this module adds what the library does not do
for us:

* :class:`ImageOnly` holds the metadata input fixed, so the library sees ``f(image) -> logits``;
* :func:`compute_cams` makes one CAM per (image, class) pair of a multi-label model, works inside
  ``torch.inference_mode()`` (Lightning's test/predict loops) and with a frozen backbone, leaves
  the model's modes, ``requires_grad`` flags and ``.grad`` as it found them, and flags every CAM
  that got no gradient at the target layer or came out blank -- the seed project's silent failure
  was all-zero heatmaps because no gradient reached the last convolution;
* localisation scores (pointing game, IoU and IoBB accuracy, each beside a random-heatmap
  baseline) per finding, as in Wang et al. 2017 (ChestX-ray8);
* labelled overlays for files and a grid for TensorBoard.

Boxes are ``(x, y, w, h)`` in continuous pixel coordinates of the heatmap: pixel ``(row r, col c)``
covers ``[c, c + 1) x [r, r + 1)``, so a connected component spanning columns ``c0..c1`` becomes
``x = c0, w = c1 - c0 + 1``.
"""
from __future__ import annotations

import contextlib
import os
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy import ndimage
from torch import nn
from torchvision.utils import make_grid

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.io import atomic_path


def _with_gradient_guard(cam_class: type[BaseCAM]) -> type[BaseCAM]:
    """``cam_class`` that survives a target layer no gradient reaches.

    When the layer's output is detached downstream its gradient hook never fires and the library
    would crash on a missing gradient; weighting the layer by a zero gradient instead yields a
    blank CAM that the zero-gradient detector then reports.
    """

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):  # noqa: ANN001
        store = self.activations_and_grads
        if self.uses_gradients and store.activations and not store.gradients:
            store.gradients = [torch.zeros_like(a) for a in store.activations]
        return cam_class.compute_cam_per_layer(self, input_tensor, targets, eigen_smooth)

    return type(cam_class.__name__, (cam_class,), {"compute_cam_per_layer": compute_cam_per_layer})


CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": _with_gradient_guard(GradCAM),
    "gradcam++": _with_gradient_guard(GradCAMPlusPlus),
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
}
NO_GRADIENT = "NO GRADIENT"
EMPTY_HEATMAP = "EMPTY HEATMAP"
BBOX_COLUMNS = ("Image Index", "Finding Label", "x", "y", "w", "h")
ALL_FINDINGS_ROW = "All"
# A heatmap whose range is below this is treated as blank (the library maps a constant CAM to 0).
_BLANK_RANGE = 1e-6

Box = tuple[float, float, float, float]


class CamWarning(UserWarning):
    """A CAM that carries no information: no gradient reached the target layer, or it is blank."""


# --------------------------------------------------------------------------------------------
# CAM computation
# --------------------------------------------------------------------------------------------
class ImageOnly(nn.Module):
    """``f(image) -> logits`` view of a ``forward(image, meta)`` model, with ``meta`` held fixed.

    Set :attr:`meta` (``(B, M)``, one row per image of the next call, or one row broadcast to the
    whole batch -- ScoreCAM feeds many masked copies of one image) before calling.
    """

    def __init__(self, model: nn.Module, meta: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.meta = meta

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.meta is None:
            raise RuntimeError("ImageOnly.meta is not set; assign the batch's (B, M) metadata first")
        meta = self.meta.to(image.device)
        if meta.shape[0] == 1 and image.shape[0] != 1:
            meta = meta.expand(image.shape[0], -1)
        elif meta.shape[0] != image.shape[0]:
            raise ValueError(
                f"ImageOnly: metadata has {meta.shape[0]} rows but the image batch has "
                f"{image.shape[0]}; set .meta to one row per image (or a single row)"
            )
        return self.model(image, meta)


@dataclass
class CamResult:
    """CAMs of ``N`` images, one per (image, class) pair.

    ``heatmaps``: ``(P, H, W)`` float32 in [0, 1] at the input size; ``pairs``: ``(P, 2)`` int64
    ``(image_idx, class_idx)``; ``probabilities``: ``(N, L)`` sigmoid outputs of every image;
    ``zero_gradient``: ``(P,)`` no gradient reached the target layer (always False for the
    gradient-free ``scorecam``/``eigencam``); ``empty``: ``(P,)`` the heatmap is blank.
    """

    heatmaps: np.ndarray
    pairs: np.ndarray
    probabilities: np.ndarray
    zero_gradient: np.ndarray
    empty: np.ndarray
    method: str

    @property
    def pair_probabilities(self) -> np.ndarray:
        """``(P,)`` probability of each pair's class for its image."""
        return self.probabilities[self.pairs[:, 0], self.pairs[:, 1]]

    @property
    def n_zero_gradient(self) -> int:
        return int(self.zero_gradient.sum())

    @property
    def n_empty(self) -> int:
        return int(self.empty.sum())

    def titles(self, label_names: Sequence[str]) -> list[str]:
        """One overlay title per pair: finding, probability, and a marker on uninformative CAMs."""
        titles = []
        for (_, cls), prob, no_grad, empty in zip(
            self.pairs, self.pair_probabilities, self.zero_gradient, self.empty
        ):
            marker = NO_GRADIENT if no_grad else EMPTY_HEATMAP if empty else None
            text = f"{label_names[cls]} p={prob:.2f}"
            titles.append(f"{marker}: {text}" if marker else text)
        return titles


def compute_cams(
    model: nn.Module,
    images: torch.Tensor,
    meta: torch.Tensor,
    target_layer: nn.Module,
    targets: Sequence[Sequence[int]] | None = None,
    top_k: int = 3,
    method: str = "gradcam",
    batch_size: int = 16,
) -> CamResult:
    """One CAM per (image, class) pair of a multi-label ``model(image, meta) -> logits``.

    ``images``: ``(N, C, H, W)`` float, already normalised as the model expects; ``meta``:
    ``(N, M)``. ``targets[i]`` lists the class indices to explain for image ``i``; when None, the
    ``top_k`` most probable classes of each image, most probable first. Pairs are run through the
    library ``batch_size`` at a time (ScoreCAM: one at a time, it batches masked copies itself).

    Safe to call from Lightning hooks: it leaves inference mode, enables grad, runs the model in
    eval mode and restores every module's mode, every parameter's ``requires_grad`` and ``.grad``
    afterwards. Parameters are not differentiated at all; the input requires grad instead, so a
    frozen backbone still carries gradients to the target layer. Heatmaps that got no gradient or
    came out blank are flagged in the result and reported with a :class:`CamWarning`.
    """
    cam_class = CAM_METHODS.get(method)
    if cam_class is None:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    if images.ndim != 4 or meta.ndim != 2 or meta.shape[0] != images.shape[0]:
        raise ValueError(
            f"compute_cams needs images (N, C, H, W) and meta (N, M) with the same N; "
            f"got {tuple(images.shape)} and {tuple(meta.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"compute_cams needs normalised float images, got dtype {images.dtype}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    with torch.inference_mode(False), torch.enable_grad(), _cam_mode(model):
        device = next(model.parameters()).device
        # clone(): tensors made under inference mode cannot enter autograd.
        images = images.detach().clone().to(device)
        meta = meta.detach().clone().to(device)
        with torch.no_grad():
            probabilities = torch.sigmoid(model(images, meta).float()).cpu()
        pairs = _select_pairs(probabilities, targets, top_k)

        wrapper = ImageOnly(model)
        cam = cam_class(model=wrapper, target_layers=[target_layer])
        chunk = 1 if issubclass(cam_class, ScoreCAM) else batch_size
        cam.batch_size = batch_size  # ScoreCAM's masked-copy batch
        heatmaps, zero_gradient = [], []
        try:
            for start in range(0, len(pairs), chunk):
                part = pairs[start : start + chunk]
                maps, no_grad = _run_cam(cam, wrapper, images, meta, part)
                heatmaps.append(maps)
                zero_gradient.append(no_grad)
        finally:
            cam.activations_and_grads.release()

    height, width = images.shape[-2:]
    heatmaps_np = np.concatenate(heatmaps) if heatmaps else np.zeros((0, height, width), np.float32)
    zero_np = np.concatenate(zero_gradient) if zero_gradient else np.zeros(0, bool)
    result = CamResult(
        heatmaps=heatmaps_np.astype(np.float32),
        pairs=pairs,
        probabilities=probabilities.numpy(),
        zero_gradient=zero_np,
        empty=np.array([_is_blank(h) for h in heatmaps_np], dtype=bool),
        method=method,
    )
    _warn_uninformative(result, target_layer)
    return result


def _run_cam(
    cam: BaseCAM, wrapper: ImageOnly, images: torch.Tensor, meta: torch.Tensor, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps ``(p, H, W)`` and zero-gradient flags ``(p,)`` for one chunk of pairs."""
    rows = torch.as_tensor(pairs[:, 0], device=images.device)
    x = images[rows].requires_grad_(cam.uses_gradients)
    wrapper.meta = meta[rows]
    cam_targets = [ClassifierOutputTarget(int(c)) for c in pairs[:, 1]]
    try:
        maps = cam(input_tensor=x, targets=cam_targets)
    except RuntimeError as err:
        # The logits do not depend differentiably on the input at all: nothing to explain.
        if "does not require grad" not in str(err):
            raise
        return np.zeros((len(pairs), *x.shape[-2:]), np.float32), np.ones(len(pairs), bool)
    if not cam.uses_gradients:
        return maps, np.zeros(len(pairs), bool)
    grads = cam.activations_and_grads.gradients
    reached = torch.stack([g.reshape(len(pairs), -1).ne(0).any(dim=1) for g in grads]).any(dim=0)
    return maps, ~reached.numpy()


def _select_pairs(
    probabilities: torch.Tensor, targets: Sequence[Sequence[int]] | None, top_k: int
) -> np.ndarray:
    n_images, n_labels = probabilities.shape
    if targets is None:
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        classes = probabilities.topk(min(top_k, n_labels), dim=1).indices.numpy()
        image_idx = np.repeat(np.arange(n_images), classes.shape[1])
        return np.stack([image_idx, classes.reshape(-1)], axis=1).astype(np.int64)
    if len(targets) != n_images:
        raise ConfigError(f"targets has {len(targets)} entries but there are {n_images} images")
    pairs = [(i, int(c)) for i, classes in enumerate(targets) for c in classes]
    bad = [p for p in pairs if not 0 <= p[1] < n_labels]
    if bad:
        raise ConfigError(
            f"target class index out of range 0..{n_labels - 1} for (image, class) {bad[:5]}"
        )
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@contextlib.contextmanager
def _cam_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients; afterwards everything exactly as before.

    Flags are restored module by module (``model.train(mode)`` would overwrite submodules that a
    frozen-backbone setup keeps in eval), and ``.grad`` is restored because the library calls
    ``model.zero_grad()``, which would otherwise wipe gradients being accumulated in training.
    """
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad


def _is_blank(heatmap: np.ndarray) -> bool:
    return not np.isfinite(heatmap).all() or float(np.ptp(heatmap)) <= _BLANK_RANGE


def _warn_uninformative(result: CamResult, target_layer: nn.Module) -> None:
    layer = type(target_layer).__name__
    n = len(result.pairs)
    if result.n_zero_gradient:
        which = [tuple(map(int, p)) for p in result.pairs[result.zero_gradient][:10]]
        warnings.warn(
            f"{result.method}: {result.n_zero_gradient} of {n} CAMs got NO GRADIENT at the "
            f"target layer ({layer}); (image, class) pairs {which}"
            f"{' ...' if result.n_zero_gradient > 10 else ''}. The logits do not depend on that "
            "layer's output: check cam_layer names a layer that feeds the head and is not detached.",
            CamWarning,
            stacklevel=3,
        )
    blank_only = result.empty & ~result.zero_gradient
    if blank_only.any():
        which = [tuple(map(int, p)) for p in result.pairs[blank_only][:10]]
        warnings.warn(
            f"{result.method}: {int(blank_only.sum())} of {n} CAMs are blank (no positive "
            f"evidence at {layer} after ReLU); (image, class) pairs {which}"
            f"{' ...' if blank_only.sum() > 10 else ''}",
            CamWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Localisation scores
# --------------------------------------------------------------------------------------------
def pointing_game_hit(heatmap: np.ndarray, boxes: Sequence[Box]) -> bool:
    """Whether the heatmap's maximum (centre of the first argmax pixel) lies in any box.

    A blank heatmap points nowhere and is a miss, so uninformative CAMs never score by accident.
    """
    if _is_blank(heatmap):
        return False
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    px, py = col + 0.5, row + 0.5
    return any(x <= px <= x + w and y <= py <= y + h for x, y, w, h in boxes)


def heatmap_to_box(heatmap: np.ndarray, threshold: float = 0.5) -> list[Box]:
    """Bounding boxes of the connected regions where the min-max normalised heatmap >= threshold.

    Uses ``scipy.ndimage.label`` with 8-connectivity; one box per component, largest first.
    ``threshold`` is a fraction of the heatmap's range (0.5: at least half-way from min to max).
    A blank heatmap has no boxes.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"heatmap binarisation threshold must be in (0, 1], got {threshold}")
    if _is_blank(heatmap):
        return []
    norm = (heatmap - heatmap.min()) / np.ptp(heatmap)
    labelled, _ = ndimage.label(norm >= threshold, structure=np.ones((3, 3), dtype=bool))
    boxes = [
        (float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start))
        for rows, cols in ndimage.find_objects(labelled)
    ]
    sizes = np.bincount(labelled.ravel())[1:]
    return [boxes[i] for i in np.argsort(-sizes, kind="stable")]


def _intersection(a: Box, b: Box) -> float:
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dx, 0.0) * max(dy, 0.0)


def iou(box_a: Box, box_b: Box) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes."""
    inter = _intersection(box_a, box_b)
    union = box_a[2] * box_a[3] + box_b[2] * box_b[3] - inter
    return inter / union if union > 0 else 0.0


def iobb(pred_box: Box, gt_box: Box) -> float:
    """Intersection over the *detected* (predicted) box's area -- Wang et al. 2017's IoBB."""
    area = pred_box[2] * pred_box[3]
    return _intersection(pred_box, gt_box) / area if area > 0 else 0.0


def random_heatmaps(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``(n, H, W)`` seeded baseline heatmaps: uniform noise smoothed to CAM-like blobs, in [0, 1].

    The Gaussian's sigma is 1/16 of the larger side, about the blob size of a CAM taken at 1/32
    of the input resolution and upsampled.
    """
    noise = np.random.default_rng(seed).random((n, *shape))
    sigma = max(shape) / 16
    smooth = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="reflect")
    lo = smooth.min(axis=(1, 2), keepdims=True)
    span = np.ptp(smooth, axis=(1, 2), keepdims=True)
    return ((smooth - lo) / np.where(span > 0, span, 1)).astype(np.float32)


def bbox_targets(
    image_names: Sequence[str], label_names: Sequence[str], bbox_table: pd.DataFrame
) -> list[list[int]]:
    """Per image, the class indices of its boxed findings: the ``targets`` for :func:`compute_cams`
    when the CAMs are to be scored against the boxes."""
    boxes = _checked_bbox_table(bbox_table)
    class_of = {name: i for i, name in enumerate(label_names)}
    boxes = boxes[boxes["Image Index"].isin(set(image_names))]
    unknown = boxes.loc[~boxes["Finding Label"].isin(class_of.keys()), "Finding Label"]
    if len(unknown):
        warnings.warn(
            f"{len(unknown)} boxes are of findings the model does not predict "
            f"({sorted(unknown.unique())}); they cannot be explained and are not scored",
            CamWarning,
            stacklevel=2,
        )
    known = boxes[boxes["Finding Label"].isin(class_of.keys())]
    classes = known.groupby("Image Index")["Finding Label"].agg(
        lambda s: sorted({class_of[f] for f in s})
    )
    return [list(classes.get(name, [])) for name in image_names]


def localization_scores(
    heatmaps: np.ndarray,
    pairs: np.ndarray,
    image_names: Sequence[str],
    label_names: Sequence[str],
    bbox_table: pd.DataFrame,
    image_size: int | tuple[int, int],
    original_size: float = 1024,
    thresholds: Sequence[float] = (0.1, 0.3, 0.5),
    binarize_threshold: float = 0.5,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-finding localisation scores of CAMs against ground-truth boxes, beside a random baseline.

    Every box whose (image, finding) has a heatmap in ``pairs`` is scored; boxes are rescaled from
    the original image (``OriginalImage Width/Height`` columns of ``bbox_table`` when present, else
    ``original_size`` pixels square) to ``image_size``. Each heatmap is binarised at
    ``binarize_threshold`` of its range and turned into one box per connected region
    (:func:`heatmap_to_box`). A ground-truth box counts as localised at threshold ``T`` when some
    heatmap box reaches IoU >= T (``iou@T``) or IoBB >= T (``iobb@T``, intersection over the
    heatmap box's area, Wang et al. 2017). ``pointing_game`` is the fraction of (image, finding)
    pairs whose heatmap maximum lies inside one of that finding's boxes. Blank heatmaps score as
    misses. ``random_*`` columns score :func:`random_heatmaps` (seeded) the same way.

    Returns one row per finding with evaluated boxes, in ``label_names`` order, plus a row
    ``"All"`` pooling every box and pair; columns ``n_images``, ``n_boxes``, ``pointing_game``,
    ``iou@T``..., ``iobb@T``..., and the ``random_`` versions of the scores.
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if heatmaps.ndim != 3 or len(heatmaps) != len(pairs) or heatmaps.shape[1:] != (height, width):
        raise ValueError(
            f"heatmaps {heatmaps.shape} must be (len(pairs)={len(pairs)}, {height}, {width})"
        )
    if len(pairs) and (pairs[:, 0].max() >= len(image_names) or pairs[:, 1].max() >= len(label_names)):
        raise ValueError(
            f"pairs index beyond the {len(image_names)} image names or {len(label_names)} label names"
        )
    boxes = _checked_bbox_table(bbox_table)
    pair_table = pd.DataFrame(
        {
            "Image Index": np.asarray(image_names, dtype=object)[pairs[:, 0]],
            "Finding Label": np.asarray(label_names, dtype=object)[pairs[:, 1]],
            "pair": np.arange(len(pairs)),
        }
    ).drop_duplicates(["Image Index", "Finding Label"])
    matched = boxes.merge(pair_table, on=["Image Index", "Finding Label"], how="left")
    in_images = matched["Image Index"].isin(set(image_names))
    unscored = int((in_images & matched["pair"].isna()).sum())
    if unscored:
        warnings.warn(
            f"{unscored} boxes of the given images have no heatmap for their finding and are not "
            "scored; compute the CAMs with targets=bbox_targets(...) to score every box",
            CamWarning,
            stacklevel=2,
        )
    matched = matched[matched["pair"].notna()].astype({"pair": np.int64})
    matched = _scaled_boxes(matched, width, height, original_size)

    evaluated = np.sort(matched["pair"].unique())
    baseline = dict(zip(evaluated, random_heatmaps(len(evaluated), (height, width), seed)))
    per_box, per_pair = [], []
    for pair, group in matched.groupby("pair", sort=True):
        gt = list(group[["x", "y", "w", "h"]].itertuples(index=False, name=None))
        box_scores = {"finding": group["Finding Label"].to_numpy()}
        pair_scores = {"finding": group["Finding Label"].iloc[0]}
        for prefix, heatmap in (("", heatmaps[pair]), ("random_", baseline[pair])):
            predicted = heatmap_to_box(heatmap, binarize_threshold)
            pair_scores[f"{prefix}pointing_game"] = pointing_game_hit(heatmap, gt)
            box_scores[f"{prefix}iou"] = [max((iou(p, g) for p in predicted), default=0.0) for g in gt]
            box_scores[f"{prefix}iobb"] = [max((iobb(p, g) for p in predicted), default=0.0) for g in gt]
        per_box.append(pd.DataFrame(box_scores))
        per_pair.append(pair_scores)
    return _summarise(per_box, per_pair, label_names, thresholds)


def _summarise(
    per_box: list[pd.DataFrame], per_pair: list[dict], label_names: Sequence[str], thresholds: Sequence[float]
) -> pd.DataFrame:
    """Per-finding means (and the pooled ``All`` row) of per-pair hits and per-box accuracies."""
    score_cols = [f"{kind}@{t:g}" for kind in ("iou", "iobb") for t in thresholds]
    columns = ["n_images", "n_boxes", "pointing_game", *score_cols]
    columns += [f"random_{c}" for c in columns[2:]]
    if not per_box:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="finding"))
    best = pd.concat(per_box, ignore_index=True)
    boxes = pd.DataFrame(
        {
            f"{prefix}{kind}@{t:g}": best[f"{prefix}{kind}"] >= t
            for prefix in ("", "random_")
            for kind in ("iou", "iobb")
            for t in thresholds
        }
    ).assign(finding=best["finding"])
    pairs = pd.DataFrame(per_pair)
    counts = pd.DataFrame({"n_images": pairs["finding"].value_counts(), "n_boxes": boxes["finding"].value_counts()})
    table = pd.concat([counts, pairs.groupby("finding").mean(), boxes.groupby("finding").mean()], axis=1)
    table = table.reindex([f for f in label_names if f in table.index])
    pooled = {"n_images": len(pairs), "n_boxes": len(boxes)}
    pooled |= pairs.drop(columns="finding").mean().to_dict() | boxes.drop(columns="finding").mean().to_dict()
    table.loc[ALL_FINDINGS_ROW] = pd.Series(pooled)
    table = table[columns].astype(float).astype({"n_images": int, "n_boxes": int})
    table.index.name = "finding"
    return table


def _checked_bbox_table(bbox_table: pd.DataFrame) -> pd.DataFrame:
    source = bbox_table.attrs.get("source", "bounding-box table")
    missing = [c for c in BBOX_COLUMNS if c not in bbox_table.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; expected {list(BBOX_COLUMNS)} "
            "(read it with cxr_lightning.data.nih.read_bbox_table)"
        )
    coords = bbox_table[["x", "y", "w", "h"]]
    bad = coords.isna().any(axis=1) | (coords[["w", "h"]] <= 0).any(axis=1)
    if bad.any():
        raise DataError(
            f"{source}: rows {list(bbox_table.index[bad][:5])} have missing or non-positive box "
            "coordinates; fix or remove them"
        )
    return bbox_table


def _scaled_boxes(boxes: pd.DataFrame, width: int, height: int, original_size: float) -> pd.DataFrame:
    orig_w = boxes.get("OriginalImage Width", pd.Series(np.nan, index=boxes.index)).fillna(original_size)
    orig_h = boxes.get("OriginalImage Height", pd.Series(np.nan, index=boxes.index)).fillna(original_size)
    sx, sy = width / orig_w.astype(float), height / orig_h.astype(float)
    return boxes.assign(x=boxes["x"] * sx, w=boxes["w"] * sx, y=boxes["y"] * sy, h=boxes["h"] * sy)


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------
def overlay_title(title: str, heatmap: np.ndarray, zero_gradient: bool = False) -> str:
    """``title`` with a marker when the heatmap carries nothing, so a blank is never quiet."""
    if NO_GRADIENT in title or EMPTY_HEATMAP in title:
        return title
    if zero_gradient:
        return f"{NO_GRADIENT}: {title}"
    if _is_blank(np.asarray(heatmap)):
        return f"{EMPTY_HEATMAP}: {title}"
    return title


def render_overlay(
    image: np.ndarray | torch.Tensor,
    heatmap: np.ndarray,
    title: str,
    zero_gradient: bool = False,
    min_width: int = 256,
    title_lines: int = 2,
) -> np.ndarray:
    """``(H', W', 3)`` uint8 RGB: heatmap (jet) blended on the grey image under a title banner.

    Small images are upscaled to ``min_width`` so the title stays legible; the banner always has
    ``title_lines`` lines (longer titles are truncated), so overlays of one size stack in a grid.
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


def save_overlay(
    image: np.ndarray | torch.Tensor,
    heatmap: np.ndarray,
    path: str | os.PathLike,
    title: str,
    zero_gradient: bool = False,
) -> Path:
    """Write :func:`render_overlay` as a PNG, atomically; returns ``path``."""
    rendered = Image.fromarray(render_overlay(image, heatmap, title, zero_gradient))
    with atomic_path(path, suffix=".png") as tmp:
        rendered.save(tmp, format="PNG")
    return Path(path)


def cam_grid(
    images: Sequence[np.ndarray] | torch.Tensor,
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str],
    zero_gradient: Sequence[bool] | None = None,
    nrow: int = 4,
) -> torch.Tensor:
    """``(3, H, W)`` float tensor in [0, 1] of labelled overlays, for ``SummaryWriter.add_image``.

    All images must share one size (one batch).
    """
    if not len(images) == len(heatmaps) == len(titles):
        raise ValueError(
            f"cam_grid needs as many images, heatmaps and titles; got "
            f"{len(images)}, {len(heatmaps)}, {len(titles)}"
        )
    if len(images) == 0:
        raise ValueError("cam_grid needs at least one image")
    flags = zero_gradient if zero_gradient is not None else [False] * len(images)
    tiles = [
        torch.from_numpy(render_overlay(img, hm, t, bool(z))).permute(2, 0, 1)
        for img, hm, t, z in zip(images, heatmaps, titles, flags)
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
