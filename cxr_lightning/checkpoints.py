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
- The thresholds and calibration evaluate writes beside a checkpoint, or into a bundle, are
  :mod:`cxr_lightning.operating_point`'s.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from cxr_lightning import schema
from cxr_lightning.errors import CheckpointError, ConfigError, TrainingError
from cxr_lightning.files import atomic_path
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.run_dir import RunDir

log = logging.getLogger(__name__)


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
        unsafe = _unsafe_globals(path) or _refused_global(exc)
        if not unsafe:  # weights_only failed on something that is not a readable pickle: garbage bytes
            raise CheckpointError(
                f"Cannot read checkpoint {path}: {_first_line(exc)}; it is not a torch checkpoint."
            ) from None
        # weights_only refused a global: unpickling would call code the file names.
        raise CheckpointError(
            f"Refusing to open checkpoint {path}: unpickling it needs {unsafe} beyond the tensors and plain data "
            f"a cxr-lightning checkpoint holds, so it could run arbitrary code. Only open files from people you "
            f"trust. {TRUST_HINT}"
        ) from None
    except Exception as exc:  # truncated, not a torch file
        raise CheckpointError(
            f"Cannot read checkpoint {path} ({type(exc).__name__}: {_first_line(exc)}); "
            f"{'it is truncated or damaged' if zipfile.is_zipfile(path) else 'it is not a torch checkpoint'}."
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint.")
    return ckpt


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """An exception's message as one short line without terminal colour codes (torch adds some)."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines() or [type(exc).__name__]
    return lines[0][:200]


def _refused_global(exc: BaseException) -> str:
    """The global torch's weights_only unpickler refused, read from its message (legacy non-zip
    files, which :func:`torch.serialization.get_unsafe_globals_in_checkpoint` cannot list)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", _ANSI.sub("", str(exc)))
    return found.group(1) if found else ""


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
    mode, without downloading weights. Its hyperparameters are checked against :mod:`cxr_lightning.schema`
    and its weights must match the rebuilt model key for key and shape for shape."""
    if is_bundle(path):
        from safetensors.torch import load_model as load_weights

        model = _rebuild(dict(read_bundle_metadata(path)["hyper_parameters"]), path)
        try:
            load_weights(model, str(path), strict=True, device=str(map_location))
        except Exception as exc:  # missing/unexpected keys, shapes, a damaged tensor block
            raise CheckpointError(
                f"Bundle {path}: its weights do not fit the model it describes ({_first_line(exc)})."
            ) from None
        return model.eval()
    ckpt = read_checkpoint(path, map_location=map_location, trust=trust)
    model = _rebuild(_hparams_of(ckpt, path), path)
    load_state(model, ckpt.get("state_dict"), path)
    return model.eval()


def load_state(model: torch.nn.Module, state: Any, path: str | os.PathLike) -> None:
    """``model.load_state_dict(state)`` for a state read from ``path``: exactly the model's keys,
    each a dense tensor of the model's shape; anything else is one :class:`CheckpointError`."""
    where = f"Checkpoint {path}"
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{where} holds no state_dict of weights.")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: its weights do not fit the model its hyperparameters describe (missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''})."
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{where}: weight {key} is {shape}, the model needs {tuple(expected[key].shape)}.")
        if value.numel() > 1 and 0 in value.stride():
            # One stored number broadcast over a whole weight: never written by training, and
            # in-place updates of such a view fail deep inside torch.
            raise CheckpointError(f"{where}: weight {key} is a stride-0 view of one value, not a stored tensor.")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: cannot load its weights ({_first_line(exc)}).") from None


