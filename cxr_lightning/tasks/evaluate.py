"""The evaluate task behind ``python -m cxr_lightning.evaluate ckpt_path=PATH | run_dir=DIR``.

Per label and on average: AUROC and AUPRC with patient-bootstrap intervals; sensitivity,
specificity, precision and F1 at per-label thresholds chosen on the **validation** split (saved
beside the checkpoint for ``predict``); a post-hoc probability calibration fitted on the same
validation split (saved beside the checkpoint; every figure after it is on the calibrated scale,
thresholds included) with ECE and reliability diagrams before and after it; mean AUROC per sex,
age band and view position. Everything is rebuilt from the checkpoint alone (data config,
labels, metadata layout); ``data.*`` overrides only say where the files are and how to load them.

External validation: ``data=<source> data.root=DIR`` (chexpert, mimic_cxr, padchest, nih_google)
scores the checkpoint on another dataset, read as its publisher ships it. The checkpoint keeps
its labels, metadata layout and preprocessing; only the labels the source maps to
(the harmonisation of its module in :mod:`cxr_lightning.data.sources`) are scored, the others
are listed as unavailable. The thresholds are the ones chosen on the checkpoint's own validation
split (saved beside it by an earlier evaluate), so the report shows how they transfer;
``refit_thresholds=true`` chooses them on the source's validation split instead (and saves nothing).

Outputs in the output directory: ``report.md``, ``model_card.md``, ``metrics.json``,
``per_class.csv``, ``subgroups.csv``, ``underdiagnosis.csv``, ``predictions.csv`` (each image's
labels and probabilities), ``roc.png``, ``pr.png``, ``reliability.png``; and the browser page
``report.html``: ``<run_dir>/report.html`` with ``run_dir=`` (explain adds its gallery to it later),
else beside ``report.md``.
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
from cxr_lightning.calibration import METHODS as CALIBRATION_METHODS
from cxr_lightning.calibration import Calibration, fit_calibration
from cxr_lightning.checkpoints import (
    DEFAULT_THRESHOLD,
    load_calibration,
    load_model,
    load_thresholds,
    resolve_checkpoint,
    save_calibration,
    save_thresholds,
)
from cxr_lightning.data import nih
from cxr_lightning.data.label_spaces import COMPETITION
from cxr_lightning.data.nih import PATIENT
from cxr_lightning.data.tables import SOURCE, SPLITS
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.evaluation import html, report
from cxr_lightning.evaluation.statistics import (
    age_bands,
    bootstrap_ci,
    choose_thresholds,
    expected_calibration_error,
    operating_point_metrics,
    per_source_auroc,
    subgroup_auroc,
    underdiagnosis,
)
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.run_dir import EvaluationDir, RunDir, calibration_path, thresholds_path
from cxr_lightning.tasks.build import datamodule_for, external_source

log = logging.getLogger(__name__)

THRESHOLD_METHODS = ("f1", "youden")
# CheXpert calls its validation split "valid"; both names select the val split.
SPLIT_ALIASES = {"valid": "val"}
# subgroup attribute -> split-table column (age is banded first)
SUBGROUP_COLUMNS = {"sex": nih.SEX, "age": nih.AGE, "view": nih.VIEW}


@dataclass
class Evaluation:
    """What :func:`evaluate` wrote, and the tables behind it."""

    output_dir: Path
    metrics: dict[str, Any]
    per_class: pd.DataFrame
    subgroups: pd.DataFrame
    thresholds_file: Path | None
    calibration_file: Path | None
    underdiagnosis: pd.DataFrame


def evaluate(cfg: DictConfig) -> Evaluation:
    """Score the checkpoint named by ``cfg`` on ``cfg.split`` and write the report files."""
    _check_settings(cfg)
    split = SPLIT_ALIASES.get(cfg.split, cfg.split)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    out = _output_dir(cfg)
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False)))
    labels = list(model.hparams.label_names)
    external = external_source(model, cfg.get("data"))
    refit = bool(cfg.get("refit_thresholds", False))
    if refit and external is None:
        raise ConfigError("refit_thresholds=true is for an external source (data=<source>); on the checkpoint's own "
                          "data the thresholds are always chosen on its val split.")
    if split != "test" and (external is None or refit):
        log.warning("Evaluating on the %s split: thresholds are chosen on val, so val numbers are optimistic.", split)
    # Only what this job reads must be on disk: the split, and val where thresholds are chosen on it.
    needed = (split, "val") if external is None or refit else (split,)
    dm = datamodule_for(model, cfg.get("data"), cache_dir=_cache_dir(cfg), splits=tuple(dict.fromkeys(needed)))
    device = inference.default_device() if cfg.device == "auto" else cfg.device
    log.info("Evaluating %s on the %s split of %s (%s)", ckpt, split, dm.root, device)

    # An external source scores only the labels it maps to; the rest are unavailable, not guessed.
    unavailable = list(dm.tables.unavailable_labels)
    scored = [n for n in labels if n not in unavailable]
    if not scored:
        raise ConfigError(f"data={external}: none of the checkpoint's labels {labels} has a counterpart in {external}.")
    columns = [labels.index(n) for n in scored]
    label_cols = [f"label:{n}" for n in scored]
    raw_full, table = predict_split(model, dm, split, device)
    raw_probs = raw_full[:, columns]
    y = table[label_cols].to_numpy(dtype=float)
    patients = table[PATIENT].to_numpy()

    method = cfg.threshold_method
    if external is None or refit:
        raw_val_full, val_table = predict_split(model, dm, "val", device)
        raw_val_probs = raw_val_full[:, columns]
        y_val = val_table[label_cols].to_numpy(dtype=float)
        if external is None:
            calibration, calibration_file = _calibrate(ckpt, y_val, raw_val_probs, scored, cfg.calibration_method)
        else:  # refitted on the external val split: never written over the source's files
            calibration = None if cfg.calibration_method == "none" else fit_calibration(
                y_val, raw_val_probs, cfg.calibration_method, scored
            )
            calibration_file = None
        val_probs = calibration.apply(raw_val_probs) if calibration else raw_val_probs
        probs = calibration.apply(raw_probs) if calibration else raw_probs
        with warnings.catch_warnings():
            # Labels without val positives/negatives are listed in the report instead.
            warnings.filterwarnings("ignore", message="choose_thresholds: labels")
            thresholds = choose_thresholds(y_val, val_probs, method, DEFAULT_THRESHOLD, scored)
        fallback = [n for n, ok in zip(scored, _both_classes(y_val)) if not ok]
        if fallback:
            log.warning("No val positives or negatives for %s: threshold %.1f", ", ".join(fallback), DEFAULT_THRESHOLD)
        n_val, n_patients_val = len(val_table), int(val_table[PATIENT].nunique())
        if external is None:
            thresholds_file = save_thresholds(
                ckpt, labels, thresholds, method, n_images=len(y_val), fallback=fallback,
                calibrated=calibration is not None,
            )
            threshold_source = f"chosen on the val split by {method}"
        else:
            thresholds_file = None
            threshold_source = f"refitted on the {external} val split by {method} (refit_thresholds=true)"
    else:
        # Calibration and thresholds chosen on the checkpoint's own val split: how they transfer is the point.
        calibration, calibration_file = load_calibration(ckpt, labels)
        probs = (calibration.apply(raw_full) if calibration else raw_full)[:, columns]
        thresholds, thresholds_file = _source_thresholds(ckpt, labels)
        thresholds = thresholds[columns]
        fallback, n_val, n_patients_val = [], 0, 0
        threshold_source = "carried over from the checkpoint's own val split"

    boot = {"n_boot": int(cfg.n_boot), "alpha": float(cfg.alpha), "seed": int(cfg.seed), "label_names": scored}
    auroc = bootstrap_ci(y, probs, patients, "auroc", **boot)
    auprc = bootstrap_ci(y, probs, patients, "auprc", **boot)
    operating = operating_point_metrics(y, probs, thresholds, scored)
    bins = int(cfg.calibration_bins)
    ece = pd.Series(expected_calibration_error(y, probs, bins), index=scored)
    ece_raw = pd.Series(expected_calibration_error(y, raw_probs, bins), index=scored)
    per_class = _per_class_table(auroc, auprc, operating, ece, ece_raw)
    subgroups = _subgroup_table(table, y, probs, scored, cfg, boot)
    audit = _underdiagnosis_table(table, y, probs, thresholds, scored, cfg, boot)
    per_source = _per_source(dm, table, y, probs, scored, cfg) if dm.spec.pooled else {}
    headline = _competition(dm, y, probs, patients, scored, boot)

    config = config_summary(model)
    summary = {
        "checkpoint": str(ckpt),
        "checkpoint_sha256": files.file_digest(ckpt),
        "data_source": dm.source,
        "trained_on": config["data_source"],
        "external": external is not None,
        "data_root": str(dm.root),
        "label_table": dm.label_table_name,
        "split": split,
        "n_images": len(table),
        "n_patients": int(table[PATIENT].nunique()),
        "n_images_val": n_val,
        "n_patients_val": n_patients_val,
        "uncertain": dm.uncertain,
        "label_space": dm.tables.label_space,
        "scored_labels": scored,
        "per_source": per_source,
        "competition": headline,
        "unavailable_labels": unavailable,
        "left_out": dict(dm.tables.left_out),
        "threshold_method": method,
        "threshold_source": threshold_source,
        "thresholds_file": str(thresholds_file) if thresholds_file else None,
        "fallback_threshold_labels": fallback,
        "undefined_labels": [n for n in scored if np.isnan(auroc.at[n, "estimate"])],
        "n_boot": int(cfg.n_boot),
        "alpha": float(cfg.alpha),
        "seed": int(cfg.seed),
        "min_patients": int(cfg.get("min_patients", html.DEFAULT_MIN_PATIENTS)),
        "calibration_bins": bins,
        "calibration_method": calibration.method if calibration else "none",
        "calibration_file": str(calibration_file) if calibration_file else None,
        "calibration_n_images": calibration.n_images if calibration else 0,
        "calibration_unfitted_labels": calibration.unfitted if calibration else [],
        "calibration": calibration.describe() if calibration else "none (raw model probabilities)",
    }
    metrics = {**summary, **_flat_metrics(per_class, subgroups), **_flat_underdiagnosis(audit), "config": config}

    out.mkdir(parents=True, exist_ok=True)
    written = EvaluationDir(out)
    _write_csv(per_class, written.per_class, index=True)
    _write_csv(subgroups, written.subgroups, index=False)
    _write_csv(audit, written.underdiagnosis, index=False)
    _write_csv(predictions_table(table, y, probs, scored), written.predictions, index=False)
    files.write_json(written.metrics, metrics)
    per_label = per_class.drop(index="mean")
    figures = {
        "roc": report.roc_figure(y, probs, scored, per_label["auroc"].to_numpy()),
        "pr": report.pr_figure(y, probs, scored, per_label["auprc"].to_numpy()),
        "reliability": report.reliability_figure(
            y, probs, scored, ece.to_numpy(), bins, raw=(raw_probs, ece_raw.to_numpy()) if calibration else None
        ),
    }
    for name, fig in figures.items():
        report.save_figure(fig, written.figure(name))
    files.write_text(written.report_md, report.render_report(summary, config, per_class, subgroups, audit))
    files.write_text(
        written.model_card,
        report.render_model_card(summary, config, data_table(dm, scored), per_class, subgroups, audit),
    )
    page = _render_page(cfg, out)
    log.info(
        "Mean AUROC %s on %d images; report: %s (in a browser: %s)",
        report.interval(*per_class.loc["mean", ["auroc", "auroc_lower", "auroc_upper"]]),
        len(table),
        written.report_md,
        page,
    )
    return Evaluation(out, metrics, per_class, subgroups, thresholds_file, calibration_file, audit)


def _per_source(dm, table: pd.DataFrame, y: np.ndarray, probs: np.ndarray, scored: list[str], cfg: DictConfig) -> dict:
    """A pooled run's figures per source, over the labels each source scores."""
    by_source = {name: [n for n in dm.tables.scored_labels(name) if n in scored] for name in dm.tables.per_source}
    return per_source_auroc(y, probs, table[PATIENT].to_numpy(), table[SOURCE].to_numpy(), by_source, scored,
                            n_boot=int(cfg.n_boot), seed=int(cfg.seed), alpha=float(cfg.alpha))


