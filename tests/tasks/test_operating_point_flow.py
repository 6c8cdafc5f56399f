"""The operating point across commands: evaluate keeps a run's thresholds unless asked, a bundle
beside its checkpoint carries its own, and predict applies thresholds on the scale they were
chosen on."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import compose_config, fit_tiny
from PIL import Image

from cxr_lightning import files
from cxr_lightning.checkpoints import load_model
from cxr_lightning.run_dir import RunDir, calibration_path, thresholds_path
from cxr_lightning.tasks.evaluate import evaluate
from cxr_lightning.tasks.export import export
from cxr_lightning.tasks.predict import predict

pytestmark = pytest.mark.slow
N_BOOT = 20


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    return fit_tiny(tiny_demo, tmp_path_factory.mktemp("run"), head="fusion")


def run_evaluate(*overrides: str):
    return evaluate(compose_config([f"n_boot={N_BOOT}", "data.num_workers=0", *overrides], config_name="evaluate"))


def run_predict(model_file: Path, image: Path, output: Path) -> pd.DataFrame:
    overrides = [f"ckpt_path={model_file}", f"input={image}", f"output={output}", "raw_probabilities=true"]
    cfg = compose_config(overrides, config_name="predict")
    return predict(cfg).predictions


def digests(*paths: Path) -> dict[Path, str]:
    return {p: files.file_digest(p) for p in paths}


def test_evaluate_keeps_the_runs_operating_point_unless_asked(fitted, tmp_path, caplog):
    run_dir, ckpt = fitted
    run = RunDir(run_dir)
    first = run_evaluate(f"run_dir={run_dir}")
    assert first.written_to_run and first.output_dir == run.evaluation.root
    assert first.thresholds_file == thresholds_path(ckpt)
    assert json.loads(thresholds_path(ckpt).read_text())["method"] == "f1"
    kept = digests(thresholds_path(ckpt), calibration_path(ckpt), run.evaluation.metrics, run.report_html)

    with caplog.at_level(logging.WARNING, logger="cxr_lightning.tasks.evaluate"):
        second = run_evaluate(f"run_dir={run_dir}", "threshold_method=youden", f"output_dir={tmp_path / 'youden'}")
    assert not second.written_to_run and second.output_dir == tmp_path / "youden"
    assert digests(*kept) == kept  # the run's thresholds, calibration, evaluation and page untouched
    assert "Kept the run's own thresholds" in caplog.text and "write_to_run=true" in caplog.text
    own = json.loads((tmp_path / "youden" / "thresholds.json").read_text())
    assert own["method"] == "youden" and second.thresholds_file == tmp_path / "youden" / "thresholds.json"
    assert own["checkpoint_sha256"] == files.file_digest(ckpt) and own["scale"] == "calibrated"
    labels = list(load_model(ckpt).hparams.label_names)
    for name in labels:  # the figures are computed at this evaluation's thresholds
        assert second.per_class.at[name, "threshold"] == pytest.approx(own["thresholds"][name])
    assert second.metrics["run_files_kept"] and not second.metrics["written_to_run"]
    assert "the checkpoint keeps the thresholds" in (tmp_path / "youden" / "report.md").read_text()

    replaced = run_evaluate(f"run_dir={run_dir}", "threshold_method=youden", "write_to_run=true")
    assert replaced.written_to_run and replaced.output_dir == run.evaluation.root
    assert json.loads(thresholds_path(ckpt).read_text())["method"] == "youden"
    assert json.loads(run.evaluation.metrics.read_text())["threshold_method"] == "youden"
    page = run.report_html.read_text()
    assert files.file_digest(run.report_html) != kept[run.report_html] and "youden" in page


def test_a_bundle_beside_its_checkpoint_carries_its_own_and_honours_the_scale(fitted, tiny_demo, tmp_path):
    run_dir, ckpt = fitted
    if not thresholds_path(ckpt).is_file():
        run_evaluate(f"run_dir={run_dir}", "write_to_run=true")
    bundle = export(compose_config([f"ckpt_path={ckpt}", "format=bundle"], config_name="export")).path
    assert bundle.parent == ckpt.parent and bundle.stem == ckpt.stem  # where export puts it: beside
    image = tmp_path / "x.png"
    Image.open(next((tiny_demo / "images_001" / "images").glob("*.png"))).save(image)
    labels = list(load_model(ckpt).hparams.label_names)
    raw_columns = [f"raw:{n}" for n in labels]

    # With the checkpoint's evaluation beside it, the bundle predicts exactly as its checkpoint.
    from_ckpt = run_predict(ckpt, image, tmp_path / "ckpt.csv")
    from_bundle = run_predict(bundle, image, tmp_path / "bundle.csv")
    np.testing.assert_allclose(from_bundle[labels].to_numpy(float), from_ckpt[labels].to_numpy(float), atol=1e-6)
    assert from_bundle.loc[0, "findings"] == from_ckpt.loc[0, "findings"]
    calibrated = from_ckpt[labels].to_numpy(float)
    raw = from_ckpt[raw_columns].to_numpy(float)
    assert not np.allclose(calibrated, raw)  # the checkpoint's calibration is applied

    # Evaluated without calibration, the bundle gets its own raw-scale thresholds (named after the
    # bundle, not its checkpoint), and predict compares them with raw probabilities, not Platt's.
    ckpt_files = digests(thresholds_path(ckpt), calibration_path(ckpt))
    raw_eval = run_evaluate(f"ckpt_path={bundle}", "calibration_method=none", f"output_dir={tmp_path / 'bundle'}")
    assert raw_eval.written_to_run and thresholds_path(bundle) != thresholds_path(ckpt)
    assert thresholds_path(bundle).name == f"{bundle.name}.thresholds.json"
    saved = json.loads(thresholds_path(bundle).read_text())
    assert saved["scale"] == "raw" and saved["checkpoint_sha256"] == files.file_digest(bundle)
    assert digests(*ckpt_files) == ckpt_files
    again = run_predict(bundle, image, tmp_path / "bundle-raw.csv")
    np.testing.assert_allclose(again[labels].to_numpy(float), raw, atol=1e-6)
    called = [n for n in labels if again.loc[0, f"raw:{n}"] >= saved["thresholds"][n]]
    assert again.loc[0, "findings"] == "|".join(called)
    # ... while the checkpoint keeps its calibrated operating point.
    still = run_predict(ckpt, image, tmp_path / "ckpt-again.csv")
    np.testing.assert_allclose(still[labels].to_numpy(float), calibrated, atol=1e-6)


def test_a_bundle_whose_thresholds_name_another_checkpoint_is_refused(fitted, tmp_path):
    from cxr_lightning.checkpoints import save_bundle
    from cxr_lightning.errors import CheckpointError
    from cxr_lightning.operating_point import load_operating_point, thresholds_record

    _, ckpt = fitted
    model = load_model(ckpt)
    labels = list(model.hparams.label_names)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"another checkpoint")
    record = thresholds_record(other, labels, [0.5] * len(labels), "f1", 10)
    bundle = save_bundle(model, tmp_path / "model.safetensors", {
        "source_checkpoint": ckpt.name, "source_sha256": files.file_digest(ckpt), "thresholds": record,
    })
    with pytest.raises(CheckpointError, match="thresholds chosen for another checkpoint") as info:
        load_operating_point(bundle, labels)
    assert str(bundle) in str(info.value)