def _hparams_of(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    hparams = ckpt.get("hyper_parameters")
    if not hparams or "label_names" not in hparams:
        raise CheckpointError(f"{path} is not a cxr-lightning checkpoint (no label names in its hyperparameters).")
    return schema.hyperparameters(hparams, f"Checkpoint {path}")


def _rebuild(hparams: dict[str, Any], path: str | os.PathLike) -> CXRClassifier:
    # The state dict holds the trained weights: never fetch or load pretrained ones again.
    hparams = {**hparams, "backbone": {**hparams["backbone"], "pretrained": False, "weights": None}}
    # channels_last is a training-speed choice for GPUs, not part of the model.
    hparams["channels_last"] = False
    try:
        return CXRClassifier(**hparams)
    except CheckpointError:
        raise
    except ConfigError as exc:  # an unknown backbone or head, a value out of range
        raise CheckpointError(f"Checkpoint {path}: its hyperparameters do not build a model ({exc})") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # a key the model does not take
        raise CheckpointError(
            f"Checkpoint {path}: its hyperparameters do not build a model ({_first_line(exc)})."
        ) from None


def resolve_checkpoint(ckpt_path: str | None, run_dir: str | None) -> Path:
    """``ckpt_path`` as given, or the best checkpoint recorded in ``run_dir/metrics.json``, else
    the run's ``last.ckpt``.

    A run directory may come from someone else: of its recorded best checkpoint only the file name
    counts, looked up in the run's own ``checkpoints/`` folder (:func:`schema.file_name_in`), so
    ``metrics.json`` can never point a command at a model (and its sidecars) elsewhere."""
    if ckpt_path:
        return Path(ckpt_path)
    if not run_dir:
        raise ConfigError("Pass ckpt_path=PATH (a .ckpt file) or run_dir=DIR (a training run directory).")
    run = RunDir(run_dir)
    if run.metrics.is_file():
        check = schema.Checker(f"Run metrics {run.metrics}")
        metrics = schema.mapping(schema.read_json(run.metrics, check), check, "")
        recorded = metrics.get("best_checkpoint")
        best = schema.file_name_in(run.checkpoints, recorded, check, "best_checkpoint")
        if best is not None:
            return best
        if recorded:
            log.warning("%s names best_checkpoint %s, which is not a file of %s; using the run's %s.",
                        run.metrics, str(recorded)[:200], run.checkpoints, run.last_checkpoint.name)
    if run.last_checkpoint.is_file() and schema.is_inside(run.last_checkpoint, run.root):
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
        metadata = schema.loads(header[BUNDLE_KEY], schema.Checker(f"Bundle {path} metadata"), allow_nan=False)
    except CheckpointError:
        raise
    except Exception as exc:  # not a safetensors file, or one without our metadata
        raise CheckpointError(
            f"Cannot read bundle {path} ({type(exc).__name__}: {exc}); make one with "
            "`python -m cxr_lightning.export ckpt_path=FILE format=bundle`."
        ) from None
    check = schema.Checker(f"Bundle {path} metadata")
    metadata = schema.mapping(schema.plain_data(metadata, check), check, "")
    if metadata.get("format") != BUNDLE_FORMAT or "label_names" not in metadata.get("hyper_parameters", {}):
        raise CheckpointError(f"{path} is not a cxr-lightning bundle of format {BUNDLE_FORMAT}.")
    metadata["hyper_parameters"] = schema.hyperparameters(metadata["hyper_parameters"], f"Bundle {path}")
    if metadata.get("thresholds"):
        saved = schema.mapping(metadata["thresholds"], check, "thresholds")
        saved["thresholds"] = schema.thresholds(saved.get("thresholds"), check, "thresholds.thresholds")
        metadata["thresholds"] = saved
    if metadata.get("calibration"):
        schema.calibration_data(metadata["calibration"], schema.Checker(f"Bundle {path} calibration"))
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
    ``run_dir``: the run this fit writes into; the callbacks' state read back is rebuilt from its
    own ``checkpoints/`` folder (:func:`rebuild_callback_states`).

    Lightning's own writer stages the file in the system temp folder and moves it, which is a copy
    (not atomic) when that folder is on another file system. A model whose weights hold NaN/inf is
    not written at all, so a diverged state never replaces the last good checkpoint.
    """

    def __init__(self, trust: bool = False, run_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.trust = trust
        # The run this fit writes into: restored checkpoint-callback state may only name its files.
        self.run_dir = Path(run_dir) if run_dir is not None else None

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

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):  # remote storage: Lightning's reader, weights_only unless trusted
            return super().load_checkpoint(path, map_location=map_location, weights_only=not self.trust)
        checkpoint = read_checkpoint(path, map_location=map_location or "cpu", trust=self.trust)
        if self.run_dir is not None:
            rebuild_callback_states(checkpoint, RunDir(self.run_dir).checkpoints, path)
        return checkpoint


# What a ModelCheckpoint's state holds besides paths: Lightning restores it as is.
_CHECKPOINT_SCORES = ("best_model_score", "current_score", "kth_value")
_CHECKPOINT_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


def rebuild_callback_states(checkpoint: dict[str, Any], checkpoints_dir: Path, source: Any) -> None:
    """Make the callbacks' state of a checkpoint read for resuming safe to hand to Lightning, in place.

    Lightning's ``ModelCheckpoint.load_state_dict`` restores the paths of the best, k-th best and
    last checkpoints as recorded, and later deletes the k-th best when a better one is saved,
    after checking only lexically that it lies under its folder (``<run>/checkpoints/../../x``
    does). So each ModelCheckpoint state is rebuilt from this run's own folder: every recorded
    path becomes ``checkpoints_dir/<its file name>``, kept only when that file exists there
    (:func:`schema.file_name_in`); the recorded ``dirpath`` is dropped, so the callback keeps its
    own. A state with a path that does not rebuild, or with values that are not scores, is
    dropped whole with a log line: the callback then starts afresh and deletes nothing it did not
    write in this run. Any other callback's state must be plain data."""
    states = checkpoint.get("callbacks")
    if states is None:
        return
    if not isinstance(states, dict):
        raise CheckpointError(f"Checkpoint {source}: its callbacks state is a {type(states).__name__}, not a mapping.")
    for key in list(states):
        state = states[key]
        if not isinstance(key, str) or not isinstance(state, dict):
            log.info("Resuming from %s: dropping the callback state %r (not a mapping).", source, str(key)[:80])
            del states[key]
        elif key.startswith("ModelCheckpoint"):  # its state key: the class name, then its settings
            rebuilt, why = _rebuilt_checkpoint_state(state, checkpoints_dir, source)
            if rebuilt is None:
                log.info("Resuming from %s: dropping the ModelCheckpoint state (%s); its best and last checkpoints "
                         "are tracked afresh from this run.", source, why)
                del states[key]
            else:
                states[key] = rebuilt
        else:
            plain = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in state.items()}
            try:
                check = schema.Checker(f"Checkpoint {source} callback state {key[:80]}")
                schema.plain_data(plain, check, allow_nan=True)
            except CheckpointError as exc:
                log.info("Resuming from %s: dropping a callback state (%s).", source, exc)
                del states[key]


