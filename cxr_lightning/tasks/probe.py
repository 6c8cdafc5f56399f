"""The linear-probe task behind ``python -m cxr_lightning.probe [backbone=NAME ...]``.

The frozen backbone's features of the train, val and test splits are extracted once and cached
(:mod:`cxr_lightning.features`); for each ``probe.train_fractions`` share of the training
patients (nested, seeded), one logistic regression per label is fitted, its ``C`` chosen on val
(:mod:`cxr_lightning.evaluation.linear_probe`), and scored on test with patient-bootstrap
intervals (:func:`cxr_lightning.evaluation.statistics.bootstrap_ci`). The run directory holds
``config.yaml`` and ``metrics.json`` as a training run does (``compare`` reads probes beside
fine-tuned runs), ``label_efficiency.csv``/``.png``, ``probe_per_label.csv``,
``probe_predictions.csv`` and ``report.html``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from cxr_lightning import files
from cxr_lightning.data.nih import IMAGE, PATIENT
from cxr_lightning.errors import ConfigError
from cxr_lightning.evaluation.linear_probe import check_fractions, fit_probe, nested_patient_subsets
from cxr_lightning.evaluation.probe_report import label_efficiency_figure, render_probe_report
from cxr_lightning.evaluation.statistics import bootstrap_ci
from cxr_lightning.features import FeatureCache, cache_key, extract_features, feature_key_parts
from cxr_lightning.inference import default_device
from cxr_lightning.models.backbones import backbone_from_config
from cxr_lightning.models.preprocess import Preprocess
from cxr_lightning.run_dir import RunDir
from cxr_lightning.tasks.build import build_datamodule, preprocessing, resolve_backbone
from cxr_lightning.tasks.validate import check_backbone, check_data_root

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SELECTION_METRIC = "val/auroc_mean"


def probe(cfg: DictConfig) -> dict[str, Any]:
    """Run the probe of ``cfg`` and write its run directory; returns ``metrics.json``'s content."""
    settings = _settings(cfg)
    check_data_root(cfg.data)
    check_backbone(cfg.backbone, int(cfg.data.image_size))
    run, config_text = _start_run(cfg)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    backbone_cfg = resolve_backbone(OmegaConf.to_container(cfg.backbone, resolve=True))
    features, feature_record, n_params = _features(cfg, dm, backbone_cfg, preprocessing(backbone_cfg), settings)

    labels = list(dm.label_names)
    data = {s: _split_arrays(dm, s, features[s], settings["metadata"]) for s in SPLITS}
    masks = nested_patient_subsets(data["train"]["patients"], settings["fractions"], int(cfg.seed))
    results = [_probe_at(fraction, mask, data, labels, settings, int(cfg.seed)) for fraction, mask in masks.items()]
    curve_rows = [r.curve_row for r in results]
    curve = pd.DataFrame(curve_rows)
    per_label = pd.DataFrame([row for r in results for row in r.label_rows])
    largest = results[-1]

    files.write_text(run.label_efficiency, curve.to_csv(index=False))
    files.write_text(run.probe_per_label, per_label.to_csv(index=False))
    _write_predictions(run.probe_predictions, dm, labels, data["test"]["y"], largest.test_prob)
    demo = str(cfg.data.get("source", "demo")) == "demo"
    title = f"linear probe of {backbone_cfg.get('name')}" + (" (demo data: not evidence)" if demo else "")
    label_efficiency_figure(curve, title, run.label_efficiency_figure)

    metrics = _probe_metrics(cfg, dm, settings, labels, largest, curve_rows, backbone_cfg, n_params, feature_record,
                             n_features=int(data["train"]["x"].shape[1]))
    files.write_json(run.metrics, metrics)
    render_probe_report(metrics, curve, per_label, run.label_efficiency_figure, run.report_html, demo, config_text)
    log.info("Run directory: %s (metrics.json, label_efficiency.csv, report.html)", run.root)
    return metrics


