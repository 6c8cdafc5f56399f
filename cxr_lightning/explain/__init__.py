"""Grad-CAM explanations of the classifier and their localisation scores against the NIH boxes.

``python -m cxr_lightning.explain ckpt_path=PATH|run_dir=DIR [split=test n=16 | images=[...]]``
runs :func:`explain` (conf/explain.yaml); :class:`CamGridCallback` logs a CAM grid at the end of
training. The pieces: :mod:`.cams` (CAMs through ``pytorch_grad_cam``, zero-gradient detector),
:mod:`.localization` (pointing game, IoU/IoBB vs a random baseline), :mod:`.overlays` (PNG and
TensorBoard grids), :mod:`.inputs` (which images, with which metadata), :mod:`.job` (the job).
"""
from cxr_lightning.explain.callback import CamGridCallback
from cxr_lightning.explain.cams import (
    CAM_METHODS,
    EMPTY_HEATMAP,
    NO_GRADIENT,
    CamResult,
    CamWarning,
    ImageOnly,
    compute_cams,
    is_blank,
)
from cxr_lightning.explain.inputs import ImageSet, UnknownMetadataWarning
from cxr_lightning.explain.job import explain, image_set_cams, result_grid
from cxr_lightning.explain.localization import (
    ALL_FINDINGS_ROW,
    BBOX_COLUMNS,
    Box,
    bbox_targets,
    heatmap_to_box,
    iobb,
    iou,
    localization_scores,
    pair_boxes,
    pointing_game_hit,
    random_heatmaps,
)
from cxr_lightning.explain.overlays import (
    cam_grid,
    overlay_title,
    render_overlay,
    save_overlay,
)

__all__ = [
    "ALL_FINDINGS_ROW",
    "BBOX_COLUMNS",
    "Box",
    "CAM_METHODS",
    "CamGridCallback",
    "CamResult",
    "CamWarning",
    "EMPTY_HEATMAP",
    "ImageOnly",
    "ImageSet",
    "NO_GRADIENT",
    "UnknownMetadataWarning",
    "bbox_targets",
    "cam_grid",
    "compute_cams",
    "explain",
    "heatmap_to_box",
    "image_set_cams",
    "iobb",
    "iou",
    "is_blank",
    "localization_scores",
    "overlay_title",
    "pair_boxes",
    "pointing_game_hit",
    "random_heatmaps",
    "render_overlay",
    "result_grid",
    "save_overlay",
]
