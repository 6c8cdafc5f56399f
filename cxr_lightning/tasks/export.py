"""The export task behind ``python -m cxr_lightning.export ckpt_path=PATH format=onnx|torchscript|bundle``.

``onnx`` and ``torchscript`` export the model's ``forward(image, meta) -> logits``: ``image`` float32
``(B, 1, S, S)`` already through the model's preprocessing (``(pixels / 255 - mean) / std``, as
``preprocessing`` in the file's metadata says), ``meta`` float32 ``(B, M)``
in the checkpoint's ``meta_names`` order (built as ``predict`` builds it), ``logits`` ``(B, L)``
(apply a sigmoid for probabilities); the batch axis is dynamic. Label names, metadata names, image
size, normalisation, the checkpoint's sha256, how the file was checked, and the probability calibration and thresholds
evaluate fitted on the validation split travel inside the file: ONNX ``metadata_props``,
TorchScript extra file ``cxr_lightning.json``. The graph stays the checkpoint's own logits (its
parity check compares exactly those); a deployment calibrates with ``calibration``
(:meth:`cxr_lightning.calibration.Calibration.from_dict`) and then compares with ``thresholds``.

``bundle`` writes the whole model without pickle (see :func:`cxr_lightning.checkpoints.save_bundle`):
safetensors weights plus JSON metadata, with the thresholds evaluate chose for the checkpoint;
predict, explain and evaluate take it as ``ckpt_path=``.

After writing, the file is loaded back (onnxruntime, ``torch.jit.load``, or the bundle loader) and
run on ``check_inputs``: by default X-ray-like images of a small generated demo with their real
metadata rows, through the model's preprocessing (``data``: the checkpoint's own validation images;
``random``: N(0, 1) noise, which is no image a model ever sees). Every logit must match the
checkpoint's within ``atol + rtol x |logit|``, else the command fails with
:class:`CheckpointError` and no file is left behind. The file records the inputs, their number, the
largest logit and probability differences, the tolerance and, for scale, how far the checkpoint's
own float32 logits are from float64 ones.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from cxr_lightning import files, inference
from cxr_lightning.checkpoints import BUNDLE_SUFFIX, is_bundle, load_model, resolve_checkpoint, save_bundle
from cxr_lightning.data.cohort import new_patient_metadata
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.operating_point import OperatingPoint, fingerprint, load_operating_point
from cxr_lightning.tasks.build import datamodule_for

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "bundle": BUNDLE_SUFFIX}
CHECK_INPUTS = ("demo", "data", "random")
# The generated demo the default parity check runs on (a constructed demo, not evidence about X-rays).
_DEMO_PATIENTS = 8
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
    fmt, n, how = str(cfg.format), int(cfg.check_batch_size), str(cfg.get("check_inputs", "demo"))
    if fmt not in SUFFIXES:
        raise ConfigError(f"format={fmt!r}: expected one of {list(SUFFIXES)}.")
    if n < 1:
        raise ConfigError(f"check_batch_size={cfg.check_batch_size}: must be at least 1.")
    if how not in CHECK_INPUTS:
        raise ConfigError(f"check_inputs={how!r}: expected one of {list(CHECK_INPUTS)}.")
    atol, rtol = float(cfg.atol), float(cfg.rtol)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.get("run_dir"))
    if is_bundle(ckpt) and fmt == "bundle":
        raise ConfigError(f"{ckpt} is a bundle already; export it to format=onnx or torchscript.")
    output = Path(cfg.output) if cfg.get("output") else ckpt.with_name(ckpt.stem + SUFFIXES[fmt])
    model = load_model(ckpt, trust=bool(cfg.get("trust_checkpoint", False))).float().eval()
    point = load_operating_point(ckpt, list(model.hparams.label_names))
    metadata = export_metadata(model, ckpt, point)

    check, described = parity_inputs(model, how, n, int(cfg.seed), cfg.get("data"))
    with torch.no_grad():
        expected = model(*check).numpy()
        # The checkpoint's own float32 rounding error, against float64: the scale of any export's.
        exact = model.double()(*(t.double() for t in check)).numpy()
        model.float()
    with files.atomic_path(output) as tmp:
        if fmt == "bundle":
            extra = _bundle_extra(ckpt, point)
            save_bundle(model, tmp, extra)
            with torch.no_grad():
                actual = load_model(tmp)(*check).numpy()
        elif fmt == "onnx":
            _write_onnx(model, random_inputs(model, _EXPORT_BATCH, int(cfg.seed)), tmp, int(cfg.opset), metadata)
            actual = run_onnx(tmp, check)
        else:
            _write_torchscript(model, random_inputs(model, _EXPORT_BATCH, int(cfg.seed)), tmp, metadata)
            with torch.no_grad():
                actual = torch.jit.load(str(tmp))(*check).numpy()
        parity = parity_report(expected, actual, atol, rtol, described)
        parity["checkpoint_float32_vs_float64"] = float(np.max(np.abs(expected - exact))) if exact.size else 0.0
        if not parity["passed"]:
            raise CheckpointError(
                f"The {fmt} export of {ckpt} does not reproduce the checkpoint: max |logit difference| "
                f"{parity['max_abs_logit_diff']:.3g} (worst {parity['worst_excess']:.3g} x the allowed atol={atol:g} + "
                f"rtol={rtol:g} x |logit|) on {described}; {output} was not written."
            )
        metadata["parity"] = json.dumps(parity)
        _record_parity(fmt, tmp, metadata, extra if fmt == "bundle" else None, model)
    log.info(
        "Exported %s to %s (%s); parity on %s: max |logit diff| %.2g",
        ckpt, output, fmt, described, parity["max_abs_logit_diff"],
    )
    return ExportResult(output, fmt, parity["max_abs_logit_diff"], metadata)


def parity_report(expected: np.ndarray, actual: Any, atol: float, rtol: float, inputs: str) -> dict[str, Any]:
    """How the exported logits compare with the checkpoint's: passed when every logit is within
    ``atol + rtol x |logit|`` (``numpy.allclose``'s rule); NaN never passes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CheckpointError(
            f"The exported model returns logits of shape {actual.shape}, the checkpoint {expected.shape}."
        )
    diff = np.abs(expected - actual)
    excess = diff / (atol + rtol * np.abs(expected)) if expected.size else np.zeros(1)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    worst = float(np.max(excess)) if expected.size else 0.0
    return {
        "inputs": inputs,
        "n": int(expected.shape[0]),
        "max_abs_logit_diff": float(np.max(diff)) if expected.size else 0.0,
        "max_abs_probability_diff": (
            float(np.max(np.abs(sigmoid(expected) - sigmoid(actual)))) if expected.size else 0.0
        ),
        "max_abs_logit": float(np.max(np.abs(expected))) if expected.size else 0.0,
        "atol": atol,
        "rtol": rtol,
        "rule": "|exported - checkpoint| <= atol + rtol * |checkpoint| for every logit",
        "worst_excess": worst,
        "passed": bool(worst <= 1.0),  # NaN compares False
    }