def _start_run(cfg: DictConfig) -> tuple[RunDir, str]:
    """The run directory with its ``config.yaml`` written (the text is returned for the report), and
    the seed set."""
    run = RunDir(Path(cfg.paths.output_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    files.write_text(run.config, config_text)
    pl.seed_everything(int(cfg.seed), workers=True)
    return run, config_text


class _FractionResult(NamedTuple):
    """The probe fitted on one share of the training patients, scored on test."""

    curve_row: dict[str, Any]
    label_rows: list[dict[str, Any]]
    test_prob: np.ndarray
    ci: pd.DataFrame
    val_mean: float


def _probe_at(fraction: float, mask: np.ndarray, data: dict[str, dict[str, np.ndarray]], labels: list[str],
              settings: dict[str, Any], seed: int) -> _FractionResult:
    """Fit the per-label probes on the training images of ``mask``, choose C on val, score on test."""
    train = data["train"]
    fit = fit_probe(train["x"][mask], train["y"][mask], data["val"]["x"], data["val"]["y"], labels,
                    settings["C"], settings["max_iter"], seed)
    test_prob = fit.predict(data["test"]["x"])
    ci = bootstrap_ci(data["test"]["y"], test_prob, data["test"]["patients"], n_boot=settings["n_boot"],
                      alpha=settings["alpha"], seed=seed, label_names=labels)
    chosen = fit.table()
    val_mean = float(np.nanmean(chosen["val_auroc"])) if chosen["fitted"].any() else float("nan")
    curve_row = {
        "fraction": fraction, "n_patients": int(pd.Series(train["patients"][mask]).nunique()),
        "n_images": int(mask.sum()), "test_auroc_mean": float(ci.loc["mean", "estimate"]),
        "test_auroc_lower": float(ci.loc["mean", "lower"]), "test_auroc_upper": float(ci.loc["mean", "upper"]),
        "val_auroc_mean": val_mean, "labels_fitted": int(chosen["fitted"].sum()),
    }
    label_rows = [{"fraction": fraction, "label": label, "test_auroc": ci.loc[label, "estimate"],
                   "test_auroc_lower": ci.loc[label, "lower"], "test_auroc_upper": ci.loc[label, "upper"],
                   "n_test_pos": int(ci.loc[label, "n_pos"]), **chosen.loc[label].to_dict()} for label in labels]
    log.info("probe at %g%% of training patients: test mean AUROC %.3f (%.3f-%.3f)", fraction * 100,
             *(curve_row[k] for k in ("test_auroc_mean", "test_auroc_lower", "test_auroc_upper")))
    return _FractionResult(curve_row, label_rows, test_prob, ci, val_mean)


def _probe_metrics(cfg: DictConfig, dm: Any, settings: dict[str, Any], labels: list[str], largest: _FractionResult,
                   curve_rows: list[dict[str, Any]], backbone_cfg: dict[str, Any], n_params: int,
                   feature_record: dict[str, Any], n_features: int) -> dict[str, Any]:
    """The content of ``metrics.json``, shaped as a training run's (``compare`` reads both): the test
    figures of the largest share, the selection, the data, and the probe's own settings and curve."""
    ci = largest.ci
    return {
        **{f"test.auroc.{label}": float(ci.loc[label, "estimate"]) for label in labels},
        "test.auroc_mean": float(ci.loc["mean", "estimate"]),
        "test.auroc_mean_lower": float(ci.loc["mean", "lower"]),
        "test.auroc_mean_upper": float(ci.loc["mean", "upper"]),
        "selection": {"metric": SELECTION_METRIC, "mode": "max", "best": largest.val_mean},
        "params": n_params,
        "label_table": dm.label_table_name,
        "label_names": labels,
        "meta_names": list(dm.meta_names) if settings["metadata"] else [],
        "n_images": {s: len(dm.split_table(s)) for s in SPLITS},
        "n_patients": {s: int(dm.split_table(s)[PATIENT].nunique()) for s in SPLITS},
        "backbone": str(backbone_cfg.get("name")),
        "head": "linear_probe",
        "seed": int(cfg.seed),
        "image_size": int(cfg.data.image_size),
        "probe": {
            "train_fractions": settings["fractions"], "C": settings["C"], "metadata": settings["metadata"],
            "n_boot": settings["n_boot"], "alpha": settings["alpha"], "n_features": n_features,
            "curve": curve_rows,
        },
        "features": feature_record,
    }


def _settings(cfg: DictConfig) -> dict[str, Any]:
    node = cfg.get("probe")
    if node is None:
        raise ConfigError("the probe command needs a probe: section (conf/probe.yaml).")
    grid = list(node.get("C") or [])
    n_boot, alpha = int(node.get("n_boot", 1000)), float(node.get("alpha", 0.05))
    if n_boot < 1 or not 0 < alpha < 1:
        raise ConfigError(f"probe.n_boot={n_boot} must be >= 1 and probe.alpha={alpha} in (0, 1).")
    return {
        "fractions": check_fractions(list(node.get("train_fractions") or [1.0])),
        "C": [float(c) for c in grid],
        "metadata": bool(node.get("metadata", False)),
        "n_boot": n_boot,
        "alpha": alpha,
        "max_iter": int(node.get("max_iter", 1000)),
        "device": str(node.get("device", "auto")),
        "cache": bool(node.get("cache", True)),
        "cache_dir": str(node.get("cache_dir")),
    }


def _features(cfg: DictConfig, dm: Any, backbone_cfg: dict[str, Any], prep: dict[str, Any],
              settings: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """Each split's features, from the cache where an entry for exactly these inputs exists."""
    cache = FeatureCache(settings["cache_dir"])
    device = default_device() if settings["device"] == "auto" else settings["device"]
    image_size = int(cfg.data.image_size)
    backbone = preprocess = None
    n_params = 0
    features, record = {}, {}
    for split in SPLITS:
        paths = dm.split_table(split)["path"].astype(str).tolist()
        parts = feature_key_parts(backbone_cfg, prep, image_size, paths, split, int(cfg.seed))
        key = cache_key(parts)
        entry = cache.load(key, len(paths)) if settings["cache"] else None
        if entry is None:
            if backbone is None:
                torch.manual_seed(int(cfg.seed))  # random initial weights are drawn from the run's seed
                backbone = backbone_from_config(backbone_cfg, image_size).requires_grad_(False)
                preprocess = Preprocess(**prep).to(device)
                n_params = sum(p.numel() for p in backbone.parameters())
            found = extract_features(backbone, preprocess, dm.loader(split, shuffle=False), device)
            if settings["cache"]:
                cache.save(key, found, parts, extra={"params": str(n_params)})
            record[split] = {"cache": "miss", "file": str(cache.path(key)) if settings["cache"] else None}
        else:
            found, metadata = entry
            # The backbone's size, recorded when the entry was written: a cached run builds no network.
            stored = metadata.get("params", "")
            if not n_params and stored.isdigit():
                n_params = int(stored)
            record[split] = {"cache": "hit", "file": str(cache.path(key))}
        log.info("%s features %s: %s", split, tuple(found.shape), record[split]["cache"])
        features[split] = found
    return features, record, n_params


def _split_arrays(dm: Any, split: str, features: np.ndarray, metadata: bool) -> dict[str, np.ndarray]:
    dataset = dm.dataset(split)
    x = np.concatenate([features, dataset.meta], axis=1) if metadata and dataset.meta.shape[1] else features
    return {"x": x, "y": dataset.labels.astype(np.float64),
            "patients": dm.split_table(split)[PATIENT].to_numpy()}


def _write_predictions(path: Path, dm: Any, labels: list[str], y: np.ndarray, probs: np.ndarray) -> None:
    table = dm.split_table("test")
    frame = pd.DataFrame({IMAGE: table[IMAGE].to_numpy(), PATIENT: table[PATIENT].to_numpy()})
    for j, label in enumerate(labels):
        frame[f"true:{label}"] = y[:, j]
        frame[f"prob:{label}"] = probs[:, j]
    files.write_text(path, frame.to_csv(index=False))
