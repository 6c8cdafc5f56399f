"""The predict task behind ``python -m cxr_lightning.predict ckpt_path=PATH input=FILE_OR_DIR``.

Every file (PNG of any depth and channels, JPEG, DICOM) becomes model input through
:mod:`cxr_lightning.inputs`, as explain's image files do: the training decoder and resize, and a
metadata vector built by the training code from the optional demographics CSV, else the DICOM
header (a missing age gets the training median and ``age_missing``, a missing sex or view 0.5,
previous-visit findings 0); a view other than PA/AP (a lateral film in particular) is refused for
that file. The model's own preprocessing runs in :mod:`cxr_lightning.inference`.

The probability columns are calibrated by the calibration evaluate fitted on the validation split
(``<ckpt stem>.calibration.json``), the scale the thresholds were chosen on; ``raw_probabilities=true``
adds the model's own outputs as ``raw:<label>`` columns.

A file that cannot be read or is refused (corrupt, truncated, over the pixel budget ``max_pixels``,
not PNG/JPEG/DICOM, a DICOM whose window cannot be applied, a lateral view) is named on stderr, one
line per file, the others are still predicted and written, and the command exits with status
:data:`EXIT_SOME_FAILED` (1). A problem with the checkpoint, its sidecars or the options stops the
command before any file is read: one ``error:`` line and status 2.
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.progress import track
from torch.utils.data import DataLoader

from cxr_lightning import inference
from cxr_lightning.checkpoints import load_model, resolve_checkpoint
from cxr_lightning.data import images
from cxr_lightning.errors import ConfigError
from cxr_lightning.files import write_csv
from cxr_lightning.inputs import (
    CSV_FIELDS,
    ImageFiles,
    collect_inputs,
    file_metadata,
    read_demographics_csv,
    relative_key,
)
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.operating_point import OperatingPoint, load_operating_point
from cxr_lightning.run_dir import PREDICTIONS
from cxr_lightning.schema import safe_file_stem

log = logging.getLogger(__name__)

# raw_probabilities=true: the model's uncalibrated outputs as raw:<label> columns
RAW_PREFIX = "raw:"
# The exit status when some input files could not be predicted (the CSV holds the others).
EXIT_SOME_FAILED = 1
# The exit status when none could be (nothing is written): the commands' error status.
EXIT_NONE_PREDICTED = 2


@dataclass
class PredictionRun:
    """The outcome of :func:`predict`: one row per predicted file, and the files that failed."""

    predictions: pd.DataFrame
    failures: dict[str, str]
    output: Path
    thresholds_file: Path | None
    cam_files: list[Path] = field(default_factory=list)
    # Files predicted although they look wrongly scaled (constant, nearly binary, narrow window): why.
    scaling_warnings: dict[str, str] = field(default_factory=dict)


def predict(cfg: DictConfig) -> PredictionRun:
    """Predict every image under ``cfg.input`` and write the CSV of the successful ones.

    Never raises for a single bad file: those end up in ``PredictionRun.failures``.
    """
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be at least 1.")
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    output = _output_path(cfg)
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False)))
    if cfg.cam and model.backbone is None:
        raise ConfigError("cam=true: this checkpoint's head (metadata_only) has no image branch to explain.")
    labels = list(model.hparams.label_names)
    point = load_operating_point(ckpt, labels)  # the thresholds with the calibration they were chosen on

    root, files = collect_inputs(cfg.input)
    keys = [relative_key(f, root) for f in files]
    key_of = dict(zip(map(str, files), keys))
    csv = read_demographics_csv(cfg.demographics) if cfg.get("demographics") else None
    if csv is None and model.hparams.meta_names:
        warn_no_demographics(float(model.hparams.age_fill))
    demographics, meta, failures = file_metadata(files, keys, csv, model.hparams.meta_names, model.hparams.age_fill)
    kept = demographics[~demographics.index.isin(list(failures))]

    device = inference.default_device() if cfg.device == "auto" else cfg.device
    cam_dir = Path(cfg.cam_dir) if cfg.get("cam_dir") else output.parent / "cams"
    budget = int(cfg.get("max_pixels") or images.MAX_PIXELS)
    dataset = ImageFiles(kept.index.tolist(), meta, int(model.hparams.image_size), budget)
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers))
    rows, cam_files, scaling = [], [], {}
    batches = inference.probability_batches(model, loader, device)
    for batch, probs in track(batches, description="Predicting", total=len(loader), transient=True):
        failures.update({dataset.paths[i]: e for i, e in zip(batch["index"].tolist(), batch["error"]) if e})
        odd = {dataset.paths[i]: w for i, w in zip(batch["index"].tolist(), batch["warning"]) if w}
        for path, why in odd.items():
            log.warning("%s looks wrongly scaled for a radiograph: %s Its predictions are unreliable.", path, why)
        scaling.update(odd)
        read = torch.tensor([not e for e in batch["error"]], dtype=torch.bool)
        if not read.any():
            continue
        index = batch["index"][read.to(batch["index"].device)].cpu().numpy()
        rows.append(pd.DataFrame(probs[read].numpy(), columns=labels, index=[dataset.paths[i] for i in index]))
        if cfg.cam:
            names = [key_of[dataset.paths[i]] for i in index]
            on = read.to(batch["input"].device)
            cam_files += _save_cams(
                model, batch["input"][on], batch["meta"][on], batch["image"][on].cpu(), names, cfg, cam_dir
            )

    predictions = _prediction_table(rows, labels, point, kept, bool(cfg.raw_probabilities))
    if len(predictions) or not failures:
        write_csv(predictions, output, index=False)
        log.info("Predicted %d of %d file(s): %s", len(predictions), len(files), output)
    return PredictionRun(
        predictions, dict(sorted(failures.items())), output, point.thresholds_file, cam_files,
        dict(sorted(scaling.items())),
    )


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def _prediction_table(
    rows: list[pd.DataFrame],
    labels: list[str],
    point: OperatingPoint,
    demographics: pd.DataFrame,
    with_raw: bool,
) -> pd.DataFrame:
    """``file``, one probability column per label on the thresholds' scale (calibrated when they were
    chosen on a calibration), ``findings``, the demographics, and ``raw:<label>`` columns of the
    model's own outputs when asked for."""
    raw = pd.concat(rows) if rows else pd.DataFrame(columns=labels, dtype=float)
    probs = raw
    if len(raw):
        probs = pd.DataFrame(point.probabilities(raw.to_numpy()), index=raw.index, columns=raw.columns)
    positive = probs.to_numpy() >= point.thresholds
    findings = ["|".join(np.asarray(labels)[row]) for row in positive]
    used = demographics.reindex(probs.index)
    return pd.concat(
        [
            pd.Series(probs.index, name="file", index=probs.index),
            probs,
            pd.Series(findings, name="findings", index=probs.index, dtype=object),
            used[list(CSV_FIELDS)],
            *([raw.add_prefix(RAW_PREFIX)] if with_raw else []),
        ],
        axis=1,
    ).reset_index(drop=True)


