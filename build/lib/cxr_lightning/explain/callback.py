"""``CamGridCallback``: a Grad-CAM grid of a few validation images in TensorBoard when training ends.

Cheap (``n`` images, one finding each) and on by default (conf/callbacks/default.yaml), so every
run shows at a glance where the model looks -- and warns when no gradient reaches the CAM layer,
the seed project's silent failure.
"""
from __future__ import annotations

import logging

import pytorch_lightning as pl

from cxr_lightning.callbacks import tensorboard_writer
from cxr_lightning.errors import ConfigError
from cxr_lightning.explain.cams import CAM_METHODS
from cxr_lightning.explain.inputs import load_split
from cxr_lightning.explain.sets import GRID_TAG, image_set_cams, result_grid

log = logging.getLogger(__name__)


class CamGridCallback(pl.Callback):
    """At the end of training, log CAMs of the top finding of the first ``n`` images of ``split``
    as the image ``tag`` (and the counts of uninformative CAMs as ``<tag>/zero_gradient``,
    ``<tag>/empty``) to the TensorBoard logger. Skipped without a TensorBoard logger or for a
    model that does not see the image (``head=metadata_only``)."""

    def __init__(self, n: int = 8, method: str = "gradcam", split: str = "val", tag: str = GRID_TAG) -> None:
        if n < 1:
            raise ConfigError(f"callbacks.cam_grid.n={n}: must be >= 1 (or set callbacks.cam_grid=null).")
        if method not in CAM_METHODS:
            raise ConfigError(f"callbacks.cam_grid.method={method!r}: expected one of {sorted(CAM_METHODS)}.")
        self.n, self.method, self.split, self.tag = n, method, split, tag

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            log.info("CamGridCallback: no TensorBoard logger, no CAM grid.")
            return
        if getattr(pl_module, "backbone", None) is None:
            log.info("CamGridCallback: the model does not see the image (head=metadata_only), no CAM grid.")
            return
        dm = trainer.datamodule
        try:
            images = load_split(dm, self.split, range(min(self.n, len(dm.split_table(self.split)))))
            result = image_set_cams(pl_module, images, None, top_k=1, method=self.method, batch_size=self.n)
            grid = result_grid(images, result, pl_module.label_names)
        except Exception:
            # A diagnostic must not cost a finished run its test metrics; the traceback is logged.
            log.warning("CamGridCallback: computing the CAM grid failed; training results are unaffected.",
                        exc_info=True)
            return
        step = trainer.global_step
        writer.add_image(self.tag, grid, global_step=step)
        writer.add_scalar(f"{self.tag}/zero_gradient", result.n_zero_gradient, global_step=step)
        writer.add_scalar(f"{self.tag}/empty", result.n_empty, global_step=step)
        if result.n_zero_gradient or result.n_empty:
            log.warning(
                "CamGridCallback: %d of %d CAMs got no gradient, %d are blank (marked in the '%s' grid).",
                result.n_zero_gradient, len(result.pairs), result.n_empty, self.tag,
            )
