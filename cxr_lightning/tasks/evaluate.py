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
from cxr_lightning.checkpoints import load_model, resolve_checkpoint
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
from cxr_lightning.operating_point import (
    DEFAULT_THRESHOLD,
    OperatingPoint,
    calibration_record,
    load_operating_point,
    save_calibration,
    save_thresholds,
    thresholds_record,
)
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
    """What :func:`evaluate` wrote, and the tables behind it.

    ``thresholds_file`` / ``calibration_file`` hold the operating point the figures were computed
    at: the run's own beside the checkpoint when this evaluation wrote them there (or carried
    them over), else this evaluation's copies in ``output_dir``. ``written_to_run`` says whether
    the checkpoint's thresholds and calibration (and the run's ``evaluation/``) are this one's."""

    output_dir: Path
    metrics: dict[str, Any]
    per_class: pd.DataFrame
    subgroups: pd.DataFrame
    thresholds_file: Path | None
    calibration_file: Path | None
    underdiagnosis: pd.DataFrame
    written_to_run: bool = False


@dataclass(frozen=True)
class _Subject:
    """The checkpoint, its model and the data it is scored on."""

    ckpt: Path
    model: CXRClassifier
    dm: Any
    external: str | None
    refit: bool
    split: str
    device: str
    scored: list[str]  # the checkpoint's labels this data scores, in its order

    @property
    def labels(self) -> list[str]:
        return list(self.model.hparams.label_names)

    @property
    def columns(self) -> list[int]:
        return [self.labels.index(n) for n in self.scored]

    @property
    def own_val(self) -> bool:
        """Whether the operating point is chosen here, on a val split (else carried over)."""
        return self.external is None or self.refit


@dataclass(frozen=True)
class _Placement:
    """Where the evaluation goes, and whether it becomes the run's operating point."""

    out: Path
    to_run: bool
    kept: list[Path]  # the run's files this evaluation leaves as they are


@dataclass
class _OperatingPoint:
    """The calibration and thresholds the figures are computed at, over the scored labels."""

    calibration: Calibration | None
    thresholds: np.ndarray
    method: str
    source: str
    fallback: list[str]
    n_val: int = 0
    n_patients_val: int = 0
    carried: OperatingPoint | None = None  # read from the checkpoint's files (external, no refit)


@dataclass(frozen=True)
class _Scores:
    """The evaluated split: its table, labels, raw and calibrated probabilities."""

    table: pd.DataFrame
    y: np.ndarray
    raw: np.ndarray
    probs: np.ndarray

    @property
    def patients(self) -> np.ndarray:
        return self.table[PATIENT].to_numpy()


@dataclass(frozen=True)
class _Tables:
    per_class: pd.DataFrame
    subgroups: pd.DataFrame
    underdiagnosis: pd.DataFrame
    per_source: dict[str, Any]
    competition: dict[str, Any]
    ece: pd.Series
    ece_raw: pd.Series


def evaluate(cfg: DictConfig) -> Evaluation:
    """Score the checkpoint named by ``cfg`` on ``cfg.split`` and write the report files."""
    _check_settings(cfg)
    subject = _open(cfg)
    placement = _placement(cfg, subject)
    point = _operating_point(cfg, subject)
    scores = _score(subject, point)
    tables = _tables(cfg, subject, scores, point)
    written = EvaluationDir(placement.out)
    own = _write_own_operating_point(written, subject, point)
    run_files = _write_to_run(subject, point) if placement.to_run else {}
    applied = run_files or own
    if point.carried is not None:
        applied = {"thresholds": point.carried.thresholds_file, "calibration": point.carried.calibration_file}
    summary = _summary(cfg, subject, scores, point, tables, applied, placement)
    _write_report(written, subject, scores, tables, summary)
    page = _render_page(cfg, placement.out)
    _log_outcome(written, scores, tables, placement, page)
    return Evaluation(
        placement.out,
        summary["metrics"],
        tables.per_class,
        tables.subgroups,
        applied.get("thresholds"),
        applied.get("calibration"),
        tables.underdiagnosis,
        placement.to_run,
    )


