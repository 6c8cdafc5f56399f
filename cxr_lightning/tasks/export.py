"""The export task behind ``python -m cxr_lightning.export ckpt_path=PATH format=onnx|torchscript``.

The exported graph is the model's ``forward(image, meta) -> logits``: ``image`` float32
``(B, 1, S, S)`` already through the model's preprocessing (``(pixels / 255 - mean) / std``, as
``preprocessing`` in the file's metadata says), ``meta`` float32 ``(B, M)``
in the checkpoint's ``meta_names`` order (built as ``predict`` builds it), ``logits`` ``(B, L)``
(apply a sigmoid for probabilities); the batch axis is dynamic. Label names, metadata names, image
size, normalisation and the checkpoint's sha256 travel inside the file: ONNX ``metadata_props``,
TorchScript extra file ``cxr_lightning.json``.

After writing, the file is loaded back (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript)
and run on random inputs of another batch size; unless its logits match the checkpoint's within
``tolerance`` the command fails with :class:`CheckpointError` and no file is left behind.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cxr_lightning import files
from cxr_lightning.checkpoints import load_model, resolve_checkpoint
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.models.module import CXRClassifier

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAMES = ("image", "meta")
OUTPUT_NAME = "logits"
TORCHSCRIPT_METADATA = "cxr_lightning.json"
_EXPORT_BATCH = 2


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    metadata: dict[str, str]


def export(cfg: DictConfig) -> ExportResult:
    """Export the checkpoint named by ``cfg`` and verify the file against it; returns what was written."""
    fmt = str(cfg.format)
    if fmt not in SUFFIXES:
        raise ConfigError(f"format={fmt!r}: expected one of {list(SUFFIXES)}.")
    if int(cfg.check_batch_size) < 1:
        raise ConfigError(f"check_batch_size={cfg.check_batch_size}: must be at least 1.")
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    output = Path(cfg.output) if cfg.get("output") else ckpt.with_name(ckpt.stem + SUFFIXES[fmt])
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False))).float().eval()
    metadata = export_metadata(model, ckpt)

    sample = random_inputs(model, _EXPORT_BATCH, int(cfg.seed))
    check = random_inputs(model, int(cfg.check_batch_size), int(cfg.seed) + 1)
    with torch.no_grad():
        expected = model(*check).numpy()
    with files.atomic_path(output) as tmp:
        if fmt == "onnx":
            _write_onnx(model, sample, tmp, int(cfg.opset), metadata)
            actual = run_onnx(tmp, check)
        else:
            _write_torchscript(model, sample, tmp, metadata)
            with torch.no_grad():
                actual = torch.jit.load(str(tmp))(*check).numpy()
        diff = _max_abs_diff(expected, actual)
        if not diff <= float(cfg.tolerance):  # also catches NaN
            raise CheckpointError(
                f"The {fmt} export of {ckpt} does not reproduce the checkpoint: max |logit difference| "
                f"{diff:.3g} > tolerance {cfg.tolerance} on {len(expected)} random inputs; {output} was not written."
            )
    log.info("Exported %s to %s (%s); parity max |diff| %.2g", ckpt, output, fmt, diff)
    return ExportResult(output, fmt, diff, metadata)


def export_metadata(model: CXRClassifier, ckpt: str | os.PathLike) -> dict[str, str]:
    """What a deployment needs to feed the exported graph, as strings (ONNX metadata_props are)."""
    hp = model.hparams
    return {
        "label_names": json.dumps(list(hp.label_names)),
        "meta_names": json.dumps(list(hp.meta_names)),
        "image_size": str(int(hp.image_size)),
        "mean": repr(model.preprocess.mean),
        "std": repr(model.preprocess.std),
        "preprocessing": json.dumps(model.preprocess.describe()),
        "age_fill": repr(hp.get("age_fill")),
        "inputs": json.dumps(list(INPUT_NAMES)),
        "output": f"{OUTPUT_NAME} (apply a sigmoid for probabilities)",
        "checkpoint": Path(ckpt).name,
        "checkpoint_sha256": files.file_digest(ckpt),
    }


def random_inputs(model: CXRClassifier, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, meta)`` of the checkpoint's shapes: a normalised-scale image and metadata in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    size = int(model.hparams.image_size)
    image = torch.randn(batch, 1, size, size, generator=generator)
    meta = torch.rand(batch, len(model.hparams.meta_names), generator=generator)
    return image, meta


def run_onnx(path: str | os.PathLike, inputs: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Logits of an exported ONNX file under onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs)))
    # The exporter drops an input the graph never reads (meta for head=baseline, image for metadata_only).
    wanted = {i.name for i in session.get_inputs()}
    return session.run([OUTPUT_NAME], {k: v for k, v in feed.items() if k in wanted})[0]


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def read_torchscript_metadata(path: str | os.PathLike) -> dict[str, str]:
    extra = {TORCHSCRIPT_METADATA: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_METADATA])


# --------------------------------------------------------------------------------------------
def _write_onnx(model: CXRClassifier, sample: tuple[torch.Tensor, ...], path: Path, opset: int, metadata: dict[str, str]) -> None:
    import onnx

    batch_axis = {0: "batch"}
    with warnings.catch_warnings():
        # The torch.export-based exporter (dynamo=True) needs the onnxscript package; the
        # TorchScript-based one is deprecated but exact for these feed-forward graphs.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        model.to_onnx(
            path,
            sample,
            dynamo=False,
            export_params=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: batch_axis for name in (*INPUT_NAMES, OUTPUT_NAME)},
        )
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _write_torchscript(model: CXRClassifier, sample: tuple[torch.Tensor, ...], path: Path, metadata: dict[str, str]) -> None:
    with warnings.catch_warnings():
        # Trace-time notes about Python values; the parity check on another batch size is the test.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = model.to_torchscript(method="trace", example_inputs=sample)
    torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


def _max_abs_diff(expected: np.ndarray, actual: Any) -> float:
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        raise CheckpointError(f"The exported model returns logits of shape {actual.shape}, the checkpoint {expected.shape}.")
    return float(np.max(np.abs(expected - actual))) if expected.size else 0.0
