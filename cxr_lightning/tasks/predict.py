"""The predict task behind ``python -m cxr_lightning.predict ckpt_path=PATH input=FILE_OR_DIR``.

Every file (PNG of any depth and channels, JPEG, DICOM) goes through the same decoder and resize
as the training images (:func:`cxr_lightning.data.images.load_resized`) and the model's own
preprocessing (through :mod:`cxr_lightning.inference`), and its metadata vector is built by the training code
(:func:`cxr_lightning.data.cohort.encode_demographics`) in the checkpoint's column order:

* age, sex and view come from the optional demographics CSV, else from the DICOM header; an age
  over 100 or a missing age is imputed with the training median and flagged in ``age_missing``
  exactly as in training; a missing sex or view gets 0.5, halfway between the two codes the model
  was trained on, since the training data had no such case;
* previous-visit findings are unknown for a single new image: ``prior:*`` are 0 and
  ``has_prior`` is 0, as for a patient's first visit in training;
* a view other than PA/AP (a lateral film in particular) is refused for that file.

The probability columns are calibrated by the calibration evaluate fitted on the validation split
(``<ckpt stem>.calibration.json``), the scale the thresholds were chosen on; ``raw_probabilities=true``
adds the model's own outputs as ``raw:<label>`` columns.

A file that cannot be read or is refused is named in a summary at the end, the others are still
predicted and written, and the command exits with status 1.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from cxr_lightning import inference
from cxr_lightning.calibration import Calibration
from cxr_lightning.checkpoints import load_calibration, load_model, load_thresholds, resolve_checkpoint
from cxr_lightning.data import cohort, images, nih
from cxr_lightning.data.sources.common import FRONTAL_VIEWS
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import atomic_path
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.run_dir import PREDICTIONS

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")
CSV_KEYS = ("file", nih.IMAGE)
CSV_FIELDS = ("age", "sex", "view")
# raw_probabilities=true: the model's uncalibrated outputs as raw:<label> columns
RAW_PREFIX = "raw:"


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
    thresholds, thresholds_file = load_thresholds(ckpt, labels)
    calibration, _ = load_calibration(ckpt, labels)  # the thresholds are on its scale

    root, files = collect_inputs(cfg.input)
    keys = [_relative(f, root) for f in files]
    key_of = dict(zip(map(str, files), keys))
    csv = read_demographics_csv(cfg.demographics) if cfg.get("demographics") else None
    demographics, failures = gather_demographics(files, keys, csv)
    kept = demographics[~demographics.index.isin(list(failures))]
    meta = cohort.new_patient_metadata(kept, model.hparams.meta_names, model.hparams.age_fill)

    device = inference.default_device() if cfg.device == "auto" else cfg.device
    cam_dir = Path(cfg.cam_dir) if cfg.get("cam_dir") else output.parent / "cams"
    dataset = ImageFiles(kept.index.tolist(), meta, int(model.hparams.image_size))
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
            cam_files += _save_cams(model, batch["input"][on], batch["meta"][on], batch["image"][on].cpu(), names, cfg, cam_dir)

    predictions = _prediction_table(rows, labels, thresholds, kept, calibration, bool(cfg.raw_probabilities))
    with atomic_path(output) as tmp:
        predictions.to_csv(tmp, index=False)
    log.info("Predicted %d of %d file(s): %s", len(predictions), len(files), output)
    return PredictionRun(predictions, dict(sorted(failures.items())), output, thresholds_file, cam_files, dict(sorted(scaling.items())))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def collect_inputs(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, files)``: one file as given, or every image file under a folder (recursively, sorted).

    In a folder, files with an image suffix count, and suffix-less files that carry the DICOM magic
    (PACS exports often have no suffix); anything else is ignored.
    """
    target = Path(path)
    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise DataError(f"input={path} does not exist; pass an image file or a folder of images.")
    files = sorted(
        f
        for f in target.rglob("*")
        if f.is_file() and (f.suffix.lower() in INPUT_SUFFIXES or (not f.suffix and images.is_dicom(f)))
    )
    if not files:
        raise DataError(f"input={path} holds no image files ({', '.join(INPUT_SUFFIXES)} or DICOM without a suffix).")
    return target, files


