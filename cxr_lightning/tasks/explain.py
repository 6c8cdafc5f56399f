"""The explain task behind ``python -m cxr_lightning.explain``: :func:`explain` takes the composed config.

From a checkpoint (or a training run directory) alone it writes, into the output directory:

* ``overlays/NNN_<image>_<Finding>.png``: one labelled heatmap overlay per (image, finding);
* ``cams.csv``: one row per overlay (image, finding, probability, zero_gradient, empty, number
  of ground-truth boxes drawn, title, file);
* ``tensorboard/``: the overlays as one image grid, tag ``cam_grid``;
* ``localization.csv``: per-finding pointing game, IoU and IoBB accuracy with the random-heatmap
  baseline (``random_*``; named in ``localization.random_baseline``) and ``box_share``, the hit
  rate of a uniformly placed point, over every image of the chosen split that has boxes (when the data has boxes);
  in a pooled run, the boxes of its NIH-layout sources only (``localization.sources``: a box source's
  boxes are training material, see ``CXRDataModule.localization_sources``);
* ``metrics.json``: counts of uninformative CAMs and the pooled localisation scores.

With ``run_dir=`` of an evaluated run, the run's ``report.html`` is rendered again with the
overlays as its gallery.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig
from torch.utils.tensorboard import SummaryWriter

from cxr_lightning import files
from cxr_lightning.checkpoints import load_model, resolve_checkpoint
from cxr_lightning.data import nih
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.data.nih import ORIGINAL_SIZE
from cxr_lightning.data.tables import SOURCE, SPLITS
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.evaluation import html
from cxr_lightning.explain.cams import CAM_METHODS, CamResult
from cxr_lightning.explain.inputs import (
    ImageSet,
    data_table,
    load_named,
    load_split,
    sample_rows,
)
from cxr_lightning.explain.localization import (
    ALL_FINDINGS_ROW,
    RANDOM_BASELINE,
    bbox_targets,
    localization_scores,
    pair_boxes,
)
from cxr_lightning.explain.overlays import save_overlay
from cxr_lightning.explain.sets import GRID_TAG, image_set_cams, result_grid
from cxr_lightning.inference import default_device
from cxr_lightning.inputs import read_demographics_csv
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.operating_point import load_calibration
from cxr_lightning.run_dir import ExplainDir, RunDir
from cxr_lightning.schema import safe_file_stem
from cxr_lightning.tasks.build import datamodule_for

log = logging.getLogger(__name__)



def explain(cfg: DictConfig) -> dict[str, Any]:
    """Run the explain task described by ``cfg`` (conf/explain.yaml); returns what ``metrics.json`` holds."""
    entries, split, method, top_k, batch_size = _checked_options(cfg)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    out = job_output_dir(cfg.get("output_dir"), cfg.get("run_dir"), _hydra_run_dir())
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False))).to(
        default_device() if cfg.device == "auto" else str(cfg.device)
    )
    if model.backbone is None:
        raise ConfigError(
            f"{ckpt} was trained with head=metadata_only: it never sees the image, so there is nothing "
            "for Grad-CAM to explain. Explain a model with head=baseline, fusion or fusion_residual."
        )
    findings = _finding_indices(cfg.get("findings"), model.label_names)
    dm = _datamodule(model, cfg.get("data"), required=split is not None)

    if split is not None:
        table = dm.split_table(split)
        shown = load_split(dm, split, sample_rows(len(table), int(cfg.n), int(cfg.seed)))
    else:
        table = data_table(dm) if dm is not None else None
        csv = read_demographics_csv(cfg.demographics) if cfg.get("demographics") else None
        shown = load_named(
            entries, model.hparams.image_size, model.meta_names, table, model.hparams.get("age_fill"), csv
        )
        if table is not None:
            table = table.reset_index()
            table = table[table[nih.IMAGE].isin(set(shown.names))]
    # The boxes drawn and scored: the localisation sources' (NIH's test boxes in a pooled box study).
    boxes = dm.localization_boxes(table) if dm is not None else None
    log.info("Explaining %d image(s) of %s with %s at %s", len(shown), split or "images=[...]", method, ckpt)

    targets = [findings] * len(shown) if findings is not None else None
    result = image_set_cams(model, shown, targets, top_k, method, batch_size)
    # titles and cams.csv show the probabilities predict reports: calibrated when evaluate fitted it
    calibration, _ = load_calibration(ckpt, model.label_names)
    if calibration is not None:
        result = dataclasses.replace(result, probabilities=calibration.apply(result.probabilities))
    overlays = _write_overlays(out, shown, result, model.label_names, boxes)
    _log_grid(ExplainDir(out).tensorboard, shown, result, model.label_names, boxes)

    metrics: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "method": method,
        "cam_layer": model.cam_layer_name,
        "split": split,
        "n_images": len(shown),
        "n_cams": len(result.pairs),
        "probabilities": (
            calibration.describe() if calibration is not None else "raw model outputs (no calibration file)"
        ),
        "cams.zero_gradient": result.n_zero_gradient,
        "cams.empty": result.n_empty,
        "overlays": str(ExplainDir(out).overlays),
        "tensorboard": str(ExplainDir(out).tensorboard),
    }
    if cfg.localization:
        metrics["localization.sources"] = ", ".join(dm.localization_sources) if dm is not None else ""
        metrics |= _localization(model, dm, split, shown, boxes, out, method, batch_size, int(cfg.seed))
    files.write_json(ExplainDir(out).metrics, metrics)
    _log_summary(out, metrics, overlays)
    run_dir = cfg.get("run_dir")
    if run_dir and out.resolve() == RunDir(run_dir).explain.root.resolve():
        page = html.run_report(run_dir)
        if page is not None:
            log.info("  report:       %s", page)
    return metrics


def job_output_dir(explicit: str | None, run_dir: str | None, hydra_run_dir: str | None = None) -> Path:
    """``explicit``, else ``<run_dir>/explain``, else Hydra's run dir (``outputs/explain/<time>``).

    conf/explain.yaml points Hydra's own run dir here too (resolver ``cxr.explain_dir``), so the
    job's log and ``.hydra/`` land beside its outputs.
    """
    explicit = explicit or (None if run_dir else hydra_run_dir)
    if explicit:
        return Path(explicit)
    if run_dir:
        return RunDir(run_dir).explain.root
    raise ConfigError("Pass output_dir=DIR or run_dir=DIR for the explain outputs.")


# --------------------------------------------------------------------------------------------
def _checked_options(cfg: DictConfig) -> tuple[list[str], str | None, str, int, int]:
    """``images`` entries, split (None with images), method, top_k, batch_size: checked before
    anything is loaded."""
    entries = _image_entries(cfg.get("images"))
    split = cfg.get("split")
    if entries and split:
        raise ConfigError(f"Pass either images=[...] or split={split}, not both.")
    split = None if entries else (split or "test")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {list(SPLITS)}.")
    method = str(cfg.method)
    if method not in CAM_METHODS:
        raise ConfigError(f"method={method!r}: expected one of {sorted(CAM_METHODS)}.")
    top_k, batch_size = int(cfg.top_k), int(cfg.batch_size)
    if top_k < 1 or batch_size < 1:
        raise ConfigError(f"top_k={top_k} and batch_size={batch_size} must both be >= 1.")
    return entries, split, method, top_k, batch_size


def _image_entries(images: Any) -> list[str]:
    if images is None:
        return []
    if isinstance(images, (list, tuple, ListConfig)):
        return [str(i) for i in images]
    return [str(images)]


def _finding_indices(findings: Any, label_names: Sequence[str]) -> list[int] | None:
    if findings is None:
        return None
    names = [str(f) for f in (findings if isinstance(findings, (list, tuple, ListConfig)) else [findings])]
    unknown = [f for f in names if f not in label_names]
    if unknown or not names:
        raise ConfigError(
            f"findings={names}: {unknown or 'empty'} not predicted by this model; choose from {list(label_names)} "
            "(e.g. findings=[Effusion,Mass])."
        )
    return [list(label_names).index(f) for f in names]


def _datamodule(model: CXRClassifier, data: Any, required: bool) -> CXRDataModule | None:
    """The checkpoint's data module; for images=[...] a missing dataset only costs the metadata."""
    try:
        return datamodule_for(model, data)
    except DataError as exc:
        if required:
            raise
        warnings.warn(
            f"the training data cannot be loaded ({exc}); explaining the image files without it: "
            "no metadata from the label table, no boxes. Pass data.root=DIR to point at the data.",
            UserWarning,
            stacklevel=3,
        )
        return None


