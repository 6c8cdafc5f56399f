"""The one place a checkpoint, or a file kept beside one, is read or written.

- :func:`read_checkpoint` is the only ``torch.load`` of the package: model loading, the config
  checks, resuming a fit (through :class:`AtomicCheckpointIO`) and export all go through it. It
  unpickles nothing but :data:`CHECKPOINT_GLOBALS` (``weights_only`` loading): opening a file
  someone shared never runs code from it. ``trust=True`` (the commands' ``trust_checkpoint=true``)
  is the explicit opt-in to full unpickling, for the user's own files of another layout.
- :func:`load_model` rebuilds a trained :class:`CXRClassifier` from a checkpoint alone.
- A *bundle* (``export format=bundle``, :func:`save_bundle`) is a model to share without pickle: one
  safetensors file of weights whose header holds JSON metadata (labels, metadata layout, input
  size, preprocessing, the model config that rebuilds it, thresholds). :func:`load_model` takes a
  bundle wherever it takes a checkpoint, so predict, explain and evaluate do too.
- :class:`AtomicCheckpointIO` writes every checkpoint Lightning saves to a temporary file beside it
  and renames it into place, and refuses to write a model whose weights are no longer finite.
- :func:`resolve_checkpoint` turns ``ckpt_path=`` / ``run_dir=`` into a file.
- Thresholds and the probability calibration fitted by evaluate live beside their checkpoint
  (``<stem>.thresholds.json``, ``<stem>.calibration.json``) with the checkpoint's sha256, so a
  retrained checkpoint never inherits stale ones.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from cxr_lightning.calibration import Calibration
from cxr_lightning.errors import CheckpointError, ConfigError, TrainingError
from cxr_lightning.files import atomic_path, file_digest, write_json
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.run_dir import RunDir, calibration_path, thresholds_path

log = logging.getLogger(__name__)
# The decision threshold of a label without one chosen on the validation split.
DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------------
# Reading
# The classes a checkpoint written by this framework holds besides what ``weights_only`` loading
# always allows (tensors, builtin containers and scalars): found by listing the globals referenced
# by real checkpoints of fits with every callback of conf/callbacks/default.yaml (ModelCheckpoint,
# EarlyStopping, LearningRateMonitor), each optimizer and scheduler config and a fine-tuning
# schedule (tests/test_safe_checkpoints.py keeps that list true). Hyperparameters are plain data
# (see CXRClassifier), so this stays short on purpose: anything else in a file is refused.
CHECKPOINT_GLOBALS: tuple[type, ...] = (collections.OrderedDict,)
TRUST_HINT = (
    "If you made this file yourself with an older or modified version of this code and trust it, pass "
    "trust_checkpoint=true to load it with full unpickling (which runs any code the file carries), then "
    "re-save it (for example with `python -m cxr_lightning.export format=bundle`)."
)


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False, trust: bool = False
) -> dict[str, Any]:
    """The checkpoint dict stored at ``path``; :class:`CheckpointError` naming the file when it is
    missing, truncated, not a checkpoint, or needs more than :data:`CHECKPOINT_GLOBALS` to unpickle
    (``trust=True`` allows that, for files the user made). ``mmap`` leaves the tensors on disk (for
    reading hyperparameters only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        if trust:
            log.warning("trust_checkpoint=true: unpickling %s without restrictions.", path)
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)  # explicit opt-in
        else:
            with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
                ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if not unsafe:  # weights_only failed on something that is not a readable pickle: garbage bytes
            raise CheckpointError(f"Cannot read checkpoint {path} ({exc}); is it a .ckpt file, and complete?") from None
        # weights_only refused a global: unpickling would call code the file names.
        raise CheckpointError(
            f"Refusing to open checkpoint {path}: unpickling it needs {unsafe} beyond the tensors and plain data "
            f"a cxr-lightning checkpoint holds, so it could run arbitrary code. Only open files from people you "
            f"trust. {TRUST_HINT}"
        ) from None
    except Exception as exc:  # truncated, not a zip-format torch file
        raise CheckpointError(f"Cannot read checkpoint {path} ({type(exc).__name__}: {exc}); is it complete?") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint.")
    return ckpt