def _open(cfg: DictConfig) -> _Subject:
    """The checkpoint, its model, and a data module with only the splits this job reads."""
    split = SPLIT_ALIASES.get(cfg.split, cfg.split)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False)))
    external = external_source(model, cfg.get("data"))
    refit = bool(cfg.get("refit_thresholds", False))
    if refit and external is None:
        raise ConfigError("refit_thresholds=true is for an external source (data=<source>); on the checkpoint's own "
                          "data the thresholds are always chosen on its val split.")
    if split != "test" and (external is None or refit):
        log.warning("Evaluating on the %s split: thresholds are chosen on val, so val numbers are optimistic.", split)
    needed = (split, "val") if external is None or refit else (split,)
    dm = datamodule_for(model, cfg.get("data"), cache_dir=_cache_dir(cfg), splits=tuple(dict.fromkeys(needed)))
    device = inference.default_device() if cfg.device == "auto" else cfg.device
    labels = list(model.hparams.label_names)
    # An external source scores only the labels it maps to; the rest are unavailable, not guessed.
    scored = [n for n in labels if n not in set(dm.tables.unavailable_labels)]
    if not scored:
        raise ConfigError(f"data={external}: none of the checkpoint's labels {labels} has a counterpart in {external}.")
    log.info("Evaluating %s on the %s split of %s (%s)", ckpt, split, dm.root, device)
    return _Subject(ckpt, model, dm, external, refit, split, str(device), scored)


def _placement(cfg: DictConfig, subject: _Subject) -> _Placement:
    """The output folder, and whether the checkpoint's thresholds and calibration (and the run's
    ``evaluation/`` and report.html, with ``run_dir=``) become this evaluation's.

    They do on the first evaluation (there is nothing to replace) or with ``write_to_run=true``.
    Otherwise the run keeps its own, this evaluation goes to its own folder, and a line says so:
    choosing other thresholds never changes what predict calls a finding without being asked."""
    write = cfg.get("write_to_run")
    if write is not None and not isinstance(write, bool):
        raise ConfigError(f"write_to_run={write!r}: expected true, false or null (the default: first evaluation only).")
    run = RunDir(cfg.run_dir) if cfg.get("run_dir") else None
    existing = [p for p in (thresholds_path(subject.ckpt), calibration_path(subject.ckpt)) if p.is_file()]
    if run is not None and run.evaluation.metrics.is_file():
        existing.append(run.evaluation.root)
    if subject.external is not None:
        if write:
            raise ConfigError(
                f"write_to_run=true with data={subject.external}: the run's thresholds and calibration are chosen on "
                "its own val split; an external evaluation never replaces them. Drop write_to_run."
            )
        return _Placement(_job_output_dir(cfg), to_run=False, kept=[])
    to_run = (not existing) if write is None else bool(write)
    if to_run and run is not None and not cfg.get("output_dir"):
        return _Placement(run.evaluation.root, to_run=True, kept=[])
    return _Placement(_job_output_dir(cfg), to_run=to_run, kept=[] if to_run else existing)


def _operating_point(cfg: DictConfig, subject: _Subject) -> _OperatingPoint:
    """Calibration and thresholds chosen on the val split, or the checkpoint's own carried over to
    an external source (how they transfer is the point)."""
    if not subject.own_val:
        carried = load_operating_point(subject.ckpt, subject.labels, warn_defaults=False)
        if carried.thresholds_file is None:
            raise CheckpointError(
                f"No thresholds chosen on the checkpoint's own val split ({thresholds_path(subject.ckpt)} is absent). "
                "Evaluate it on its own data first (python -m cxr_lightning.evaluate ckpt_path=... without data=), "
                "which saves them, or pass refit_thresholds=true to choose them on this source's val split."
            )
        calibration = carried.calibration
        if calibration is not None:
            calibration = calibration.over(subject.scored)
        return _OperatingPoint(calibration, carried.thresholds[subject.columns], str(carried.method),
                               "carried over from the checkpoint's own val split", [], carried=carried)
    raw_val, val_table = predict_split(subject.model, subject.dm, "val", subject.device)
    raw_val = raw_val[:, subject.columns]
    y_val = val_table[[f"label:{n}" for n in subject.scored]].to_numpy(dtype=float)
    method = cfg.calibration_method
    calibration = None if method == "none" else fit_calibration(y_val, raw_val, method, subject.scored)
    val_probs = calibration.apply(raw_val) if calibration else raw_val
    with warnings.catch_warnings():
        # Labels without val positives/negatives are listed in the report instead.
        warnings.filterwarnings("ignore", message="choose_thresholds: labels")
        thresholds = choose_thresholds(y_val, val_probs, cfg.threshold_method, DEFAULT_THRESHOLD, subject.scored)
    fallback = [n for n, ok in zip(subject.scored, _both_classes(y_val)) if not ok]
    if fallback:
        log.warning("No val positives or negatives for %s: threshold %.1f", ", ".join(fallback), DEFAULT_THRESHOLD)
    source = (f"chosen on the val split by {cfg.threshold_method}" if subject.external is None else
              f"refitted on the {subject.external} val split by {cfg.threshold_method} (refit_thresholds=true)")
    return _OperatingPoint(calibration, np.asarray(thresholds, dtype=float), str(cfg.threshold_method), source,
                           fallback, len(val_table), int(val_table[PATIENT].nunique()))