def _hydra_run_dir() -> str | None:
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def _file_stem(name: str) -> str:
    return safe_file_stem(Path(name).stem)


def _write_overlays(
    out: Path, images: ImageSet, result: CamResult, label_names: Sequence[str], boxes: pd.DataFrame | None
) -> pd.DataFrame:
    folder = ExplainDir(out).overlays
    folder.mkdir(parents=True, exist_ok=True)
    # Overlays of an earlier job into the same folder would be mistaken for this one's.
    for stale in folder.glob("*.png"):
        stale.unlink()
    gt = _pair_boxes(result, images, label_names, boxes)
    rows = []
    for p, ((i, c), title) in enumerate(zip(result.pairs, result.titles(label_names))):
        finding = label_names[c]
        path = folder / f"{i:03d}_{_file_stem(images.names[i])}_{safe_file_stem(finding)}.png"
        save_overlay(images.images[i], result.heatmaps[p], path, title, bool(result.zero_gradient[p]), boxes=gt[p])
        rows.append(
            {
                "image": images.names[i],
                "finding": finding,
                "probability": float(result.probabilities[i, c]),
                "zero_gradient": bool(result.zero_gradient[p]),
                "empty": bool(result.empty[p]),
                "n_boxes": len(gt[p]),
                "title": title,
                "overlay": os.path.relpath(path, out),
            }
        )
    table = pd.DataFrame(rows)
    files.write_csv(table, ExplainDir(out).cams, index=False)
    return table