def read_demographics_csv(path: str | os.PathLike) -> pd.DataFrame:
    """The demographics CSV indexed by its ``file`` (or ``Image Index``) column, with float ``age``
    (NaN when blank) and upper-case ``sex``/``view`` (NA when blank); missing columns are all blank."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"demographics={path} does not exist.")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # parser errors, binary files
        raise DataError(f"demographics={path} is not a readable CSV ({type(exc).__name__}: {exc}).") from exc
    key = next((k for k in CSV_KEYS if k in raw.columns), None)
    if key is None:
        raise DataError(
            f"demographics={path} needs a `file` (or `Image Index`) column naming each image; "
            f"its columns are {list(raw.columns)}."
        )
    if not set(CSV_FIELDS) & set(raw.columns):
        raise DataError(f"demographics={path} has none of the columns {list(CSV_FIELDS)}; columns are {list(raw.columns)}.")
    names = raw[key].str.strip()
    repeated = names.duplicated(keep=False) & (names != "")
    if repeated.any():
        raise DataError(f"demographics={path}: file(s) listed more than once: {sorted(set(names[repeated]))[:5]}.")
    text = raw.reindex(columns=CSV_FIELDS, fill_value="").apply(lambda c: c.str.strip())
    age = pd.to_numeric(text["age"], errors="coerce")
    bad_age = (age.isna() & (text["age"] != "")) | (age < 0)
    sex = text["sex"].str.upper().replace("", pd.NA)
    bad_sex = sex.notna() & ~sex.isin(["M", "F"])
    for bad, what in ((bad_age, "age must be a number of years >= 0"), (bad_sex, "sex must be M or F")):
        if bad.any():
            rows = (bad[bad].index[:5] + 2).tolist()  # +2: header line, 1-based
            raise DataError(f"demographics={path}: {what} (or blank); see line(s) {rows}: {text.loc[bad].head(5).to_dict('records')}.")
    table = pd.DataFrame(
        {"age": age, "sex": sex, "view": text["view"].str.upper().replace("", pd.NA)}
    ).set_axis(names.to_numpy())
    table.attrs["source"] = str(path)
    return table[names.to_numpy() != ""]


def gather_demographics(
    files: Sequence[Path], keys: Sequence[str], csv: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Age/sex/view per file (index: the file path), CSV values first, then the DICOM header, and
    the files refused already (unreadable DICOM header, non-frontal view)."""
    failures: dict[str, str] = {}
    tags = []
    for f in files:
        try:
            tags.append(images.read_dicom_demographics(f) if images.is_dicom(f) else {})
        except DataError as exc:
            failures[str(f)] = str(exc)
            tags.append({})
    index = pd.Index([str(f) for f in files], name="file")
    found = pd.DataFrame(tags, index=index).reindex(columns=CSV_FIELDS)
    if csv is not None:
        by_path = csv.reindex(list(keys)).set_axis(index)
        by_name = csv.reindex([Path(k).name for k in keys]).set_axis(index)
        found = by_path.combine_first(by_name).combine_first(found)
        unused = ~csv.index.isin(list(keys) + [Path(k).name for k in keys])
        if unused.any():
            warnings.warn(
                f"{csv.attrs.get('source', 'demographics CSV')}: {int(unused.sum())} row(s) match no input file, "
                f"e.g. {csv.index[unused][:3].tolist()}.",
                stacklevel=2,
            )
    found = found.reindex(columns=CSV_FIELDS).astype({"age": float, "sex": object, "view": object})
    view = found["view"]
    refused = view.notna() & ~view.isin(FRONTAL_VIEWS)
    for file, v in view[refused].items():
        kind = "a lateral view" if v in LATERAL_VIEWS else "not a frontal view"
        failures.setdefault(
            file, f"view position {v} is {kind}; the model was trained on frontal (PA/AP) chest X-rays only."
        )
    return found, failures


class ImageFiles(Dataset):
    """Files as ``{"image": uint8 (1, S, S), "meta", "index", "error", "warning"}``; a file that
    cannot be decoded gives a blank image and its error message instead of stopping the run, one
    that decodes but looks wrongly scaled (:func:`images.scaling_problem`) a warning."""

    def __init__(self, paths: Sequence[str], meta: np.ndarray, image_size: int) -> None:
        self.paths = list(paths)
        self.meta = torch.from_numpy(np.asarray(meta, dtype=np.float32))
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        try:
            pixels, error = images.load_resized(self.paths[index], self.image_size), ""
            warning = images.scaling_problem(pixels) or ""
        except DataError as exc:
            pixels = np.zeros((self.image_size, self.image_size), np.uint8)
            error, warning = str(exc), ""
        item = {"image": torch.from_numpy(pixels)[None], "meta": self.meta[index], "index": index}
        return {**item, "error": error, "warning": warning}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def _prediction_table(
    rows: list[pd.DataFrame],
    labels: list[str],
    thresholds: np.ndarray,
    demographics: pd.DataFrame,
    calibration: Calibration | None,
    with_raw: bool,
) -> pd.DataFrame:
    """``file``, one (calibrated) probability column per label, ``findings``, the demographics, and
    ``raw:<label>`` columns of the model's own outputs when asked for."""
    raw = pd.concat(rows) if rows else pd.DataFrame(columns=labels, dtype=float)
    probs = raw
    if calibration is not None and len(raw):
        probs = pd.DataFrame(calibration.apply(raw.to_numpy()), index=raw.index, columns=raw.columns)
    positive = probs.to_numpy() >= thresholds
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
        stem = str(Path(keys[image_idx]).with_suffix("")).replace(os.sep, "__")
        path = cam_dir / f"{stem}_{labels[cls].replace(' ', '_')}.png"
        written.append(
            save_overlay(pixels[image_idx], result.heatmaps[pair], path, title, bool(result.zero_gradient[pair]))
        )
    return written


def report_failures(run: PredictionRun) -> None:
    """Log every failed file and exit with status 1 if there was any (the CSV is already written)."""
    if not run.failures:
        return
    log.error("%d file(s) could not be predicted:", len(run.failures))
    for file, reason in run.failures.items():
        log.error("  %s: %s", file, reason)
    log.error("The other %d file(s) are in %s.", len(run.predictions), run.output)
    raise SystemExit(1)


# --------------------------------------------------------------------------------------------
def _output_path(cfg: DictConfig) -> Path:
    if cfg.get("output"):
        return Path(cfg.output)
    try:
        return Path(cfg.paths.output_dir) / PREDICTIONS  # Hydra's run directory
    except Exception:  # composed outside a Hydra run: ${hydra:...} cannot resolve
        raise ConfigError("Pass output=FILE.csv for the predictions.") from None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