def _competition(dm, y: np.ndarray, probs: np.ndarray, patients: np.ndarray, scored: list[str], boot: dict) -> dict:
    """CheXpert's five competition labels as a headline subset, where all five are scored."""
    labels = dm.space.competition_labels()
    if len(labels) < len(COMPETITION) or not set(labels) <= set(scored):
        return {}
    columns = [scored.index(n) for n in labels]
    ci = bootstrap_ci(y[:, columns], probs[:, columns], patients, "auroc", **{**boot, "label_names": labels})
    if ci.loc[labels, "estimate"].isna().any():
        return {}  # a label without positives or negatives here: not the five-label mean
    return {"labels": labels, "auroc_mean": float(ci.at["mean", "estimate"]),
            "lower": float(ci.at["mean", "lower"]), "upper": float(ci.at["mean", "upper"])}


def predict_split(model: CXRClassifier, dm, split: str, device: str = "cpu") -> tuple[np.ndarray, pd.DataFrame]:
    """Probabilities ``(N, L)`` for every image of ``split``, with the split's table in the same order."""
    return inference.predict_probabilities(model, dm.loader(split, shuffle=False), device), dm.split_table(split)


def predictions_table(table: pd.DataFrame, y: np.ndarray, probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One row per image: ``Image Index``, ``Patient ID``, then ``label:<name>`` (0/1, blank where an
    uncertain label is ignored) and ``prob:<name>`` per label, for error analysis (the report's
    gallery joins its overlays on it)."""
    return pd.concat(
        [
            table[[nih.IMAGE, PATIENT]].reset_index(drop=True),
            pd.DataFrame(y, columns=[f"label:{n}" for n in labels]).astype("Int64"),
            pd.DataFrame(probs, columns=[f"prob:{n}" for n in labels]),
        ],
        axis=1,
    )


def _render_page(cfg: DictConfig, out: Path) -> Path:
    """The run's report.html when ``out`` is its evaluation directory, else one beside report.md."""
    run_dir = cfg.get("run_dir")
    if run_dir and out.resolve() == RunDir(run_dir).evaluation.root.resolve():
        return html.run_report(run_dir)
    return html.render_report(out)


def _calibrate(
    ckpt: Path, y_val: np.ndarray, raw_val_probs: np.ndarray, labels: list[str], method: str
) -> tuple[Calibration | None, Path | None]:
    """Fit and save the calibration on val; ``none`` removes a stale file so predict stays raw."""
    if method == "none":
        stale = calibration_path(ckpt)
        if stale.is_file():
            stale.unlink()
            log.info("calibration_method=none: removed %s, so predict reports raw probabilities", stale)
        return None, None
    calibration = fit_calibration(y_val, raw_val_probs, method, labels)
    return calibration, save_calibration(ckpt, calibration)


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


def _source_thresholds(ckpt: Path, labels: list[str]) -> tuple[np.ndarray, Path]:
    """The thresholds chosen on the checkpoint's own val split; an external score never guesses them."""
    if not thresholds_path(ckpt).is_file():
        raise CheckpointError(
            f"No thresholds chosen on the checkpoint's own val split ({thresholds_path(ckpt)} is absent). Evaluate it "
            "on its own data first (python -m cxr_lightning.evaluate ckpt_path=... without data=), which saves them, "
            "or pass refit_thresholds=true to choose them on this source's val split."
        )
    thresholds, path = load_thresholds(ckpt, labels)
    return np.asarray(thresholds, dtype=float), path


def _check_settings(cfg: DictConfig) -> None:
    split = SPLIT_ALIASES.get(cfg.split, cfg.split)
    if cfg.threshold_method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold_method={cfg.threshold_method!r}: expected one of {list(THRESHOLD_METHODS)}.")
    if split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}: expected one of {list(SPLITS) + list(SPLIT_ALIASES)}.")
    if cfg.calibration_method not in (*CALIBRATION_METHODS, "none"):
        raise ConfigError(
            f"calibration_method={cfg.calibration_method!r}: expected one of {[*CALIBRATION_METHODS, 'none']}."
        )
    if int(cfg.n_boot) < 1:
        raise ConfigError(f"n_boot={cfg.n_boot}: need at least 1 bootstrap resample (1000 for a report).")
    if not 0.0 < float(cfg.alpha) < 1.0:
        raise ConfigError(f"alpha={cfg.alpha}: must lie strictly between 0 and 1 (0.05 gives 95% intervals).")
    min_patients = cfg.get("min_patients", html.DEFAULT_MIN_PATIENTS)
    if isinstance(min_patients, bool) or not isinstance(min_patients, int) or min_patients < 0:
        raise ConfigError(f"min_patients={min_patients!r}: must be a whole number of patients >= 0 (30 by default).")


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir") or cfg.get("run_dir"):
        return Path(cfg.output_dir) if cfg.get("output_dir") else RunDir(cfg.run_dir).evaluation.root
    try:
        return Path(cfg.paths.output_dir)  # Hydra's run directory
    except Exception:  # composed outside a Hydra run: ${hydra:...} cannot resolve
        raise ConfigError("Pass output_dir=DIR (or run_dir=DIR) for the evaluation outputs.") from None