def _unsafe_globals(path: Path) -> str:
    """The classes/functions a refused file references beyond the allow-list, as torch lists them
    from the pickle's opcodes (nothing is unpickled); "" when the file is no readable pickle."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip-format torch file
        return ""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in CHECKPOINT_GLOBALS}
    names = [n for n in names if n not in allowed]
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def checkpoint_hparams(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """A cxr-lightning checkpoint's hyperparameters, read without loading its weights into memory."""
    return _hparams_of(read_checkpoint(path, mmap=True, trust=trust), path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", trust: bool = False) -> CXRClassifier:
    """Rebuild a trained model from its checkpoint (or bundle, see :func:`is_bundle`) alone, in eval
    mode, without downloading weights."""
    if is_bundle(path):
        from safetensors.torch import load_model as load_weights

        model = _rebuild(dict(read_bundle_metadata(path)["hyper_parameters"]))
        load_weights(model, str(path), strict=True, device=str(map_location))
        return model.eval()
    ckpt = read_checkpoint(path, map_location=map_location, trust=trust)
    model = _rebuild(_hparams_of(ckpt, path))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def _hparams_of(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    hparams = ckpt.get("hyper_parameters")
    if not hparams or "label_names" not in hparams:
        raise CheckpointError(f"{path} is not a cxr-lightning checkpoint (no label names in its hyperparameters).")
    return dict(hparams)


def _rebuild(hparams: dict[str, Any]) -> CXRClassifier:
    # The state dict holds the trained weights: never fetch or load pretrained ones again.
    hparams = {**hparams, "backbone": {**hparams["backbone"], "pretrained": False, "weights": None}}
    # channels_last is a training-speed choice for GPUs, not part of the model.
    hparams["channels_last"] = False
    return CXRClassifier(**hparams)


def resolve_checkpoint(ckpt_path: str | None, run_dir: str | None) -> Path:
    """``ckpt_path`` as given, or the best checkpoint recorded in ``run_dir/metrics.json``, else
    the run's ``last.ckpt``."""
    if ckpt_path:
        return Path(ckpt_path)
    if not run_dir:
        raise ConfigError("Pass ckpt_path=PATH (a .ckpt file) or run_dir=DIR (a training run directory).")
    run = RunDir(run_dir)
    if run.metrics.is_file():
        best = json.loads(run.metrics.read_text()).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
    if run.last_checkpoint.is_file():
        return run.last_checkpoint
    raise CheckpointError(
        f"{run_dir} holds no finished run (no {run.metrics.name} best checkpoint, no "
        f"{run.last_checkpoint.relative_to(run.root)})."
    )


# --------------------------------------------------------------------------------------------------
# Bundles: safetensors weights + JSON metadata, nothing to unpickle
BUNDLE_SUFFIX = ".safetensors"
BUNDLE_KEY = "cxr_lightning"  # the safetensors header entry holding the JSON metadata
BUNDLE_FORMAT = 1


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a bundle (by its ``.safetensors`` suffix) rather than a checkpoint."""
    return str(path).endswith(BUNDLE_SUFFIX)


def save_bundle(model: CXRClassifier, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a bundle: its state dict as safetensors, its hyperparameters (plain data)
    and ``extra`` (provenance, thresholds, parity) as the JSON metadata of the file's header."""
    from safetensors.torch import save_model

    hp = model.hparams
    metadata = {
        "format": BUNDLE_FORMAT,
        "label_names": list(hp.label_names),
        "label_space": str(hp.get("label_space") or "nih14"),
        "meta_names": list(hp.meta_names),
        "image_size": int(hp.image_size),
        "preprocessing": model.preprocess.describe(),
        "hyper_parameters": _plain_data(dict(hp)),
        **dict(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        # save_model (not save_file): it keeps one copy of tensors the model shares between modules.
        save_model(model, str(tmp), metadata={BUNDLE_KEY: json.dumps(metadata)})
    return path


def read_bundle_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A bundle's JSON metadata, read from the safetensors header (the weights are not loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Bundle {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header[BUNDLE_KEY])
    except Exception as exc:  # not a safetensors file, or one without our metadata
        raise CheckpointError(
            f"Cannot read bundle {path} ({type(exc).__name__}: {exc}); make one with "
            "`python -m cxr_lightning.export ckpt_path=FILE format=bundle`."
        ) from None
    if metadata.get("format") != BUNDLE_FORMAT or "label_names" not in metadata.get("hyper_parameters", {}):
        raise CheckpointError(f"{path} is not a cxr-lightning bundle of format {BUNDLE_FORMAT}.")
    return metadata


def _plain_data(value: Any) -> Any:
    """``value`` as JSON data (hyperparameters are plain data; tuples become lists)."""
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------------------
# Writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint is written to a temporary file in its folder, synced and renamed into place,
    and read back through :func:`read_checkpoint`.

    ``trust`` is :func:`read_checkpoint`'s opt-in, for resuming from a file the user made.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a copy
    (not atomic) when that folder is on another file system. A model whose weights hold NaN/inf is
    not written at all, so a diverged state never replaces the last good checkpoint.
    """

    def __init__(self, trust: bool = False) -> None:
        super().__init__()
        self.trust = trust

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        bad = non_finite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingError(
                f"Not writing checkpoint {path}: the model's weights hold NaN/inf values ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}), so training has diverged. The checkpoints already in "
                f"{path.parent} are kept. Lower optimizer.lr, set trainer.gradient_clip_val=1.0 or use "
                "trainer.precision=32-true, and restart from the last good checkpoint (ckpt_path=FILE)."
            )
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):  # remote storage: Lightning's reader, weights_only unless trusted
            return super().load_checkpoint(path, map_location=map_location, weights_only=not self.trust)
        return read_checkpoint(path, map_location=map_location or "cpu", trust=self.trust)


def non_finite_weights(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` with any NaN or inf."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


# --------------------------------------------------------------------------------------------------
# Thresholds beside the checkpoint (written by evaluate, read by predict)
def save_thresholds(
    ckpt_path: str | os.PathLike,
    label_names: Sequence[str],
    thresholds: Sequence[float],
    method: str,
    n_images: int,
    fallback: Sequence[str] = (),
    calibrated: bool = False,
) -> Path:
    """Write the per-label thresholds with the checkpoint's fingerprint; ``calibrated`` says they
    apply to calibrated probabilities (the calibration file beside them)."""
    ckpt = Path(ckpt_path)
    return write_json(
        thresholds_path(ckpt),
        {
            "thresholds": {name: float(t) for name, t in zip(label_names, thresholds)},
            "method": method,
            "chosen_on": "val",
            "scale": "calibrated" if calibrated else "raw",
            "n_images": int(n_images),
            "fallback_labels": list(fallback),
            **_fingerprint(ckpt),
        },
    )


def load_thresholds(ckpt_path: str | os.PathLike, label_names: Sequence[str]) -> tuple[np.ndarray, Path | None]:
    """The thresholds ``evaluate`` saved for this checkpoint, in ``label_names`` order, and their file.

    A bundle carries the thresholds of the checkpoint it was made from; a thresholds file beside it
    (evaluate run on the bundle itself) takes precedence. Without either every label gets
    :data:`DEFAULT_THRESHOLD` (with a warning) and the file is ``None``; a file written for another
    checkpoint, or for other labels, is a :class:`CheckpointError`.
    """
    ckpt, path = Path(ckpt_path), thresholds_path(ckpt_path)
    if not path.is_file() and is_bundle(ckpt) and read_bundle_metadata(ckpt).get("thresholds"):
        saved = read_bundle_metadata(ckpt)["thresholds"]
        return _in_order(saved["thresholds"], label_names, ckpt), ckpt
    if not path.is_file():
        warnings.warn(
            f"No thresholds file {path}: calling findings at probability >= {DEFAULT_THRESHOLD} for every label. "
            f"Run `python -m cxr_lightning.evaluate ckpt_path={ckpt}` to choose them on the validation split.",
            stacklevel=2,
        )
        return np.full(len(label_names), DEFAULT_THRESHOLD), None
    return _in_order(_read_thresholds_file(path, ckpt)["thresholds"], label_names, path), path


def matching_thresholds(ckpt_path: str | os.PathLike) -> dict[str, Any] | None:
    """The thresholds file's content when it was written for this very checkpoint, else None."""
    path = thresholds_path(ckpt_path)
    if not path.is_file():
        return None
    try:
        return _read_thresholds_file(path, Path(ckpt_path))
    except CheckpointError:
        return None


def _read_thresholds_file(path: Path, ckpt: Path) -> dict[str, Any]:
    saved = _read_sidecar(path, ckpt, "Thresholds")
    try:
        saved["thresholds"] = {str(k): float(v) for k, v in saved["thresholds"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"Thresholds file {path} is malformed ({exc}); delete it and rerun evaluate.") from exc
    return saved


def _in_order(by_label: Mapping[str, float], label_names: Sequence[str], source: Path) -> np.ndarray:
    missing = [n for n in label_names if n not in by_label]
    if missing:
        raise CheckpointError(f"Thresholds in {source} have no threshold for {missing}; rerun evaluate.")
    return np.array([float(by_label[n]) for n in label_names])


# --------------------------------------------------------------------------------------------------
# Calibration beside the checkpoint (fitted by evaluate; applied by predict, explain and export)
def save_calibration(ckpt_path: str | os.PathLike, calibration: Calibration) -> Path:
    """Write the fitted calibration with the checkpoint's fingerprint."""
    ckpt = Path(ckpt_path)
    return write_json(calibration_path(ckpt), {**calibration.to_dict(), **_fingerprint(ckpt)})


def load_calibration(ckpt_path: str | os.PathLike, label_names: Sequence[str]) -> tuple[Calibration | None, Path | None]:
    """The calibration ``evaluate`` fitted for this checkpoint and its file.

    Without a file: ``(None, None)`` and a warning that probabilities stay raw. A file written for
    another checkpoint, or for other labels, is a :class:`CheckpointError`.
    """
    ckpt, path = Path(ckpt_path), calibration_path(ckpt_path)
    if not path.is_file() and is_bundle(ckpt) and read_bundle_metadata(ckpt).get("calibration"):
        # A bundle carries the calibration of the checkpoint it was made from.
        return Calibration.from_dict(read_bundle_metadata(ckpt)["calibration"], f"bundle {ckpt}"), ckpt
    if not path.is_file():
        warnings.warn(
            f"No calibration file {path}: probabilities are the model's raw outputs, which the class-weighted "
            f"losses push up. Run `python -m cxr_lightning.evaluate ckpt_path={ckpt}` to fit a calibration "
            "on the validation split.",
            stacklevel=2,
        )
        return None, None
    calibration = Calibration.from_dict(_read_sidecar(path, ckpt, "Calibration"), f"Calibration file {path}")
    if calibration.label_names != list(label_names):
        raise CheckpointError(
            f"Calibration file {path} is for labels {calibration.label_names}, the checkpoint predicts "
            f"{list(label_names)}; rerun evaluate."
        )
    return calibration, path


def _fingerprint(ckpt: Path) -> dict[str, Any]:
    return {"checkpoint": ckpt.name, "checkpoint_sha256": file_digest(ckpt), "checkpoint_size": ckpt.stat().st_size}


def _read_sidecar(path: Path, ckpt: Path, kind: str) -> dict[str, Any]:
    """A JSON file kept beside ``ckpt``, refused unless it was written for exactly this checkpoint."""
    try:
        saved = json.loads(path.read_text())
        size, digest = int(saved["checkpoint_size"]), str(saved["checkpoint_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{kind} file {path} is malformed ({exc}); delete it and rerun evaluate.") from exc
    if size != ckpt.stat().st_size or digest != file_digest(ckpt):
        raise CheckpointError(
            f"{kind} file {path} was computed for a different checkpoint than {ckpt} (sha256 {digest[:12]}…); "
            f"rerun `python -m cxr_lightning.evaluate ckpt_path={ckpt}` or delete the file."
        )
    return saved
