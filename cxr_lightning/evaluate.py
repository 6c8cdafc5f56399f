"""Evaluate a checkpoint: ``python -m cxr_lightning.evaluate ckpt_path=PATH | run_dir=DIR``.

Per label and on average: AUROC and AUPRC with patient-bootstrap intervals; sensitivity,
specificity, precision and F1 at per-label thresholds chosen on the **validation** split (saved
beside the checkpoint for ``predict``); calibration (ECE, reliability diagrams); mean AUROC per
sex, age band and view position. Everything is rebuilt from the checkpoint alone (data config,
labels, metadata layout); ``data.*`` overrides only say where the files are and how to load them.

Outputs in the output directory: ``report.md``, ``metrics.json``, ``per_class.csv``,
``subgroups.csv``, ``roc.png``, ``pr.png``, ``reliability.png``.
"""
from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cxr_lightning import files, inference, report
from cxr_lightning.data.datamodule import SPLITS, CXRDataModule
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.metrics import (
    age_bands,
    bootstrap_ci,
    choose_thresholds,
    expected_calibration_error,
    operating_point_metrics,
    subgroup_auroc,
)
from cxr_lightning.models.module import CXRClassifier, load_model

log = logging.getLogger(__name__)

THRESHOLD_METHODS = ("f1", "youden")
THRESHOLD_FALLBACK = 0.5
PATIENT = "Patient ID"
# subgroup attribute -> split-table column (age is banded first)
SUBGROUP_COLUMNS = {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position"}


@dataclass
class Evaluation:
    """What :func:`evaluate` wrote, and the tables behind it."""

    output_dir: Path
    metrics: dict[str, Any]
    per_class: pd.DataFrame
    subgroups: pd.DataFrame
    thresholds_file: Path


def evaluate(cfg: DictConfig) -> Evaluation:
    """Score the checkpoint named by ``cfg`` on ``cfg.split`` and write the report files."""
    _check_settings(cfg)
    ckpt = inference.resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    out = _output_dir(cfg)
    model = load_model(ckpt)
    labels = list(model.hparams.label_names)
    dm = inference.datamodule_for(model, data_overrides(cfg.get("data")))
    device = inference.default_device() if cfg.device == "auto" else cfg.device
    log.info("Evaluating %s on the %s split of %s (%s)", ckpt, cfg.split, dm.root, device)

    val_probs, val_table = inference.predict_split(model, dm, "val", device)
    probs, table = inference.predict_split(model, dm, cfg.split, device)
    label_cols = [f"label:{n}" for n in labels]
    y_val = val_table[label_cols].to_numpy()
    y = table[label_cols].to_numpy()
    patients = table[PATIENT].to_numpy()

    method = cfg.threshold_method
    with warnings.catch_warnings():
        # Labels without val positives/negatives are listed in the report instead.
        warnings.filterwarnings("ignore", message="choose_thresholds: labels")
        thresholds = choose_thresholds(y_val, val_probs, method, THRESHOLD_FALLBACK, labels)
    fallback = [n for n, ok in zip(labels, _both_classes(y_val)) if not ok]
    if fallback:
        log.warning("No val positives or negatives for %s: threshold %.1f", ", ".join(fallback), THRESHOLD_FALLBACK)
    thresholds_file = save_thresholds(ckpt, labels, thresholds, method, n_images=len(y_val), fallback=fallback)

    boot = {"n_boot": int(cfg.n_boot), "alpha": float(cfg.alpha), "seed": int(cfg.seed), "label_names": labels}
    auroc = bootstrap_ci(y, probs, patients, "auroc", **boot)
    auprc = bootstrap_ci(y, probs, patients, "auprc", **boot)
    operating = operating_point_metrics(y, probs, thresholds, labels)
    ece = pd.Series(expected_calibration_error(y, probs, int(cfg.calibration_bins)), index=labels)
    per_class = _per_class_table(auroc, auprc, operating, ece)
    subgroups = _subgroup_table(table, y, probs, labels, cfg, boot)

    summary = {
        "checkpoint": str(ckpt),
        "checkpoint_sha256": files.file_digest(ckpt),
        "data_root": str(dm.root),
        "label_table": dm.label_table_name,
        "split": cfg.split,
        "n_images": len(table),
        "n_patients": int(table[PATIENT].nunique()),
        "n_images_val": len(val_table),
        "n_patients_val": int(val_table[PATIENT].nunique()),
        "threshold_method": method,
        "thresholds_file": str(thresholds_file),
        "fallback_threshold_labels": fallback,
        "undefined_labels": [n for n in labels if np.isnan(auroc.at[n, "estimate"])],
        "n_boot": int(cfg.n_boot),
        "alpha": float(cfg.alpha),
        "seed": int(cfg.seed),
        "calibration_bins": int(cfg.calibration_bins),
    }
    config = config_summary(model)
    metrics = {**summary, **_flat_metrics(per_class, subgroups), "config": config}

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(per_class, out / "per_class.csv", index=True)
    _write_csv(subgroups, out / "subgroups.csv", index=False)
    files.write_json(out / "metrics.json", metrics)
    per_label = per_class.drop(index="mean")
    figures = {
        "roc": report.roc_figure(y, probs, labels, per_label["auroc"].to_numpy()),
        "pr": report.pr_figure(y, probs, labels, per_label["auprc"].to_numpy()),
        "reliability": report.reliability_figure(y, probs, labels, ece.to_numpy(), int(cfg.calibration_bins)),
    }
    for name, fig in figures.items():
        report.save_figure(fig, out / report.FIGURES[name])
    files.write_text(out / "report.md", report.render_report(summary, config, per_class, subgroups))
    log.info(
        "Mean AUROC %s on %d images; report: %s",
        report.interval(*per_class.loc["mean", ["auroc", "auroc_lower", "auroc_upper"]]),
        len(table),
        out / "report.md",
    )
    return Evaluation(out, metrics, per_class, subgroups, thresholds_file)


# --------------------------------------------------------------------------------------------
# Thresholds beside the checkpoint (written here, read by predict)
# --------------------------------------------------------------------------------------------
def thresholds_path(ckpt_path: str | os.PathLike) -> Path:
    """``<checkpoint dir>/<checkpoint stem>.thresholds.json``."""
    ckpt = Path(ckpt_path)
    return ckpt.with_name(f"{ckpt.stem}.thresholds.json")


def save_thresholds(
    ckpt_path: str | os.PathLike,
    label_names: Sequence[str],
    thresholds: Sequence[float],
    method: str,
    n_images: int,
    fallback: Sequence[str] = (),
) -> Path:
    """Write the per-label thresholds with the checkpoint's fingerprint, so that stale thresholds
    of a retrained checkpoint are never applied."""
    ckpt = Path(ckpt_path)
    return files.write_json(
        thresholds_path(ckpt),
        {
            "thresholds": {name: float(t) for name, t in zip(label_names, thresholds)},
            "method": method,
            "chosen_on": "val",
            "n_images": int(n_images),
            "fallback_labels": list(fallback),
            "checkpoint": ckpt.name,
            "checkpoint_sha256": files.file_digest(ckpt),
            "checkpoint_size": ckpt.stat().st_size,
        },
    )


def load_thresholds(ckpt_path: str | os.PathLike, label_names: Sequence[str]) -> tuple[np.ndarray, Path | None]:
    """The thresholds ``evaluate`` saved for this checkpoint, in ``label_names`` order, and their file.

    Without a thresholds file every label gets 0.5 (with a warning) and the file is ``None``; a file
    written for another checkpoint, or for other labels, is a :class:`CheckpointError`.
    """
    import json

    ckpt, path = Path(ckpt_path), thresholds_path(ckpt_path)
    if not path.is_file():
        warnings.warn(
            f"No thresholds file {path}: calling findings at probability >= {THRESHOLD_FALLBACK} for every label. "
            f"Run `python -m cxr_lightning.evaluate ckpt_path={ckpt}` to choose them on the validation split.",
            stacklevel=2,
        )
        return np.full(len(label_names), THRESHOLD_FALLBACK), None
    try:
        saved = json.loads(path.read_text())
        by_label = {str(k): float(v) for k, v in saved["thresholds"].items()}
        size, digest = int(saved["checkpoint_size"]), str(saved["checkpoint_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"Thresholds file {path} is malformed ({exc}); delete it and rerun evaluate.") from exc
    if size != ckpt.stat().st_size or digest != files.file_digest(ckpt):
        raise CheckpointError(
            f"Thresholds file {path} was computed for a different checkpoint than {ckpt} (sha256 {digest[:12]}…); "
            f"rerun `python -m cxr_lightning.evaluate ckpt_path={ckpt}` or delete the file."
        )
    missing = [n for n in label_names if n not in by_label]
    if missing:
        raise CheckpointError(f"Thresholds file {path} has no threshold for {missing}; rerun evaluate.")
    return np.array([by_label[n] for n in label_names]), path


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
# Evaluated as trained: these define the split, the labels or the model's inputs.
SPLIT_DEFINING = frozenset(
    {"source", "demo", "image_size", "val_fraction", "test_fraction", "split_seed", "fold", "folds",
     "prior_labels", "drop_no_finding", "mean", "std"}
)


def data_overrides(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The non-null ``data.*`` overrides, checked against :class:`CXRDataModule`'s arguments."""
    given = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data or {})
    chosen = {k: v for k, v in given.items() if v is not None}
    fixed = sorted(set(chosen) & SPLIT_DEFINING)
    if fixed:
        raise ConfigError(
            f"data override(s) {fixed} would change the split or the model's inputs; they always come from "
            "the checkpoint's training config. Only where and how to load the data can change."
        )
    allowed = set(inspect.signature(CXRDataModule).parameters) - SPLIT_DEFINING
    unknown = sorted(set(chosen) - allowed)
    if unknown:
        raise ConfigError(f"Unknown data override(s) {unknown}; CXRDataModule takes {sorted(allowed)}.")
    return chosen


def config_summary(model: CXRClassifier) -> dict[str, Any]:
    """The training settings a reader of the report needs, from the checkpoint's hyperparameters."""
    hp = model.hparams
    config = hp.get("config") or {}
    data = config.get("data", {})
    optimizer = hp.get("optimizer", {})
    return {
        "backbone": hp.backbone.get("name"),
        # load_model clears hparams.backbone.pretrained (no download on load); the config keeps it.
        "pretrained": config.get("backbone", {}).get("pretrained", hp.backbone.get("pretrained")),
        "head": hp.head.get("name"),
        "loss": hp.loss.get("name"),
        "optimizer": f"{optimizer.get('name')} lr={optimizer.get('lr')}",
        "image_size": hp.image_size,
        "labels": len(hp.label_names),
        "metadata": ", ".join(hp.meta_names) if len(hp.meta_names) <= 6 else f"{len(hp.meta_names)} columns",
        "data_source": data.get("source"),
        "prior_labels": data.get("prior_labels"),
        "split_seed": data.get("split_seed"),
        "max_epochs": config.get("trainer", {}).get("max_epochs"),
        "seed": config.get("seed"),
    }


def _check_settings(cfg: DictConfig) -> None:
    if cfg.threshold_method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold_method={cfg.threshold_method!r}: expected one of {list(THRESHOLD_METHODS)}.")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}: expected one of {list(SPLITS)}.")
    if cfg.split != "test":
        log.warning("Evaluating on the %s split: thresholds are chosen on val, so val numbers are optimistic.", cfg.split)
    if int(cfg.n_boot) < 1:
        raise ConfigError(f"n_boot={cfg.n_boot}: need at least 1 bootstrap resample (1000 for a report).")
    if not 0.0 < float(cfg.alpha) < 1.0:
        raise ConfigError(f"alpha={cfg.alpha}: must lie strictly between 0 and 1 (0.05 gives 95% intervals).")


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir") or cfg.get("run_dir"):
        return inference.output_dir(cfg.get("output_dir"), cfg.get("run_dir"), "evaluation")
    try:
        return Path(cfg.paths.output_dir)  # Hydra's run directory
    except Exception:  # composed outside a Hydra run: ${hydra:...} cannot resolve
        raise ConfigError("Pass output_dir=DIR (or run_dir=DIR) for the evaluation outputs.") from None


def _both_classes(y: np.ndarray) -> np.ndarray:
    return (y.sum(axis=0) > 0) & ((1 - y).sum(axis=0) > 0)


def _per_class_table(
    auroc: pd.DataFrame, auprc: pd.DataFrame, operating: pd.DataFrame, ece: pd.Series
) -> pd.DataFrame:
    """One row per label plus ``mean`` (AUROC/AUPRC means from the bootstrap; the rest macro means)."""
    table = pd.DataFrame(
        {
            "n_pos": auroc["n_pos"],
            "n_neg": operating["n_neg"],
            "auroc": auroc["estimate"],
            "auroc_lower": auroc["lower"],
            "auroc_upper": auroc["upper"],
            "auprc": auprc["estimate"],
            "auprc_lower": auprc["lower"],
            "auprc_upper": auprc["upper"],
        }
    )
    extra = operating[["threshold", "sensitivity", "specificity", "precision", "f1"]].assign(ece=ece)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN mean, by design
        means = extra.drop(columns="threshold").mean(skipna=True)
    extra.loc["mean"] = means
    table = table.join(extra)
    table.loc["mean", "n_neg"] = operating["n_neg"].sum()
    table[["n_pos", "n_neg"]] = table[["n_pos", "n_neg"]].astype("int64")
    table.index.name = "label"
    return table.reindex(auroc.index)  # label order, then mean (building from dicts sorted it)


def _subgroup_table(
    table: pd.DataFrame, y: np.ndarray, probs: np.ndarray, labels: list[str], cfg: DictConfig, boot: dict[str, Any]
) -> pd.DataFrame:
    groups = {
        "sex": table[SUBGROUP_COLUMNS["sex"]],
        "age": age_bands(table[SUBGROUP_COLUMNS["age"]], edges=list(cfg.age_edges)),
        "view": table[SUBGROUP_COLUMNS["view"]],
    }
    parts = []
    for attribute, values in groups.items():
        part = subgroup_auroc(y, probs, values.reset_index(drop=True), table[PATIENT].to_numpy(), **boot)
        parts.append(part.rename_axis("group").reset_index().assign(attribute=attribute))
    frame = pd.concat(parts, ignore_index=True)
    frame["group"] = frame["group"].astype(str)
    return frame[["attribute", "group", "n_images", "n_patients", "n_labels", "auroc_mean", "lower", "upper"]]


def _flat_metrics(per_class: pd.DataFrame, subgroups: pd.DataFrame) -> dict[str, Any]:
    """``auroc_mean`` & co. plus ``<column>.<label>`` and ``subgroup.<attribute>.<group>.<column>`` keys."""
    mean = per_class.loc["mean"]
    flat: dict[str, Any] = {
        "auroc_mean": mean["auroc"],
        "auroc_mean_lower": mean["auroc_lower"],
        "auroc_mean_upper": mean["auroc_upper"],
        "auprc_mean": mean["auprc"],
        "auprc_mean_lower": mean["auprc_lower"],
        "auprc_mean_upper": mean["auprc_upper"],
        "sensitivity_mean": mean["sensitivity"],
        "specificity_mean": mean["specificity"],
        "precision_mean": mean["precision"],
        "f1_macro": mean["f1"],
        "ece_mean": mean["ece"],
    }
    for label, row in per_class.drop(index="mean").to_dict(orient="index").items():
        flat.update({f"{column}.{label}": value for column, value in row.items()})
    for row in subgroups.itertuples(index=False):
        key = f"subgroup.{row.attribute}.{row.group}"
        flat.update(
            {
                f"{key}.auroc_mean": row.auroc_mean,
                f"{key}.lower": row.lower,
                f"{key}.upper": row.upper,
                f"{key}.n_images": row.n_images,
                f"{key}.n_patients": row.n_patients,
            }
        )
    return flat


def _write_csv(frame: pd.DataFrame, path: Path, index: bool) -> None:
    with files.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    result = evaluate(cfg)
    return float(result.metrics["auroc_mean"])


if __name__ == "__main__":
    main()
