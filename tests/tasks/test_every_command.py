"""One run through every command that touches it: train -> evaluate -> explain -> export -> predict
-> compare, for a pooled run (the demo in NIH's layout with a CheXpert-format fixture, union labels)
and for a foundation-model backbone loaded from its published folder format (RAD-DINO's)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_external as mx
from helpers import compose_config, tiny_overrides
from helpers.foundation import DINO_SIZE, write_dinov2

from cxr_lightning.checkpoints import load_model
from cxr_lightning.run_dir import RunDir, thresholds_path

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _pooled(tiny_demo: Path, tmp_path: Path) -> list[str]:
    chexpert = mx.write_chexpert(tmp_path / "chexpert" / "CheXpert-v1.0-small")
    sources = f"{{nih: {{source: nih, root: {tiny_demo}}}, chexpert: {{source: chexpert, root: {chexpert}}}}}"
    return ["data=pooled", f"data.sources={sources}", "labels=union", "data.test_fraction=0.2",
            "data.image_size=32", "head=fusion"]


def _rad_dino(tiny_demo: Path, tmp_path: Path) -> list[str]:
    pytest.importorskip("transformers")
    write_dinov2(tmp_path / "rad-dino")
    return ["backbone=rad_dino", f"backbone.weights={tmp_path / 'rad-dino'}",
            "backbone.cam_layer=net.encoder.layer.1.norm1", f"data.image_size={DINO_SIZE}", "head=baseline"]


CASES = {"pooled": _pooled, "rad_dino": _rad_dino}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_goes_through_every_command(case, tiny_demo, tmp_path):
    from cxr_lightning.tasks.compare import read_runs
    from cxr_lightning.tasks.evaluate import evaluate
    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.export import export
    from cxr_lightning.tasks.predict import predict
    from cxr_lightning.tasks.train import train

    run_dir = tmp_path / "sweep" / "0"
    base = [o for o in tiny_overrides(tiny_demo, run_dir) if not o.startswith(("data.image_size=",))]
    if case == "pooled":
        base = [o for o in base if not o.startswith(("data=", "data.root="))]
    overrides = base + CASES[case](tiny_demo, tmp_path) + [
        "trainer.limit_train_batches=2", "test_after_fit=false", "callbacks.cam_grid=null",
        "callbacks.sample_images=null",
    ]
    metrics = train(compose_config(overrides))
    run = RunDir(run_dir)
    ckpt = Path(metrics["best_checkpoint"])
    labels = list(load_model(ckpt).hparams.label_names)

    evaluation = evaluate(compose_config([f"run_dir={run_dir}", "n_boot=10", "data.num_workers=0"], "evaluate"))
    assert evaluation.written_to_run and thresholds_path(ckpt).is_file()
    assert math.isfinite(evaluation.metrics["auroc_mean"])
    if case == "pooled":
        assert set(evaluation.metrics["per_source"]) == {"nih", "chexpert"}
        assert "Lung Opacity" in labels and "Mass" in labels  # the union of both sources' labels

    explained = explain(compose_config(
        [f"run_dir={run_dir}", "split=test", "n=3", "top_k=1", "data.num_workers=0"], "explain"))
    assert len(list(run.explain.overlays.glob("*.png"))) == explained["n_cams"] > 0
    assert run.report_html.is_file() and "Grad-CAM" in run.report_html.read_text()

    bundle = export(compose_config([f"ckpt_path={ckpt}", "format=bundle"], "export")).path
    onnx = export(compose_config([f"ckpt_path={ckpt}", "format=onnx", f"output={tmp_path / 'm.onnx'}"], "export"))
    assert json.loads(onnx.metadata["parity"])["passed"] and json.loads(onnx.metadata["thresholds"])

    images = sorted((tiny_demo / "images_001" / "images").glob("*.png"))[:3]
    folder = tmp_path / "new-images"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    runs = {}
    for name, model_file in (("ckpt", ckpt), ("bundle", bundle)):
        runs[name] = predict(compose_config(
            [f"ckpt_path={model_file}", f"input={folder}", f"output={tmp_path / name}.csv"], "predict"))
        assert not runs[name].failures and len(runs[name].predictions) == 3
    np.testing.assert_allclose(runs["bundle"].predictions[labels].to_numpy(float),
                               runs["ckpt"].predictions[labels].to_numpy(float), atol=1e-6)
    assert runs["bundle"].predictions["findings"].tolist() == runs["ckpt"].predictions["findings"].tolist()

    compared = read_runs(tmp_path / "sweep")
    assert compared.loc[0, "status"] == "ok"
    assert compared.loc[0, "evaluation.auroc_mean"] == pytest.approx(evaluation.metrics["auroc_mean"])
    if case == "pooled":
        assert compared.loc[0, "test.source_auroc.nih"] == pytest.approx(
            evaluation.metrics["per_source"]["nih"]["auroc_mean"], nan_ok=True)
