"""Grad-CAM explanations of the classifier and their localisation scores against the NIH boxes.

The library: :mod:`.cams` (CAMs through ``pytorch_grad_cam``, zero-gradient detector),
:mod:`.localization` (pointing game, IoU/IoBB vs a random baseline), :mod:`.overlays` (PNG and
TensorBoard grids), :mod:`.inputs` (which images, with which metadata), :mod:`.sets` (CAMs of a
whole image set), :mod:`.callback` (a CAM grid in TensorBoard at the end of training; import it
from its module). The explain command is the task :mod:`cxr_lightning.tasks.explain`;
``__main__`` is only its ``python -m cxr_lightning.explain`` shim.
"""
from cxr_lightning.data.nih import BBOX_COLUMNS
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
from cxr_lightning.explain.localization import (
    ALL_FINDINGS_ROW,
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
from cxr_lightning.explain.sets import image_set_cams, result_grid

__all__ = [
    "ALL_FINDINGS_ROW",
    "BBOX_COLUMNS",
    "Box",
    "CAM_METHODS",
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
