"""The one owner of a run directory's layout and of the names of the files the commands write.

A training run directory (``outputs/<task>/<time>/``)::

    config.yaml                 the resolved config train wrote before fitting
    .hydra/config.yaml          Hydra's copy (there even when a run failed before train wrote its own)
    metrics.json                train's figures, with best_checkpoint and last_checkpoint
    history.csv                 one row per epoch (callbacks.EpochHistory)
    checkpoints/last.ckpt       and the monitored checkpoints; resume=auto starts from last.ckpt
    checkpoints/<stem>.thresholds.json, <stem>.calibration.json
                                the run's operating point, chosen / fitted by its first evaluate
                                (or one with write_to_run=true) beside their checkpoint; a bundle's
                                are <name>.thresholds.json (best.safetensors.thresholds.json)
    evaluation/                 the run's evaluation (an :class:`EvaluationDir`): evaluate run_dir=RUN
                                the first time, or with write_to_run=true; later ones write their own folder
    explain/                    explain run_dir=RUN (an :class:`ExplainDir`)
    report.html                 the browser page over evaluation/ and explain/
    error.txt                   the exception of a failed sweep job
    label_efficiency.csv/.png, probe_per_label.csv, probe_predictions.csv
                                a linear probe's run (python -m cxr_lightning.probe) instead of checkpoints
    resumed_into.txt            left by an invocation that continued another run (resume=auto)

Everything else names these files through this module. The YAML configs spell two of them
(``checkpoints/`` and ``history.csv`` in conf/callbacks/default.yaml, where Hydra interpolates
``paths.output_dir``); tests/test_run_dir.py keeps those equal to the names here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# File and folder names. ``last.ckpt`` is Lightning's ModelCheckpoint name for the latest state
# (CHECKPOINT_NAME_LAST + FILE_EXTENSION); spelled here so that reading a run's layout needs no
# Lightning import (tests/test_run_dir.py checks they agree).
METRICS = "metrics.json"
RUN_CONFIG = "config.yaml"
HYDRA_CONFIG = f".hydra/{RUN_CONFIG}"
HISTORY = "history.csv"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"  # Lightning's SLURM requeue checkpoints, in the run root
EVALUATION = "evaluation"
EXPLAIN = "explain"
REPORT_HTML = "report.html"
ERROR = "error.txt"
RESUMED_NOTE = "resumed_into.txt"  # left by an invocation that continued another run directory
# In the evaluation directory
REPORT_MD = "report.md"
MODEL_CARD = "model_card.md"
PER_CLASS = "per_class.csv"
SUBGROUPS = "subgroups.csv"
UNDERDIAGNOSIS = "underdiagnosis.csv"
PREDICTIONS = "predictions.csv"  # also predict's default output name
FIGURES = {"roc": "roc.png", "pr": "pr.png", "reliability": "reliability.png"}
EVALUATION_THRESHOLDS = "thresholds.json"
EVALUATION_CALIBRATION = "calibration.json"
# In the explain directory
OVERLAYS = "overlays"
TENSORBOARD = "tensorboard"
CAMS = "cams.csv"
LOCALIZATION = "localization.csv"
# In a linear-probe run directory (python -m cxr_lightning.probe), beside config.yaml, metrics.json
# and report.html
LABEL_EFFICIENCY = "label_efficiency.csv"  # one row per training fraction
LABEL_EFFICIENCY_FIGURE = "label_efficiency.png"
PROBE_PER_LABEL = "probe_per_label.csv"  # one row per (fraction, label)
PROBE_PREDICTIONS = "probe_predictions.csv"  # test probabilities of the largest fraction's probe
# Beside a checkpoint
CHECKPOINT_SUFFIX = ".ckpt"
THRESHOLDS_SUFFIX = ".thresholds.json"
CALIBRATION_SUFFIX = ".calibration.json"


def thresholds_path(model_file: str | os.PathLike) -> Path:
    """``<stem>.thresholds.json`` beside a checkpoint, ``<name>.thresholds.json`` beside a bundle."""
    return _sidecar(model_file, THRESHOLDS_SUFFIX)


def calibration_path(model_file: str | os.PathLike) -> Path:
    """``<stem>.calibration.json`` beside a checkpoint, ``<name>.calibration.json`` beside a bundle."""
    return _sidecar(model_file, CALIBRATION_SUFFIX)


def _sidecar(model_file: str | os.PathLike, suffix: str) -> Path:
    # A bundle exported beside its checkpoint shares its stem; naming the bundle's sidecars after its
    # whole name keeps the two files' thresholds apart.
    path = Path(model_file)
    return path.with_name((path.stem if path.suffix == CHECKPOINT_SUFFIX else path.name) + suffix)


@dataclass(frozen=True)
class _OutputDir:
    """A folder a command writes: its root (any path-like, kept as a Path) and its metrics.json."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metrics(self) -> Path:
        return self.root / METRICS