def parity_inputs(
    model: CXRClassifier, how: str, n: int, seed: int, data: Any = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    """``n`` ``(image, meta)`` rows for the parity check and a description of them (see the module
    docstring for ``how``)."""
    if how == "random":
        return random_inputs(model, n, seed + 1), f"{n} random N(0,1) images with metadata in [0, 1]"
    if how == "data":
        dm = datamodule_for(model, data)
        return _first_rows(model, dm, n), f"{n} images of the checkpoint's data ({dm.root}) with their metadata rows"
    trained = dict((model.hparams.get("config") or {}).get("data") or {})
    layout = (bool(trained.get("prior_labels", True)), bool(trained.get("drop_no_finding", False)))
    pixels, meta, labels, meta_names = _demo_rows(int(model.hparams.image_size), n, seed, *layout)
    rows = "their metadata rows"
    if labels != list(model.hparams.label_names) or meta_names != list(model.hparams.meta_names):
        # Another label space (a pooled or CheXpert-trained checkpoint): the demo's pixels, with metadata
        # built as predict builds a new patient's, in the checkpoint's own layout.
        meta = torch.from_numpy(_new_patient_rows(model, len(pixels), seed))
        rows = "generated demographics (no prior visit) in the checkpoint's metadata layout"
    image = model.preprocess(pixels)
    return (image, meta.clone()), (
        f"{len(image)} generated demo X-rays (seed {seed}) with {rows}, through the model's preprocessing"
    )


def _new_patient_rows(model: CXRClassifier, n: int, seed: int) -> np.ndarray:
    """``n`` metadata rows of varied ages, sexes and views (one of each unknown), encoded for ``model``."""

    rng = np.random.default_rng(seed)
    demographics = pd.DataFrame(
        {
            "age": rng.integers(18, 90, n).astype(float),
            "sex": [("M", "F", None)[i % 3] for i in range(n)],
            "view": [("PA", "AP", None)[i % 3] for i in range(n)],
        },
        index=[f"demo-{i}" for i in range(n)],
    )
    demographics.loc[demographics.index[-1], "age"] = np.nan
    age_fill = model.hparams.get("age_fill")
    age_fill = float(50.0 if age_fill is None else age_fill)
    return new_patient_metadata(demographics, list(model.hparams.meta_names), age_fill)


@functools.lru_cache(maxsize=4)
def _demo_rows(size: int, n: int, seed: int, prior_labels: bool, drop_no_finding: bool):
    """uint8 pixels and metadata rows of ``n`` demo images (generated once per process and size)."""
    import tempfile

    from cxr_lightning.data import demo
    from cxr_lightning.data.datamodule import CXRDataModule

    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        root = demo.generate(Path(tmp) / "demo", patients=_DEMO_PATIENTS, image_size=size, seed=seed)
        dm = CXRDataModule(
            source="nih", root=root, cache_dir=Path(tmp) / "cache", image_size=size, batch_size=n,
            num_workers=0, prior_labels=prior_labels, drop_no_finding=drop_no_finding,
        )
        dm.setup("fit")
        pixels, meta = [], []
        for loader in (dm.val_dataloader, dm.test_dataloader, dm.train_dataloader):
            for batch in loader():
                pixels.append(batch["image"])
                meta.append(batch["meta"].float())
        pixels, meta = torch.cat(pixels)[:n], torch.cat(meta)[:n]
    return pixels, meta, list(dm.label_names), list(dm.meta_names)


def _first_rows(model: CXRClassifier, dm: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, meta = [], []
    for loader in (dm.val_dataloader, dm.test_dataloader):
        for batch in inference.model_batches(model, loader(), "cpu"):
            images.append(batch["input"])
            meta.append(batch["meta"].float())
            if sum(len(i) for i in images) >= n:
                return torch.cat(images)[:n], torch.cat(meta)[:n]
    if not images:
        raise CheckpointError("The parity check found no validation or test images; pass check_inputs=random.")
    return torch.cat(images), torch.cat(meta)


def _bundle_extra(ckpt: Path, point: OperatingPoint) -> dict[str, Any]:
    """What a bundle carries besides the model: where it came from, and the checkpoint's thresholds
    with the calibration they were chosen on (named by the checkpoint's sha256, the thresholds
    naming the calibration by its own), so a bundle predicts as its checkpoint does wherever it lies."""
    thresholds, calibration = point.records()
    source = fingerprint(ckpt)
    if calibration is not None:
        calibration = {**calibration, **source}
    return {"source_checkpoint": source["checkpoint"], "source_sha256": source["checkpoint_sha256"],
            "thresholds": thresholds, "calibration": calibration}


def _record_parity(fmt: str, path: Path, metadata: dict[str, str], extra: dict | None, model: CXRClassifier) -> None:
    """Write the parity result into the checked file's metadata (the graph itself is unchanged)."""
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path))
        onnx.helper.set_model_props(graph, metadata)
        onnx.save(graph, str(path))
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.load(str(path)), str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
    else:
        save_bundle(model, path, {**extra, "parity": json.loads(metadata["parity"])})


