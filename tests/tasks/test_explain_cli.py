"""The explain job (python -m cxr_lightning.explain) and the CamGridCallback, on a tiny fitted model."""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import compose_config, tiny_overrides
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cxr_lightning.checkpoints import load_model
from cxr_lightning.data.nih import read_bbox_table
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.explain import NO_GRADIENT, CamWarning, UnknownMetadataWarning
from cxr_lightning.tasks import explain as explain_job
from cxr_lightning.tasks.build import datamodule_for
from cxr_lightning.tasks.evaluate import predict_split
from cxr_lightning.tasks.explain import explain
from cxr_lightning.tasks.train import train

pytestmark = pytest.mark.slow
SCORES = [f"{kind}@{t}" for kind in ("iou", "iobb") for t in (0.1, 0.3, 0.5)]


@pytest.fixture(scope="module")
def tiny_run(tiny_demo, tmp_path_factory) -> Path:
    """One epoch of backbone=tiny with the default callbacks (CamGridCallback included)."""
    out = tmp_path_factory.mktemp("explain_run")
    train(compose_config(tiny_overrides(tiny_demo, out) + ["head=fusion", "test_after_fit=false"]))
    return out


def _explain(*overrides: str) -> dict:
    return explain(compose_config(list(overrides), config_name="explain"))


@pytest.fixture(scope="module")
def split_job(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain_split")
    metrics = _explain(f"run_dir={tiny_run}", "split=test", "n=3", "top_k=2", f"output_dir={out}")
    return out, metrics


def _events(folder: Path) -> list[EventAccumulator]:
    accumulators = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def _image_tags(folder: Path) -> set[str]:
    return {tag for acc in _events(folder) for tag in acc.Tags()["images"]}


# ---------------------------------------------------------------------------------------------
def test_split_job_writes_one_overlay_per_image_and_top_finding(split_job, tiny_run):
    out, metrics = split_job
    cams = pd.read_csv(out / "cams.csv")
    assert len(cams) == 3 * 2 == metrics["n_cams"] and cams["image"].nunique() == 3 == metrics["n_images"]
    pngs = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert pngs == sorted(Path(p).name for p in cams["overlay"])
    for rel in cams["overlay"]:
        assert Image.open(out / rel).size[0] >= 256  # upscaled so the label is legible

    # Probabilities and the top-2 findings agree with an independent pass over the test split.
    model = load_model(metrics["checkpoint"])
    probs, table = predict_split(model, datamodule_for(model), "test")
    rows = table.reset_index().set_index("Image Index").loc[cams["image"], "index"].to_numpy()
    classes = [model.label_names.index(f) for f in cams["finding"]]
    np.testing.assert_allclose(cams["probability"], probs[rows, classes], atol=1e-5)
    for image, group in cams.groupby("image", sort=False):
        row = table.index[table["Image Index"] == image][0]
        top2 = [model.label_names[c] for c in np.argsort(-probs[row])[:2]]
        assert group["finding"].tolist() == top2


def test_split_job_logs_the_grid_to_tensorboard(split_job):
    out, _ = split_job
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "cam_grid" in _image_tags(out / "tensorboard")


def test_localization_covers_every_boxed_test_image(split_job, tiny_demo):
    out, metrics = split_job
    scores = pd.read_csv(out / "localization.csv", index_col="finding")
    # Independently: the boxes of the official test images.
    boxes = read_bbox_table(tiny_demo / "BBox_List_2017.csv")
    test_names = set((tiny_demo / "test_list.txt").read_text().split())
    boxes = boxes[boxes["Image Index"].isin(test_names)]
    expected = boxes["Finding Label"].value_counts()
    assert set(scores.index) == set(expected.index) | {"All"}
    assert scores.loc[expected.index, "n_boxes"].to_dict() == expected.to_dict()
    assert scores.loc["All", "n_boxes"] == len(boxes) == metrics["localization.n_boxes"]
    assert metrics["localization.n_images"] == boxes["Image Index"].nunique()
    assert metrics["localization.n_pairs"] == len(boxes.drop_duplicates(["Image Index", "Finding Label"]))

    columns = ["pointing_game", *SCORES]
    for col in columns + [f"random_{c}" for c in columns]:
        assert scores[col].between(0, 1).all(), col
        assert metrics[f"localization.{col}"] == pytest.approx(scores.loc["All", col])
    # Accuracy can only fall as the overlap threshold rises.
    for kind in ("iou", "iobb"):
        assert (scores[f"{kind}@0.1"] >= scores[f"{kind}@0.3"]).all()
        assert (scores[f"{kind}@0.3"] >= scores[f"{kind}@0.5"]).all()


def test_metrics_json_counts_uninformative_cams(split_job):
    out, metrics = split_job
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics
    cams = pd.read_csv(out / "cams.csv")
    assert written["cams.zero_gradient"] == int(cams["zero_gradient"].sum())
    assert written["cams.empty"] == int(cams["empty"].sum())
    for key in ("localization.zero_gradient", "localization.empty"):
        assert isinstance(written[key], int) and written[key] >= 0
    assert written["method"] == "gradcam" and written["cam_layer"] == "layer4"


def test_named_images_and_findings(tiny_run, tiny_demo, tmp_path):
    in_data = sorted((tiny_demo / "test_list.txt").read_text().split())[0]
    outside = tmp_path / "scan.png"
    shutil.copy(next(tiny_demo.rglob(in_data)), outside)
    out = tmp_path / "named"
    with pytest.warns(UnknownMetadataWarning, match="scan.png"):
        metrics = _explain(
            f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}",
            f"images=[{in_data},{outside}]",
            "findings=[Effusion,Mass]",
            f"output_dir={out}",
        )
    cams = pd.read_csv(out / "cams.csv")
    assert cams["image"].tolist() == [in_data, in_data, "scan.png", "scan.png"]
    assert cams["finding"].tolist() == ["Effusion", "Mass"] * 2
    assert len(list((out / "overlays").glob("*.png"))) == 4 == metrics["n_cams"]
    assert metrics["split"] is None