def _score(subject: _Subject, point: _OperatingPoint) -> _Scores:
    raw, table = predict_split(subject.model, subject.dm, subject.split, subject.device)
    raw = raw[:, subject.columns]
    y = table[[f"label:{n}" for n in subject.scored]].to_numpy(dtype=float)
    return _Scores(table, y, raw, point.calibration.apply(raw) if point.calibration else raw)


def _tables(cfg: DictConfig, subject: _Subject, scores: _Scores, point: _OperatingPoint) -> _Tables:
    """Every figure of the report: per label, per subgroup, the underdiagnosis audit, per source."""
    y, probs, scored = scores.y, scores.probs, subject.scored
    boot = _boot(cfg, scored)
    auroc = bootstrap_ci(y, probs, scores.patients, "auroc", **boot)
    auprc = bootstrap_ci(y, probs, scores.patients, "auprc", **boot)
    operating = operating_point_metrics(y, probs, point.thresholds, scored)
    bins = int(cfg.calibration_bins)
    ece = pd.Series(expected_calibration_error(y, probs, bins), index=scored)
    ece_raw = pd.Series(expected_calibration_error(y, scores.raw, bins), index=scored)
    return _Tables(
        per_class=_per_class_table(auroc, auprc, operating, ece, ece_raw),
        subgroups=_subgroup_table(scores.table, y, probs, scored, cfg, boot),
        underdiagnosis=_underdiagnosis_table(scores.table, y, probs, point.thresholds, scored, cfg, boot),
        per_source=_per_source(subject.dm, scores.table, y, probs, scored, cfg) if subject.dm.spec.pooled else {},
        competition=_competition(subject.dm, y, probs, scores.patients, scored, boot),
        ece=ece,
        ece_raw=ece_raw,
    )


def _boot(cfg: DictConfig, labels: list[str]) -> dict[str, Any]:
    return {"n_boot": int(cfg.n_boot), "alpha": float(cfg.alpha), "seed": int(cfg.seed), "label_names": labels}


def _write_own_operating_point(written: EvaluationDir, subject: _Subject, point: _OperatingPoint) -> dict[str, Path]:
    """This evaluation's thresholds and calibration in its own folder, in the sidecar format (a
    user can put them beside the checkpoint by hand, or rerun with ``write_to_run=true``)."""
    written.root.mkdir(parents=True, exist_ok=True)
    for stale in (written.thresholds, written.calibration):
        stale.unlink(missing_ok=True)
    if point.carried is not None:
        return {}
    record = thresholds_record(subject.ckpt, subject.scored, point.thresholds, point.method, point.n_val,
                               point.fallback, point.calibration)
    own = {"thresholds": files.write_json(written.thresholds, record)}
    if point.calibration is not None:
        own["calibration"] = files.write_json(written.calibration, calibration_record(subject.ckpt, point.calibration))
    return own


def _write_to_run(subject: _Subject, point: _OperatingPoint) -> dict[str, Path]:
    """The checkpoint's thresholds and calibration replaced by this evaluation's; with
    ``calibration_method=none`` the calibration file goes, so predict reports raw probabilities."""
    # Predict calls every label of the checkpoint: one the data scores none of keeps the default.
    labels = subject.labels
    chosen = dict(zip(subject.scored, point.thresholds))
    thresholds = [chosen.get(n, DEFAULT_THRESHOLD) for n in labels]
    fallback = [n for n in labels if n in point.fallback or n not in chosen]
    calibration = point.calibration.over(labels) if point.calibration is not None else None
    run_files = {"thresholds": save_thresholds(subject.ckpt, labels, thresholds, point.method, point.n_val,
                                               fallback, calibration)}
    if calibration is not None:
        run_files["calibration"] = save_calibration(subject.ckpt, calibration)
    elif calibration_path(subject.ckpt).is_file():
        calibration_path(subject.ckpt).unlink()
        log.info("calibration_method=none: removed %s, so predict reports raw probabilities", calibration_path(
            subject.ckpt))
    return run_files