def export_metadata(
    model: CXRClassifier, ckpt: str | os.PathLike, point: OperatingPoint | None = None
) -> dict[str, str]:
    """What a deployment needs to feed the exported graph and read its output, as strings (ONNX
    metadata_props are); ``calibration`` is ``"none"`` when the thresholds apply to raw probabilities
    or evaluate has not fitted one."""
    hp = model.hparams
    labels = list(hp.label_names)
    point = point or load_operating_point(ckpt, labels)
    calibration, thresholds, thresholds_file = point.calibration, point.thresholds, point.thresholds_file
    return {
        "label_names": json.dumps(list(hp.label_names)),
        # nih14 for checkpoints from before label spaces (their labels are NIH's).
        "label_space": str(hp.get("label_space") or "nih14"),
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
        "calibration": json.dumps(calibration.to_dict()) if calibration else "none",
        "thresholds": json.dumps(dict(zip(labels, thresholds.tolist()))) if thresholds_file else "none",
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
def _write_onnx(
    model: CXRClassifier, sample: tuple[torch.Tensor, ...], path: Path, opset: int, metadata: dict[str, str],
) -> None:
    import onnx

    batch_axis = {0: "batch"}
    # nn.MultiheadAttention (open_clip's ViT towers) runs a fused kernel in eval mode that has no
    # ONNX operator; the unfused path computes the same attention from exportable operators.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _to_onnx(model, sample, path, opset, batch_axis)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _to_onnx(model: CXRClassifier, sample: tuple[torch.Tensor, ...], path: Path, opset: int, batch_axis: dict) -> None:
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


def _write_torchscript(
    model: CXRClassifier, sample: tuple[torch.Tensor, ...], path: Path, metadata: dict[str, str],
) -> None:
    with warnings.catch_warnings():
        # Trace-time notes about Python values; the parity check on another batch size is the test.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = model.to_torchscript(method="trace", example_inputs=sample)
    torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
