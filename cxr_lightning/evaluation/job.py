"""The evaluate job behind ``python -m cxr_lightning.evaluate ckpt_path=PATH | run_dir=DIR``.

Per label and on average: AUROC and AUPRC with patient-bootstrap intervals; sensitivity,
specificity, precision and F1 at per-label thresholds chosen on the **validation** split (saved
beside the checkpoint for ``predict``); calibration (ECE, reliability diagrams); mean AUROC per
sex, age band and view position. Everything is rebuilt from the checkpoint alone (data config,
labels, metadata layout); ``data.*`` overrides only say where the files are and how to load them.

Outputs in the output directory: ``report.md``, ``metrics.json``, ``per_class.csv``,
``subgroups.csv``, ``roc.png``, ``pr.png``, ``reliability.png``.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cxr_lightning import files, inference
from cxr_lightning.checkpoints import DEFAULT_THRESHOLD, load_model, resolve_checkpoint, save_thresholds
from cxr_lightning.data.tables import SPLITS
from cxr_lightning.errors import ConfigError
from cxr_lightning.evaluation import report
from cxr_lightning.evaluation.statistics import (
    age_bands,
    bootstrap_ci,
    choose_thresholds,
    expected_calibration_error,
    operating_point_metrics,
    subgroup_auroc,
)
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.tasks.build import datamodule_for

log = logging.getLogger(__name__)

THRESHOLD_METHODS = ("f1", "youden")
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
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    out = _output_dir(cfg)
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False)))
    labels = list(model.hparams.label_names)
    dm = datamodule_for(model, cfg.get("data"))
    device = inference.default_device() if cfg.device == "auto" else cfg.device
    log.info("Evaluating %s on the %s split of %s (%s)", ckpt, cfg.split, dm.root, device)

    val_probs, val_table = predict_split(model, dm, "val", device)
    probs, table = predict_split(model, dm, cfg.split, device)
    label_cols = [f"label:{n}" for n in labels]
    y_val = val_table[label_cols].to_numpy()
    y = table[label_cols].to_numpy()
    patients = table[PATIENT].to_numpy()

    method = cfg.threshold_method
    with warnings.catch_warnings():
        # Labels without val positives/negatives are listed in the report instead.
        warnings.filterwarnings("ignore", message="choose_thresholds: labels")
        thresholds = choose_thresholds(y_val, val_probs, method, DEFAULT_THRESHOLD, labels)
    fallback = [n for n, ok in zip(labels, _both_classes(y_val)) if not ok]
    if fallback:
        log.warning("No val positives or negatives for %s: threshold %.1f", ", ".join(fallback), DEFAULT_THRESHOLD)
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


def predict_split(model: CXRClassifier, dm, split: str, device: str = "cpu") -> tuple[np.ndarray, pd.DataFrame]:
    """Probabilities ``(N, L)`` for every image of ``split``, with the split's table in the same order."""
    return inference.predict_probabilities(model, dm.loader(split, shuffle=False), device), dm.split_table(split)


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
        "optimizer": f"{str(optimizer.get('_target_', '')).rsplit('.', 1)[-1]} lr={optimizer.get('lr')}",
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
        return Path(cfg.output_dir) if cfg.get("output_dir") else Path(cfg.run_dir) / "evaluation"
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
