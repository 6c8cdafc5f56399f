"""Export to ONNX and TorchScript: the files reproduce the checkpoint, carry its metadata, and a
mismatch fails without leaving a file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config, fit_tiny

from cxr_lightning.calibration import Calibration
from cxr_lightning.checkpoints import load_model
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.operating_point import save_calibration
from cxr_lightning.run_dir import calibration_path
from cxr_lightning.tasks import export as export_module
from cxr_lightning.tasks.export import export, read_onnx_metadata, read_torchscript_metadata

onnxruntime = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tiny_demo, tmp_path_factory) -> Path:
    return fit_tiny(tiny_demo, tmp_path_factory.mktemp("run"), head="fusion")[1]


def inputs(model, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    size = model.hparams.image_size
    return (
        torch.randn(batch, 1, size, size, generator=generator),
        torch.rand(batch, len(model.hparams.meta_names), generator=generator),
    )


def run_export(ckpt: Path, fmt: str, output: Path):
    return export(compose_config([f"ckpt_path={ckpt}", f"format={fmt}", f"output={output}"], config_name="export"))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_the_checkpoint_at_any_batch_size_and_carries_its_metadata(ckpt, tmp_path, fmt):
    explicit = fmt == "torchscript"  # onnx: the default path beside the checkpoint
    output = tmp_path / "model.pt" if explicit else ckpt.with_name(ckpt.stem + ".onnx")
    result = export(compose_config(
        [f"ckpt_path={ckpt}", f"format={fmt}"] + ([f"output={output}"] if explicit else []), config_name="export"
    ))
    try:
        assert result.path == output and output.stat().st_size > 0
        assert result.max_abs_diff <= 1e-4
        model = load_model(ckpt)
        for batch in (1, 5):  # neither is the export's batch size of 2
            image, meta = inputs(model, batch)
            with torch.no_grad():
                expected = model(image, meta).numpy()
            if fmt == "onnx":
                session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
                assert [i.name for i in session.get_inputs()] == ["image", "meta"]
                got = session.run(["logits"], {"image": image.numpy(), "meta": meta.numpy()})[0]
            else:
                with torch.no_grad():
                    got = torch.jit.load(str(output))(image, meta).numpy()
            assert got.shape == (batch, len(model.hparams.label_names))
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

        written = read_onnx_metadata(output) if fmt == "onnx" else read_torchscript_metadata(output)
        hp = model.hparams
        assert json.loads(written["label_names"]) == list(hp.label_names)
        assert json.loads(written["meta_names"]) == list(hp.meta_names)
        assert int(written["image_size"]) == hp.image_size
        assert float(written["mean"]) == pytest.approx(hp.mean) and float(written["std"]) == pytest.approx(hp.std)
        assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    finally:
        output.unlink(missing_ok=True)


def test_a_mismatching_export_fails_loudly_and_leaves_no_file(ckpt, tmp_path, monkeypatch):
    real_run = export_module.run_onnx
    monkeypatch.setattr(export_module, "run_onnx", lambda path, batch: real_run(path, batch) + 1e-2)
    output = tmp_path / "model.onnx"
    with pytest.raises(CheckpointError, match=r"does not reproduce the checkpoint: max \|logit difference\| 0\.01"):
        run_export(ckpt, "onnx", output)
    assert not output.exists()
    assert not list(tmp_path.iterdir())


def test_unknown_format_is_a_config_error(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="format='tflite'"):
        run_export(ckpt, "tflite", tmp_path / "m")


def test_export_carries_the_calibration_that_turns_its_logits_into_calibrated_probabilities(ckpt, tmp_path):
    model = load_model(ckpt)
    labels = list(model.hparams.label_names)
    params = {n: {"slope": 0.5 + 0.1 * j, "intercept": -1.0} for j, n in enumerate(labels)}
    fitted = Calibration("platt", labels, params, n_images=7)
    output = tmp_path / "model.pt"
    try:
        save_calibration(ckpt, fitted)
        run_export(ckpt, "torchscript", output)
    finally:
        calibration_path(ckpt).unlink()
    written = read_torchscript_metadata(output)
    assert written["thresholds"] == "none"
    carried = Calibration.from_dict(json.loads(written["calibration"]))
    image, meta = inputs(model, 3)
    with torch.no_grad():
        exported = torch.sigmoid(torch.jit.load(str(output))(image, meta)).double().numpy()
        reference = torch.sigmoid(model(image, meta)).double().numpy()
    logit = np.log(reference) - np.log1p(-reference)
    expected = 1 / (1 + np.exp(-(np.array([0.5 + 0.1 * j for j in range(len(labels))]) * logit - 1.0)))
    np.testing.assert_allclose(carried.apply(exported), expected, atol=1e-5)


def test_exported_files_say_how_they_were_checked(ckpt, tmp_path):
    output = tmp_path / "model.onnx"
    result = run_export(ckpt, "onnx", output)
    parity = json.loads(read_onnx_metadata(output)["parity"])
    assert parity["passed"] and parity["n"] == 8 and "generated demo X-rays" in parity["inputs"]
    assert (
        parity["max_abs_logit_diff"] == result.max_abs_diff <= parity["atol"] + parity["rtol"] * parity["max_abs_logit"]
    )
    assert (parity["atol"], parity["rtol"]) == (1e-3, 1e-3) and parity["checkpoint_float32_vs_float64"] >= 0


def test_a_bundle_predicts_what_its_checkpoint_predicts_and_carries_its_thresholds(ckpt, tiny_demo, tmp_path):
    from cxr_lightning.checkpoints import read_bundle_metadata
    from cxr_lightning.operating_point import save_thresholds
    from cxr_lightning.tasks.predict import predict

    copy = tmp_path / "model.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    labels = load_model(copy).hparams.label_names
    wanted = np.linspace(0.2, 0.8, len(labels))
    save_thresholds(copy, labels, wanted, "f1", n_images=5)
    result = run_export(copy, "bundle", tmp_path / "shared" / "model.safetensors")
    bundle = result.path
    assert bundle.is_file() and not (bundle.parent / "model.thresholds.json").exists()
    with open(bundle, "rb") as fh:
        assert b"\x80\x04" not in fh.read(2)  # not a pickle: safetensors starts with its header length
    meta = read_bundle_metadata(bundle)
    assert meta["label_names"] == list(labels) and meta["image_size"] == 64
    assert meta["preprocessing"] == load_model(copy).preprocess.describe()
    assert meta["parity"]["max_abs_logit_diff"] == 0.0 and meta["source_checkpoint"] == "model.ckpt"

    images = tiny_demo / "images_001" / "images"
    runs = {}
    for name, path in (("ckpt", copy), ("bundle", bundle)):
        runs[name] = predict(compose_config(
            [f"ckpt_path={path}", f"input={images}", f"output={tmp_path / name}.csv"], config_name="predict"
        ))
    a, b = runs["ckpt"].predictions, runs["bundle"].predictions
    assert len(a) > 5
    np.testing.assert_array_equal(a[list(labels)].to_numpy(), b[list(labels)].to_numpy())
    assert runs["bundle"].thresholds_file == bundle
    assert a.drop(columns="file", errors="ignore").equals(b.drop(columns="file", errors="ignore"))