def _pair_boxes(result: CamResult, images: ImageSet, label_names: Sequence[str], boxes: pd.DataFrame | None):
    if boxes is None:
        return [[] for _ in result.pairs]
    size = tuple(images.images.shape[-2:])
    return pair_boxes(result.pairs, images.names, label_names, boxes, size, ORIGINAL_SIZE)


def _log_grid(
    log_dir: Path, images: ImageSet, result: CamResult, label_names: Sequence[str], boxes: pd.DataFrame | None
) -> None:
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        grid = result_grid(images, result, label_names, _pair_boxes(result, images, label_names, boxes))
        writer.add_image(GRID_TAG, grid, global_step=0)
    finally:
        writer.close()


def _localization(
    model: CXRClassifier,
    dm: CXRDataModule | None,
    split: str | None,
    shown: ImageSet,
    boxes: pd.DataFrame | None,
    out: Path,
    method: str,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Score every boxed image of ``split`` (images=[...]: the given ones) against its boxes."""
    if boxes is None:
        log.info("No %s in the data: no localisation scores.", "bounding-box table")
        return {"localization.n_images": 0, "localization.n_boxes": 0}
    boxed_names = set(boxes[nih.IMAGE])
    if split is not None:
        table = dm.split_table(split)
        boxed = table[nih.IMAGE].isin(boxed_names) & _of_sources(table, dm.localization_sources)
        rows = np.flatnonzero(boxed.to_numpy())
        images = load_split(dm, split, rows)
    else:
        images = shown.take([i for i, n in enumerate(shown.names) if n in boxed_names])
    targets = bbox_targets(images.names, model.label_names, boxes)
    scored = [i for i, t in enumerate(targets) if t]
    if not scored:
        log.info("No image of %s has a box of a finding the model predicts: no localisation scores.",
                 split or "images=[...]")
        return {"localization.n_images": 0, "localization.n_boxes": 0}
    images, targets = images.take(scored), [targets[i] for i in scored]
    log.info("Localisation: %d boxed image(s) of %s, the boxes of %s", len(images), split or "images=[...]",
             ", ".join(dm.localization_sources) if dm is not None else "the data")

    result = image_set_cams(model, images, targets, top_k=1, method=method, batch_size=batch_size)
    scores = localization_scores(
        result.heatmaps, result.pairs, images.names, model.label_names, boxes,
        tuple(images.images.shape[-2:]), original_size=ORIGINAL_SIZE, seed=seed,
    )
    files.write_csv(scores, ExplainDir(out).localization, index=True)
    pooled = scores.loc[ALL_FINDINGS_ROW]
    summary = {f"localization.{k}": float(v) for k, v in pooled.drop(["n_images", "n_boxes"]).items()}
    # The pooled row counts (image, finding) pairs in its n_images column.
    summary |= {
        "localization.n_images": len(images),
        "localization.n_pairs": int(pooled["n_images"]),
        "localization.n_boxes": int(pooled["n_boxes"]),
    }
    summary["localization.random_baseline"] = RANDOM_BASELINE
    summary["localization.zero_gradient"] = result.n_zero_gradient
    summary["localization.empty"] = result.n_empty
    return summary


def _of_sources(table: pd.DataFrame, names: Sequence[str]) -> pd.Series:
    """Which rows of a split table come from the sources ``names``."""
    if SOURCE not in table.columns:
        return pd.Series(True, index=table.index)
    return table[SOURCE].isin(names)


def _log_summary(out: Path, metrics: dict[str, Any], overlays: pd.DataFrame) -> None:
    log.info("Explain outputs: %s", out)
    log.info("  overlays:     %d PNG(s) in %s", len(overlays), ExplainDir(out).overlays)
    log.info("  TensorBoard:  tensorboard --logdir %s", ExplainDir(out).tensorboard)
    if metrics.get("localization.n_boxes"):
        log.info(
            "  localisation: %s (pointing game %.3f vs random heatmaps %.3f, uniform point %.3f; IoBB@0.5 %.3f vs "
            "random %.3f; the random baseline is described in metrics.json)",
            ExplainDir(out).localization,
            metrics["localization.pointing_game"], metrics["localization.random_pointing_game"],
            metrics["localization.box_share"],
            metrics["localization.iobb@0.5"], metrics["localization.random_iobb@0.5"],
        )
    bad = {k: v for k, v in metrics.items() if k.endswith((".zero_gradient", ".empty")) and v}
    if bad:
        log.warning("  uninformative CAMs: %s (marked on the overlays; see cams.csv)", bad)