def _save_cams(
    model: CXRClassifier,
    x: torch.Tensor,
    meta: torch.Tensor,
    pixels: torch.Tensor,
    keys: list[str],
    cfg: DictConfig,
    cam_dir: Path,
) -> list[Path]:
    from cxr_lightning.explain.cams import compute_cams
    from cxr_lightning.explain.overlays import save_overlay

    labels = list(model.hparams.label_names)
    result = compute_cams(
        model, x, meta, model.cam_layer, top_k=int(cfg.cam_top_k), method=cfg.cam_method,
        reshape_transform=model.cam_reshape(x.shape[-2:]),
    )
    written = []
    for pair, title in enumerate(result.titles(labels)):
        image_idx, cls = result.pairs[pair]
        # One file name inside cam_dir, whatever the input's relative path or the label holds.
        stem = "__".join(safe_file_stem(part) for part in Path(keys[image_idx]).with_suffix("").parts)
        path = cam_dir / f"{stem}_{safe_file_stem(labels[cls])}.png"
        written.append(
            save_overlay(pixels[image_idx], result.heatmaps[pair], path, title, bool(result.zero_gradient[pair]))
        )
    return written


def report_failures(run: PredictionRun) -> None:
    """List every failed file on stderr, one line each, and exit with :data:`EXIT_SOME_FAILED` if there
    was any (the CSV of the others is already written), or :data:`EXIT_NONE_PREDICTED` with one
    ``error:`` line when no file could be predicted (and no CSV was written)."""
    if not run.failures:
        return
    print(f"{len(run.failures)} file(s) could not be predicted:", file=sys.stderr)
    for file, reason in run.failures.items():
        print(f"failed: {file}: {' '.join(str(reason).split())}", file=sys.stderr)
    if run.predictions.empty:
        print(f"error: none of the {len(run.failures)} file(s) could be predicted (reasons above); {run.output} was "
              "not written.", file=sys.stderr)
        raise SystemExit(EXIT_NONE_PREDICTED)
    print(f"The other {len(run.predictions)} file(s) are in {run.output}.", file=sys.stderr)
    raise SystemExit(EXIT_SOME_FAILED)


# --------------------------------------------------------------------------------------------
def _output_path(cfg: DictConfig) -> Path:
    if cfg.get("output"):
        return Path(cfg.output)
    try:
        return Path(cfg.paths.output_dir) / PREDICTIONS  # Hydra's run directory
    except Exception:  # composed outside a Hydra run: ${hydra:...} cannot resolve
        raise ConfigError("Pass output=FILE.csv for the predictions.") from None


def warn_no_demographics(age_fill: float) -> None:
    """Once per run: without ``demographics=FILE`` the metadata the model reads comes from DICOM
    headers where they have it, and otherwise is what the model was trained to read as unknown."""
    warnings.warn(
        "predict: no demographics=FILE given, so age, sex and view come from DICOM headers where present; for "
        f"other files the model assumes age {age_fill:.0f} (the training median, flagged age_missing), sex and "
        "view unknown (0.5) and no previous-visit findings. Pass demographics=CSV for known values.",
        stacklevel=2,
    )