def _rebuilt_checkpoint_state(state: dict[str, Any], folder: Path, source: Any) -> tuple[dict[str, Any] | None, str]:
    check = schema.Checker(f"Checkpoint {source} ModelCheckpoint state")
    rebuilt: dict[str, Any] = {k: v for k, v in state.items() if k != "dirpath"}
    monitor = state.get("monitor")
    if monitor is not None and not isinstance(monitor, str):
        return None, "its monitor is not a metric name"
    for key in _CHECKPOINT_SCORES:
        if key in state and not _is_score(state[key]):
            return None, f"{key} is not a score"
    try:
        for key in _CHECKPOINT_PATHS:
            recorded = state.get(key) or ""
            found = schema.file_name_in(folder, recorded, check, key)
            if recorded and found is None:
                return None, f"{key} {str(recorded)[:120]!r} is not a file of {folder}"
            rebuilt[key] = str(found) if found is not None else ""
        best_k = state.get("best_k_models") or {}
        if not isinstance(best_k, dict):
            return None, "best_k_models is not a mapping"
        rebuilt["best_k_models"] = {}
        for recorded, score in best_k.items():
            found = schema.file_name_in(folder, recorded, check, "best_k_models")
            if found is None or not _is_score(score):
                return None, f"best_k_models names {str(recorded)[:120]!r}, not a file of {folder}"
            rebuilt["best_k_models"][str(found)] = score
    except CheckpointError as exc:
        return None, str(exc)
    kth = rebuilt["kth_best_model_path"]
    if kth and kth not in rebuilt["best_k_models"]:
        return None, "kth_best_model_path is not one of best_k_models"
    return rebuilt, ""


def _is_score(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_finite_weights(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` with any NaN or inf."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