def test_zero_gradient_is_counted_warned_and_marked(tiny_run, tmp_path, monkeypatch):
    def detached_cam_layer(path, map_location="cpu", trust=False):
        model = load_model(path, map_location, trust=trust)
        # Nothing downstream of the CAM layer can send a gradient back to it: the seed's failure.
        model.cam_layer.register_forward_hook(lambda module, args, output: output.detach())
        return model

    monkeypatch.setattr(explain_job, "load_model", detached_cam_layer)
    out = tmp_path / "dead"
    with pytest.warns(CamWarning, match="NO GRADIENT"):
        metrics = _explain(f"run_dir={tiny_run}", "split=val", "n=2", "top_k=1", f"output_dir={out}")
    assert metrics["cams.zero_gradient"] == 2
    assert metrics["localization.zero_gradient"] == metrics["localization.n_pairs"] > 0
    cams = pd.read_csv(out / "cams.csv")
    assert cams["zero_gradient"].all()
    assert cams["title"].str.startswith(f"{NO_GRADIENT}: ").all()  # what the overlay's banner says
    assert json.loads((out / "metrics.json").read_text())["cams.zero_gradient"] == 2
    # A blank CAM never scores: no pointing-game hit.
    assert metrics["localization.pointing_game"] == 0.0


def test_bad_options_are_config_errors(tiny_run, tmp_path):
    base = [f"run_dir={tiny_run}", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="either images"):
        _explain(*base, "images=[a.png]", "split=test")
    with pytest.raises(ConfigError, match="Nonsense"):
        _explain(*base, "findings=[Effusion,Nonsense]")
    with pytest.raises(ConfigError, match="method='gradcam3'"):
        _explain(*base, "method=gradcam3")
    with pytest.raises(ConfigError, match="split='holdout'"):
        _explain(*base, "split=holdout")
    with pytest.raises(ConfigError, match="ckpt_path"):
        _explain(f"output_dir={tmp_path}")
    with pytest.raises(DataError, match="no_such_scan.png"):
        _explain(*base, "images=[no_such_scan.png]")


def test_metadata_only_checkpoint_is_a_config_error(tiny_demo, tmp_path):
    run = tmp_path / "meta_only"
    # The default callbacks (CamGridCallback too) must cope with a model that never sees the image.
    train(compose_config(tiny_overrides(tiny_demo, run) + ["head=metadata_only", "test_after_fit=false"]))
    assert "cam_grid" not in _image_tags(run / "tensorboard")
    with pytest.raises(ConfigError, match="metadata_only"):
        _explain(f"run_dir={run}", "n=1")


def test_callback_logs_a_cam_grid_during_the_fit(tiny_run):
    events = _events(tiny_run / "tensorboard")
    assert "cam_grid" in {tag for acc in events for tag in acc.Tags()["images"]}
    zero = [s.value for acc in events if "cam_grid/zero_gradient" in acc.Tags()["scalars"]
            for s in acc.Scalars("cam_grid/zero_gradient")]
    assert zero == [0.0]


def test_module_entry_point_writes_into_the_run_dir(tiny_run, monkeypatch):
    """The Hydra main of ``python -m cxr_lightning.explain run_dir=...`` (in-process: no second
    torch import): Hydra's own files and the outputs both land in <run>/explain."""
    monkeypatch.chdir(tiny_run)
    monkeypatch.setenv("CXR_ROOT", str(tiny_run))
    monkeypatch.setattr(
        sys, "argv", ["explain", f"run_dir={tiny_run}", "n=1", "top_k=1", "localization=false", "device=cpu"]
    )
    runpy.run_module("cxr_lightning.explain", run_name="__main__")
    out = tiny_run / "explain"
    assert (out / "metrics.json").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert (out / "explain.log").is_file()
    assert len(list((out / "overlays").glob("*.png"))) == 1
    assert not (out / "localization.csv").exists()
    assert not (tiny_run / "outputs").exists()  # no stray Hydra run dir
    # Hydra left no global state behind that would stop later tests composing configs.
    assert compose_config([f"run_dir={tiny_run}"], config_name="explain").run_dir == str(tiny_run)
