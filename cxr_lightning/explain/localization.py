"""Localisation scores of heatmaps against ground-truth boxes, as in Wang et al. 2017 (ChestX-ray8).

Pointing game, IoU and IoBB accuracy per finding, each beside a seeded random-heatmap baseline.
Boxes are ``(x, y, w, h)`` in continuous pixel coordinates of the heatmap: pixel ``(row r, col c)``
covers ``[c, c + 1) x [r, r + 1)``, so a connected component spanning columns ``c0..c1`` becomes
``x = c0, w = c1 - c0 + 1``.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from cxr_lightning.data.nih import BBOX_COLUMNS, BOX_FINDING, IMAGE, ORIGINAL_SIZE
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.explain.cams import CamWarning, is_blank

ALL_FINDINGS_ROW = "All"

Box = tuple[float, float, float, float]


def pointing_game_hit(heatmap: np.ndarray, boxes: Sequence[Box]) -> bool:
    """Whether the heatmap's maximum (centre of the first argmax pixel) lies in any box.

    A blank heatmap points nowhere and is a miss, so uninformative CAMs never score by accident.
    """
    if is_blank(heatmap):
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
    if is_blank(heatmap):
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


RANDOM_BASELINE = (
    "seeded random heatmaps: uniform noise smoothed with a periodic (wrap-around) Gaussian, so the maximum "
    "and every blob are uniformly placed; its pointing game equals, within sampling noise, the share of the "
    "image the boxes cover"
)


def random_heatmaps(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``(n, H, W)`` seeded baseline heatmaps: uniform noise smoothed to CAM-like blobs, in [0, 1].

    The Gaussian's sigma is 1/16 of the larger side, about the blob size of a CAM taken at 1/32
    of the input resolution and upsampled. The smoothing wraps around the edges (``mode="wrap"``),
    which makes the field stationary on the torus: every pixel is equally likely to hold the
    maximum and a blob is equally likely anywhere, so the baseline's pointing game is the hit rate
    of a uniformly placed point and its IoU/IoBB those of uniformly placed blobs. Mirror padding
    would not do: a border pixel then averages its own noise twice, its smoothed values vary
    more, and most maxima land on the border, far from any box.
    """
    noise = np.random.default_rng(seed).random((n, *shape))
    sigma = max(shape) / 16
    smooth = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="wrap")
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
    boxes = boxes[boxes[IMAGE].isin(set(image_names))]
    unknown = boxes.loc[~boxes[BOX_FINDING].isin(class_of.keys()), BOX_FINDING]
    if len(unknown):
        warnings.warn(
            f"{len(unknown)} boxes are of findings the model does not predict "
            f"({sorted(unknown.unique())}); they cannot be explained and are not scored",
            CamWarning,
            stacklevel=2,
        )
    known = boxes[boxes[BOX_FINDING].isin(class_of.keys())]
    classes = known.groupby(IMAGE)[BOX_FINDING].agg(
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
    original_size: float = ORIGINAL_SIZE,
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
    misses. ``random_*`` columns score :func:`random_heatmaps` (seeded; :data:`RANDOM_BASELINE`)
    the same way.

    Returns one row per finding with evaluated boxes, in ``label_names`` order, plus a row
    ``"All"`` pooling every box and pair; columns ``n_images``, ``n_boxes``, ``pointing_game``,
    ``iou@T``..., ``iobb@T``..., the ``random_`` versions of the scores, and ``box_share``: the
    mean share of pixels (centres) inside a pair's boxes, the pointing game of a uniformly placed
    point, which ``random_pointing_game`` estimates.
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
            IMAGE: np.asarray(image_names, dtype=object)[pairs[:, 0]],
            BOX_FINDING: np.asarray(label_names, dtype=object)[pairs[:, 1]],
            "pair": np.arange(len(pairs)),
        }
    ).drop_duplicates([IMAGE, BOX_FINDING])
    matched = boxes.merge(pair_table, on=[IMAGE, BOX_FINDING], how="left")
    in_images = matched[IMAGE].isin(set(image_names))
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
        box_scores = {"finding": group[BOX_FINDING].to_numpy()}
        pair_scores = {"finding": group[BOX_FINDING].iloc[0], "box_share": _box_share(gt, height, width)}
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
    columns += [f"random_{c}" for c in columns[2:]] + ["box_share"]
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


def _box_share(boxes: Sequence[Box], height: int, width: int) -> float:
    """Share of the heatmap's pixel centres inside the union of ``boxes`` (as :func:`pointing_game_hit` tests them)."""
    cols, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        inside |= ((rows >= y) & (rows <= y + h))[:, None] & ((cols >= x) & (cols <= x + w))[None, :]
    return float(inside.mean())


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



def pair_boxes(
    pairs: np.ndarray,
    image_names: Sequence[str],
    label_names: Sequence[str],
    bbox_table: pd.DataFrame,
    image_size: int | tuple[int, int],
    original_size: float = ORIGINAL_SIZE,
) -> list[list[Box]]:
    """Per (image, class) pair, that finding's ground-truth boxes on that image, rescaled to
    ``image_size`` like :func:`localization_scores` does (empty where there are none): for
    drawing on overlays."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    wanted = pd.DataFrame(
        {
            IMAGE: np.asarray(image_names, dtype=object)[pairs[:, 0]],
            BOX_FINDING: np.asarray(label_names, dtype=object)[pairs[:, 1]],
            "pair": np.arange(len(pairs)),
        }
    )
    matched = _scaled_boxes(
        _checked_bbox_table(bbox_table).merge(wanted, on=[IMAGE, BOX_FINDING]), width, height, original_size
    )
    grouped = matched.groupby("pair")[["x", "y", "w", "h"]].apply(
        lambda g: list(g.itertuples(index=False, name=None))
    )
    return [list(grouped.get(p, [])) for p in range(len(pairs))]