def _cache_dir(cfg: DictConfig) -> str | None:
    """This command's ``paths.cache_dir`` (generated demo data and image caches), None without one."""
    paths = cfg.get("paths")
    return str(paths.cache_dir) if paths is not None and paths.get("cache_dir") else None


def _both_classes(y: np.ndarray) -> np.ndarray:
    return (np.nansum(y, axis=0) > 0) & (np.nansum(1 - y, axis=0) > 0)


def _per_class_table(
    auroc: pd.DataFrame, auprc: pd.DataFrame, operating: pd.DataFrame, ece: pd.Series, ece_raw: pd.Series
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
    extra = operating[["threshold", "sensitivity", "specificity", "precision", "f1"]].assign(
        ece=ece, ece_uncalibrated=ece_raw
    )
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


def data_table(dm, labels: list[str]) -> pd.DataFrame:
    """Images, patients, and per-label positives and prevalence of every split, for the model card."""
    columns: dict[str, Any] = {}
    for split in SPLITS:
        split_table = dm.split_table(split)
        positives = split_table[[f"label:{n}" for n in labels]].sum().to_numpy()
        columns[split] = [len(split_table), split_table[PATIENT].nunique(), *positives.astype(int)]
        columns[f"{split} prevalence"] = [np.nan, np.nan, *(positives / max(len(split_table), 1))]
    return pd.DataFrame(columns, index=pd.Index(["images", "patients", *labels], name="count")).astype(
        {s: "int64" for s in SPLITS}
    )


def _underdiagnosis_table(
    table: pd.DataFrame,
    y: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    labels: list[str],
    cfg: DictConfig,
    boot: dict[str, Any],
) -> pd.DataFrame:
    """Underdiagnosis and false-negative rates per sex, age band, view and sex x age band."""
    sex = table[SUBGROUP_COLUMNS["sex"]].reset_index(drop=True)
    age = age_bands(table[SUBGROUP_COLUMNS["age"]], edges=list(cfg.age_edges)).reset_index(drop=True)
    groups = {
        "sex": sex,
        "age": age,
        "view": table[SUBGROUP_COLUMNS["view"]].reset_index(drop=True),
        "sex_x_age": sex.astype(object).fillna("unknown").astype(str) + " × " + age.astype(str),
    }
    patients = table[PATIENT].to_numpy()
    parts = [
        underdiagnosis(y, probs, thresholds, values, patients, **boot).assign(attribute=attribute)
        for attribute, values in groups.items()
    ]
    frame = pd.concat(parts, ignore_index=True)
    return frame[["attribute", *[c for c in frame.columns if c != "attribute"]]]


def _flat_underdiagnosis(audit: pd.DataFrame) -> dict[str, Any]:
    """``underdiagnosis.<attribute>.<group>.<rate>`` keys (rates, their intervals and counts)."""
    flat: dict[str, Any] = {}
    for row in audit.to_dict(orient="records"):
        key = f"underdiagnosis.{row.pop('attribute')}.{row.pop('group')}"
        flat.update({f"{key}.{column}": value for column, value in row.items()})
    return flat


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
        "ece_mean_uncalibrated": mean["ece_uncalibrated"],
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
    files.write_csv(frame, path, index=index)