@dataclass(frozen=True)
class EvaluationDir(_OutputDir):
    """What evaluate writes into its output directory (``<run>/evaluation`` or ``output_dir=``)."""

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def model_card(self) -> Path:
        return self.root / MODEL_CARD

    @property
    def per_class(self) -> Path:
        return self.root / PER_CLASS

    @property
    def subgroups(self) -> Path:
        return self.root / SUBGROUPS

    @property
    def underdiagnosis(self) -> Path:
        return self.root / UNDERDIAGNOSIS

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS

    @property
    def report_html(self) -> Path:
        """The page beside report.md when the evaluation is not a run's own."""
        return self.root / REPORT_HTML

    @property
    def thresholds(self) -> Path:
        """This evaluation's thresholds, in the sidecar format (the run's own are beside its checkpoint)."""
        return self.root / EVALUATION_THRESHOLDS

    @property
    def calibration(self) -> Path:
        """This evaluation's calibration, in the sidecar format."""
        return self.root / EVALUATION_CALIBRATION

    def figure(self, name: str) -> Path:
        """``roc``, ``pr`` or ``reliability``."""
        return self.root / FIGURES[name]


@dataclass(frozen=True)
class ExplainDir(_OutputDir):
    """What explain writes into its output directory (``<run>/explain`` or ``output_dir=``)."""

    @property
    def overlays(self) -> Path:
        return self.root / OVERLAYS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def cams(self) -> Path:
        return self.root / CAMS

    @property
    def localization(self) -> Path:
        return self.root / LOCALIZATION


@dataclass(frozen=True)
class RunDir(_OutputDir):
    """A training run directory; each property is the path of one file or folder in it."""

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def hydra_config(self) -> Path:
        return self.root / HYDRA_CONFIG

    @property
    def history(self) -> Path:
        return self.root / HISTORY

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def hpc_checkpoints(self) -> list[Path]:
        return sorted(self.root.glob(HPC_CHECKPOINT_GLOB))

    @property
    def evaluation(self) -> EvaluationDir:
        return EvaluationDir(self.root / EVALUATION)

    @property
    def explain(self) -> ExplainDir:
        return ExplainDir(self.root / EXPLAIN)

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def error(self) -> Path:
        return self.root / ERROR

    @property
    def label_efficiency(self) -> Path:
        return self.root / LABEL_EFFICIENCY

    @property
    def label_efficiency_figure(self) -> Path:
        return self.root / LABEL_EFFICIENCY_FIGURE

    @property
    def probe_per_label(self) -> Path:
        return self.root / PROBE_PER_LABEL

    @property
    def probe_predictions(self) -> Path:
        return self.root / PROBE_PREDICTIONS

    @classmethod
    def of_checkpoint(cls, ckpt: str | os.PathLike) -> RunDir | None:
        """The run a checkpoint lies in (``<run>/checkpoints/<file>``), or None when it lies elsewhere."""
        path = Path(ckpt)
        return cls(path.parent.parent) if path.parent.name == CHECKPOINTS else None