def _summary(
    cfg: DictConfig,
    subject: _Subject,
    scores: _Scores,
    point: _OperatingPoint,
    tables: _Tables,
    applied: dict[str, Path],
    placement: _Placement,
) -> dict[str, Any]:
    """What report.md and model_card.md say of the job, and (``metrics``) all metrics.json holds."""
    dm, table, calibration = subject.dm, scores.table, point.calibration
    config = config_summary(subject.model)
    thresholds_file, calibration_file = applied.get("thresholds"), applied.get("calibration")
    summary = {
        "checkpoint": str(subject.ckpt),
        "checkpoint_sha256": files.file_digest(subject.ckpt),
        "data_source": dm.source,
        "trained_on": config["data_source"],
        "external": subject.external is not None,
        "data_root": str(dm.root),
        "label_table": dm.label_table_name,
        "split": subject.split,
        "n_images": len(table),
        "n_patients": int(table[PATIENT].nunique()),
        "n_images_val": point.n_val,
        "n_patients_val": point.n_patients_val,
        "uncertain": dm.uncertain,
        "label_space": dm.tables.label_space,
        "scored_labels": subject.scored,
        "per_source": tables.per_source,
        "competition": tables.competition,
        "unavailable_labels": list(dm.tables.unavailable_labels),
        "left_out": dict(dm.tables.left_out),
        "threshold_method": point.method,
        "threshold_source": point.source,
        "thresholds_file": str(thresholds_file) if thresholds_file else None,
        "written_to_run": placement.to_run,
        "run_files_kept": [str(p) for p in placement.kept],
        "fallback_threshold_labels": point.fallback,
        "undefined_labels": [n for n in subject.scored if np.isnan(tables.per_class.at[n, "auroc"])],
        "n_boot": int(cfg.n_boot),
        "alpha": float(cfg.alpha),
        "seed": int(cfg.seed),
        "min_patients": int(cfg.get("min_patients", html.DEFAULT_MIN_PATIENTS)),
        "calibration_bins": int(cfg.calibration_bins),
        "calibration_method": calibration.method if calibration else "none",
        "calibration_file": str(calibration_file) if calibration_file else None,
        "calibration_n_images": calibration.n_images if calibration else 0,
        "calibration_unfitted_labels": calibration.unfitted if calibration else [],
        "calibration": calibration.describe() if calibration else "none (raw model probabilities)",
    }
    metrics = {
        **summary,
        **_flat_metrics(tables.per_class, tables.subgroups),
        **_flat_underdiagnosis(tables.underdiagnosis),
        "config": config,
    }
    return {**summary, "config": config, "metrics": metrics}


def _write_report(
    written: EvaluationDir, subject: _Subject, scores: _Scores, tables: _Tables, summary: dict[str, Any]
) -> None:
    """metrics.json, the CSV tables, the figures, report.md and model_card.md."""
    y, probs, scored, per_class = scores.y, scores.probs, subject.scored, tables.per_class
    config = summary["config"]
    report_summary = {k: v for k, v in summary.items() if k not in ("config", "metrics")}
    _write_csv(per_class, written.per_class, index=True)
    _write_csv(tables.subgroups, written.subgroups, index=False)
    _write_csv(tables.underdiagnosis, written.underdiagnosis, index=False)
    _write_csv(predictions_table(scores.table, y, probs, scored), written.predictions, index=False)
    files.write_json(written.metrics, summary["metrics"])
    per_label = per_class.drop(index="mean")
    bins = int(report_summary["calibration_bins"])
    calibrated = report_summary["calibration_method"] != "none"
    figures = {
        "roc": report.roc_figure(y, probs, scored, per_label["auroc"].to_numpy()),
        "pr": report.pr_figure(y, probs, scored, per_label["auprc"].to_numpy()),
        "reliability": report.reliability_figure(
            y, probs, scored, tables.ece.to_numpy(), bins,
            raw=(scores.raw, tables.ece_raw.to_numpy()) if calibrated else None,
        ),
    }
    for name, fig in figures.items():
        report.save_figure(fig, written.figure(name))
    audit = tables.underdiagnosis
    files.write_text(written.report_md,
                     report.render_report(report_summary, config, per_class, tables.subgroups, audit))
    files.write_text(
        written.model_card,
        report.render_model_card(report_summary, config, data_table(subject.dm, scored), per_class,
                                 tables.subgroups, audit),
    )


def _log_outcome(
    written: EvaluationDir, scores: _Scores, tables: _Tables, placement: _Placement, page: Path
) -> None:
    log.info(
        "Mean AUROC %s on %d images; report: %s (in a browser: %s)",
        report.interval(*tables.per_class.loc["mean", ["auroc", "auroc_lower", "auroc_upper"]]),
        len(scores.table),
        written.report_md,
        page,
    )
    if placement.kept:
        log.warning(
            "Kept the run's own thresholds, calibration and evaluation (%s): predict goes on using them. This "
            "evaluation's are in %s; write_to_run=true replaces the run's with them and rebuilds its report.html.",
            ", ".join(str(p) for p in placement.kept),
            written.root,
        )


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


def _job_output_dir(cfg: DictConfig) -> Path:
    """``output_dir=``, else this command's own Hydra run directory (outputs/evaluate/<time>)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # composed outside a Hydra run: ${hydra:...} cannot resolve
        raise ConfigError("Pass output_dir=DIR for the evaluation outputs (a run's files are kept as they are: "
                          "write_to_run=true replaces them).") from None


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
