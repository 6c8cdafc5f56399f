"""The operating point of a model file: the per-label thresholds evaluate chose on the validation
split and the probability calibration fitted on it, which predict, explain and export apply.

They come as a pair, because thresholds are chosen on one probability scale: calibrated when a
calibration was fitted (``scale: calibrated``, with the calibration's content hash), else raw
(``scale: raw``). Where a pair is found, in order:

1. *sidecars* beside the model file (``run_dir.thresholds_path`` / ``calibration_path``:
   ``<stem>.thresholds.json`` beside a ``.ckpt``, ``<name>.thresholds.json`` beside a bundle, so a
   bundle exported beside its checkpoint never reads the checkpoint's), each holding the file's
   name, size and sha256;
2. a *bundle's own copies* in its header (those of the checkpoint it was exported from, whose
   sha256 they must carry).

Sidecar and calibration are read from the same place as the thresholds; a calibration whose hash
is not the one the thresholds were chosen on is refused rather than mixed in, and raw-scale
thresholds are applied to raw probabilities even where a calibration is present. Without any
thresholds every label gets :data:`DEFAULT_THRESHOLD` (with a warning).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_lightning import schema
from cxr_lightning.calibration import Calibration
from cxr_lightning.checkpoints import is_bundle, read_bundle_metadata
from cxr_lightning.errors import CheckpointError
from cxr_lightning.files import file_digest, write_json
from cxr_lightning.run_dir import calibration_path, thresholds_path

log = logging.getLogger(__name__)
# The decision threshold of a label without one chosen on the validation split.
DEFAULT_THRESHOLD = 0.5
SCALES = ("calibrated", "raw")


@dataclass(frozen=True)
class OperatingPoint:
    """Thresholds in the model's label order, the calibration they were chosen on, and their files
    (a sidecar, or the bundle for its own copies; ``None`` for defaults / no calibration)."""

    thresholds: np.ndarray
    calibration: Calibration | None
    thresholds_file: Path | None
    calibration_file: Path | None
    method: str | None = None
    saved: dict[str, Any] | None = None  # the thresholds file's content, as read

    def records(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The thresholds as read and the calibration as plain data, for a bundle to carry."""
        return self.saved, self.calibration.to_dict() if self.calibration is not None else None

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` on the scale the thresholds apply to."""
        return self.calibration.apply(raw) if self.calibration is not None else raw


def calibration_digest(calibration: Calibration) -> str:
    """sha256 of the calibration's parameters as canonical JSON: what thresholds name it by."""
    data = {k: v for k, v in calibration.to_dict().items() if k in ("method", "label_names", "labels")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(model_file: str | os.PathLike) -> dict[str, Any]:
    """The name, size and sha256 a sidecar carries of the model file it belongs to."""
    path = Path(model_file)
    return {"checkpoint": path.name, "checkpoint_sha256": file_digest(path), "checkpoint_size": path.stat().st_size}


def thresholds_record(
    model_file: str | os.PathLike,
    label_names: Sequence[str],
    thresholds: Sequence[float],
    method: str,
    n_images: int,
    fallback: Sequence[str] = (),
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """A thresholds file's content: per-label thresholds chosen on val for ``model_file``, on the
    scale of ``calibration`` (named by :func:`calibration_digest`) or raw without one."""
    record = {
        "thresholds": {name: float(t) for name, t in zip(label_names, thresholds)},
        "method": method,
        "chosen_on": "val",
        "scale": "calibrated" if calibration is not None else "raw",
        "n_images": int(n_images),
        "fallback_labels": list(fallback),
        **fingerprint(model_file),
    }
    if calibration is not None:
        record["calibration_sha256"] = calibration_digest(calibration)
    return record


def calibration_record(model_file: str | os.PathLike, calibration: Calibration) -> dict[str, Any]:
    """A calibration file's content: the fitted maps with ``model_file``'s fingerprint."""
    return {**calibration.to_dict(), **fingerprint(model_file)}


def save_thresholds(ckpt_path: str | os.PathLike, *choice: Any, **options: Any) -> Path:
    """Write the thresholds sidecar beside ``ckpt_path``: ``choice`` and ``options`` are
    :func:`thresholds_record`'s (labels, thresholds, method, n_images; fallback, calibration)."""
    return write_json(thresholds_path(ckpt_path), thresholds_record(ckpt_path, *choice, **options))


def save_calibration(ckpt_path: str | os.PathLike, calibration: Calibration) -> Path:
    """Write the calibration sidecar beside ``ckpt_path``."""
    return write_json(calibration_path(ckpt_path), calibration_record(ckpt_path, calibration))


def load_operating_point(
    model_file: str | os.PathLike, label_names: Sequence[str], warn_defaults: bool = True
) -> OperatingPoint:
    """The thresholds and calibration evaluate chose for ``model_file``, in ``label_names`` order.

    A sidecar written for another file, for other labels, or a calibration that is not the one the
    thresholds were chosen on, is a :class:`CheckpointError`. ``warn_defaults`` warns when no
    thresholds (0.5 for every label) or no calibration (raw probabilities) were found.
    """
    path = Path(model_file)
    labels = list(label_names)
    if thresholds_path(path).is_file():
        saved, origin = _read_sidecar(thresholds_path(path), path, "Thresholds"), thresholds_path(path)
        saved["thresholds"] = schema.thresholds(saved.get("thresholds"), schema.Checker(f"Thresholds file {origin}"))
        calibration, calibration_file = _sidecar_calibration(path, labels)
    elif is_bundle(path) and read_bundle_metadata(path).get("thresholds"):
        saved, origin = _bundle_thresholds(path), path
        calibration, calibration_file = _bundle_calibration(path, labels)
    else:
        calibration, calibration_file = _sidecar_calibration(path, labels)
        if calibration is None and is_bundle(path):
            calibration, calibration_file = _bundle_calibration(path, labels)
        if warn_defaults:
            warnings.warn(
                f"No thresholds file {thresholds_path(path)}: calling findings at probability >= {DEFAULT_THRESHOLD} "
                f"for every label. Run `python -m cxr_lightning.evaluate ckpt_path={path}` to choose them on the "
                "validation split.",
                stacklevel=2,
            )
            if calibration is None:
                _warn_uncalibrated(path)
        return OperatingPoint(np.full(len(labels), DEFAULT_THRESHOLD), calibration, None, calibration_file)
    if calibration is None and is_bundle(path):
        # evaluate wrote raw-scale thresholds beside the bundle, or the bundle's own calibration is the
        # one they name by hash
        calibration, calibration_file = _bundle_calibration(path, labels)
    calibration, calibration_file = _paired(saved, origin, path, calibration, calibration_file)
    return OperatingPoint(
        _in_order(saved["thresholds"], labels, origin), calibration, origin, calibration_file,
        str(saved.get("method")), dict(saved),
    )


def load_calibration(
    model_file: str | os.PathLike, label_names: Sequence[str]
) -> tuple[Calibration | None, Path | None]:
    """The calibration predict would apply to ``model_file``'s probabilities, and its file: the one its
    thresholds were chosen on (none for raw-scale thresholds), else whichever was fitted."""
    point = load_operating_point(model_file, label_names, warn_defaults=False)
    if point.calibration is None and point.thresholds_file is None:
        _warn_uncalibrated(Path(model_file))
    return point.calibration, point.calibration_file


def _paired(
    saved: Mapping[str, Any],
    origin: Path,
    model_file: Path,
    calibration: Calibration | None,
    calibration_file: Path | None,
) -> tuple[Calibration | None, Path | None]:
    """The calibration the thresholds of ``origin`` apply on: checked by hash, none for raw ones."""
    check = schema.Checker(f"Thresholds file {origin}")
    # Files written before the scale was recorded were chosen on whatever calibration lay beside them.
    scale = saved.get("scale", "calibrated" if calibration is not None else "raw")
    if scale not in SCALES:
        raise check.fail("scale", f"{scale!r} is not one of {list(SCALES)}")
    if scale == "raw":
        if calibration is not None:
            log.info("The thresholds in %s were chosen on raw probabilities: the calibration in %s is not applied.",
                     origin, calibration_file)
        return None, None
    if calibration is None:
        raise CheckpointError(
            f"The thresholds in {origin} were chosen on calibrated probabilities, but no calibration was found "
            f"for them (expected {calibration_path(model_file)}); rerun "
            "`python -m cxr_lightning.evaluate` on the model file to write both again."
        )
    wanted = saved.get("calibration_sha256")
    if wanted is not None and schema.text(wanted, check, "calibration_sha256", schema.SHA256) != calibration_digest(
        calibration
    ):
        raise CheckpointError(
            f"The thresholds in {origin} were chosen on another calibration than the one in {calibration_file} "
            f"(calibration sha256 {wanted[:12]}…); rerun `python -m cxr_lightning.evaluate` to write both again."
        )
    return calibration, calibration_file


def _sidecar_calibration(path: Path, labels: list[str]) -> tuple[Calibration | None, Path | None]:
    sidecar = calibration_path(path)
    if not sidecar.is_file():
        return None, None
    check = schema.Checker(f"Calibration file {sidecar}")
    saved = schema.calibration_data(_read_sidecar(sidecar, path, "Calibration"), check)
    return _checked_labels(Calibration.from_dict(saved, f"Calibration file {sidecar}"), labels, sidecar), sidecar


def _bundle_thresholds(bundle: Path) -> dict[str, Any]:
    """A bundle's own thresholds, refused unless chosen for the checkpoint it was exported from."""
    metadata = read_bundle_metadata(bundle)
    saved = dict(metadata["thresholds"])
    source = metadata.get("source_sha256")
    if source is not None and saved.get("checkpoint_sha256") not in (None, source):
        raise CheckpointError(
            f"Bundle {bundle} carries thresholds chosen for another checkpoint (sha256 "
            f"{str(saved['checkpoint_sha256'])[:12]}…) than the one it was exported from ({str(source)[:12]}…); "
            "export it again from an evaluated checkpoint."
        )
    return saved


def _bundle_calibration(bundle: Path, labels: list[str]) -> tuple[Calibration | None, Path | None]:
    data = read_bundle_metadata(bundle).get("calibration")
    if not data:
        return None, None
    return _checked_labels(Calibration.from_dict(data, f"bundle {bundle}"), labels, bundle), bundle


def _checked_labels(calibration: Calibration, labels: list[str], source: Path) -> Calibration:
    if calibration.label_names != labels:
        raise CheckpointError(
            f"The calibration in {source} is for labels {calibration.label_names}, the model predicts {labels}; "
            "rerun evaluate."
        )
    return calibration


def _warn_uncalibrated(path: Path) -> None:
    warnings.warn(
        f"No calibration file {calibration_path(path)}: probabilities are the model's raw outputs, which the "
        f"class-weighted losses push up. Run `python -m cxr_lightning.evaluate ckpt_path={path}` to fit a "
        "calibration on the validation split.",
        stacklevel=3,
    )


def _in_order(by_label: Mapping[str, float], label_names: Sequence[str], source: Path) -> np.ndarray:
    missing = [n for n in label_names if n not in by_label]
    if missing:
        raise CheckpointError(f"Thresholds in {source} have no threshold for {missing}; rerun evaluate.")
    return np.array([float(by_label[n]) for n in label_names])


def _read_sidecar(path: Path, model_file: Path, kind: str) -> dict[str, Any]:
    """A JSON file kept beside ``model_file``, refused unless it is plain data (:mod:`cxr_lightning.schema`)
    written for exactly this file."""
    check = schema.Checker(f"{kind} file {path}")
    saved = schema.mapping(schema.read_json(path, check, allow_nan=False), check, "")
    size, digest = schema.fingerprint(saved, check)
    if size != model_file.stat().st_size or digest != file_digest(model_file):
        raise CheckpointError(
            f"{kind} file {path} was computed for a different checkpoint than {model_file} (sha256 {digest[:12]}…); "
            f"rerun `python -m cxr_lightning.evaluate ckpt_path={model_file}` or delete the file."
        )
    return saved
