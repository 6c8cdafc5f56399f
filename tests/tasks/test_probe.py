"""The linear probe: its logistic regressions, the nested patient subsets, the feature cache, and
the run directory that compare and report.html read."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_config
from safetensors.torch import save_file

from cxr_lightning.errors import ConfigError
from cxr_lightning.evaluation.linear_probe import fit_probe, nested_patient_subsets
from cxr_lightning.evaluation.statistics import bootstrap_ci


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def separable(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first two coordinates decide two labels with a margin; three noise features."""
    x = rng.normal(size=(n, 5))
    x[:, :2] += np.sign(x[:, :2]) * 0.5  # no point within 0.5 of either boundary
    return x, (x[:, :2] > 0).astype(np.float64)


def test_linearly_separable_features_give_auroc_one():
    rng = np.random.default_rng(0)
    (xtr, ytr), (xva, yva), (xte, yte) = (separable(n, rng) for n in (120, 60, 80))
    ytr[3, 1] = np.nan  # an image that does not count for label b is left out of its fit
    fit = fit_probe(xtr, ytr, xva, yva, ["a", "b"], grid=[0.01, 1.0, 100.0])
    assert fit.fitted == [True, True] and set(fit.C) <= {0.01, 1.0, 100.0}
    assert fit.n_train == [120, 119]
    probs = fit.predict(xte)
    patients = np.arange(len(xte)) // 2
    ci = bootstrap_ci(yte, probs, patients, n_boot=50, label_names=["a", "b"])
    assert ci.loc["a", "estimate"] == 1.0 and ci.loc["b", "estimate"] == 1.0 and ci.loc["mean", "lower"] == 1.0
    # Each label's probe reads its own coordinate: the other label's weight is far smaller.
    assert abs(fit.coef[0, 0]) > 5 * abs(fit.coef[0, 1]) and abs(fit.coef[1, 1]) > 5 * abs(fit.coef[1, 0])


def test_a_label_without_training_positives_predicts_its_prevalence():
    rng = np.random.default_rng(1)
    x, y = separable(50, rng)
    y[:, 1] = 0.0
    fit = fit_probe(x, y, x, y, ["a", "b"], grid=[1.0])
    assert fit.fitted == [True, False] and math.isnan(fit.C[1])
    probs = fit.predict(x)
    assert np.ptp(probs[:, 1]) == 0 and probs[0, 1] < 1e-5


def test_label_fraction_subsets_are_by_patient_nested_and_seeded():
    rng = np.random.default_rng(2)
    patients = np.repeat([f"p{i:03d}" for i in range(300)], rng.integers(1, 5, size=300))
    rng.shuffle(patients)
    masks = nested_patient_subsets(patients, [1.0, 0.01, 0.1], seed=7)
    assert list(masks) == [0.01, 0.1, 1.0]
    chosen = {f: set(patients[m]) for f, m in masks.items()}
    assert [len(chosen[f]) for f in masks] == [3, 30, 300]
    assert chosen[0.01] < chosen[0.1] < chosen[1.0]
    for fraction, mask in masks.items():  # whole patients: all of a chosen patient's images, none of the others'
        assert mask.sum() == int(np.isin(patients, list(chosen[fraction])).sum())
    again = nested_patient_subsets(patients, [0.1], seed=7)[0.1]
    other = nested_patient_subsets(patients, [0.1], seed=8)[0.1]
    assert (again == masks[0.1]).all() and not (other == masks[0.1]).all()
    with pytest.raises(ConfigError, match=r"each must lie in \(0, 1\]"):
        nested_patient_subsets(patients, [0.0, 0.5], seed=0)


# ------------------------------------------------------------------------------------------------
# The command
def probe_config(root: Path, out: Path, cache: Path, *extra: str):
    backbone = [] if any(e.startswith("backbone=") for e in extra) else ["backbone=tiny"]
    return compose_config([
        "data=nih", f"data.root={root}", "data.image_size=64", "data.batch_size=32", "data.num_workers=0",
        *backbone, f"paths.output_dir={out}", f"paths.cache_dir={cache}", "probe.n_boot=50",
        "probe.C=[0.01,1.0]", *extra,
    ], config_name="probe")


def write_tiny_weights(path: Path, seed: int) -> Path:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_probe_run_directory_cache_and_compare(tiny_demo, tmp_path):
    from cxr_lightning.tasks.compare import write_comparison
    from cxr_lightning.tasks.probe import probe

    cache = tmp_path / "cache"
    first = probe(probe_config(tiny_demo, tmp_path / "runs" / "a", cache, "probe.train_fractions=[0.5,1.0]"))
    run = tmp_path / "runs" / "a"
    assert {v["cache"] for v in first["features"].values()} == {"miss"}
    curve = pd.read_csv(run / "label_efficiency.csv")
    assert curve["fraction"].tolist() == [0.5, 1.0]
    n_train_patients = first["n_patients"]["train"]
    assert curve["n_patients"].tolist() == [math.ceil(0.5 * n_train_patients), n_train_patients]
    assert curve["n_images"].iloc[-1] == first["n_images"]["train"]
    # metrics.json is a run's: per-label and mean test AUROC with its interval, the selection block.
    assert first["selection"]["metric"] == "val/auroc_mean" and first["selection"]["mode"] == "max"
    assert first["test.auroc_mean_lower"] <= first["test.auroc_mean"] <= first["test.auroc_mean_upper"]
    per_label = pd.read_csv(run / "probe_per_label.csv")
    full = per_label[per_label["fraction"] == 1.0].set_index("label")
    assert first["test.auroc_mean"] == pytest.approx(np.nanmean(full["test_auroc"]))
    predictions = pd.read_csv(run / "probe_predictions.csv")
    assert len(predictions) == first["n_images"]["test"]
    page = (run / "report.html").read_text()
    assert "Label efficiency" in page and "data:image/png;base64," in page and "demo" in page
    assert (run / "label_efficiency.png").stat().st_size > 1000

    # The same inputs again: every split's features come from the cache, with the same results.
    second = probe(probe_config(tiny_demo, tmp_path / "runs" / "b", cache, "probe.train_fractions=[0.5,1.0]"))
    assert {v["cache"] for v in second["features"].values()} == {"hit"}
    assert second["test.auroc_mean"] == first["test.auroc_mean"]
    assert second["params"] == first["params"] > 0  # the backbone's size comes from the cache entry

    # compare puts probes in its table like any run.
    written = write_comparison(tmp_path / "runs", "backbone,head")
    table = pd.read_csv(written.csv)
    assert "linear_probe" in table.to_string() and any("AUROC" in c or "auroc" in c for c in table.columns)


@pytest.mark.slow
def test_feature_cache_is_invalidated_when_the_weights_change(tiny_demo, tmp_path):
    from cxr_lightning.tasks.probe import probe

    cache, weights = tmp_path / "cache", write_tiny_weights(tmp_path / "w.safetensors", seed=0)
    run = probe_config(tiny_demo, tmp_path / "a", cache, f"backbone.weights={weights}", "probe.n_boot=10")
    assert {v["cache"] for v in probe(run)["features"].values()} == {"miss"}
    assert {v["cache"] for v in probe(run)["features"].values()} == {"hit"}
    write_tiny_weights(weights, seed=1)  # same file name, other weights
    changed = probe(run)
    assert {v["cache"] for v in changed["features"].values()} == {"miss"}
    # A cache file that does not hold what its key promises is not trusted: extracted again.
    entry = Path(changed["features"]["val"]["file"])
    entry.write_bytes(b"not a safetensors file")
    again = probe(run)["features"]
    assert again["val"]["cache"] == "miss" and again["train"]["cache"] == "hit"
    assert json.loads(entry.read_bytes()[8:8 + int.from_bytes(entry.read_bytes()[:8], "little")])["__metadata__"]


def test_probe_comparison_sweeps_the_six_and_routes_foundation_weights(tiny_demo):
    from cxr_lightning.models.backbones import BACKBONE_NAMES

    with __import__("hydra").initialize_config_module(config_module="cxr_lightning.conf", version_base="1.3"):
        from hydra import compose

        sweep = compose("probe", overrides=["experiment=probe_comparison", "data.root=/nih"], return_hydra_config=True)
    assert sorted(v.strip() for v in str(sweep.hydra.sweeper.params.backbone).split(",")) == sorted(BACKBONE_NAMES)
    assert list(sweep.probe.train_fractions) == [0.01, 0.1, 1.0] and sweep.data.source == "nih"
    one = compose_config(["experiment=probe_comparison", f"data.root={tiny_demo}", "backbone=rad_dino",
                          "foundation_weights.rad_dino=/w/rad-dino"], config_name="probe")
    assert one.backbone.weights == "/w/rad-dino" and one.data.image_size == 518
    demo = compose_config(["experiment=probe_comparison_demo", "backbone=inception_v3"], config_name="probe")
    assert demo.data.source == "demo" and demo.data.image_size >= demo.backbone.min_input_size


@pytest.mark.slow
def test_probe_command_line_refuses_a_foundation_backbone_without_weights(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "cxr_lightning.probe", "backbone=rad_dino", f"paths.root_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ConfigError: backbone=rad_dino needs its weights") and "microsoft/rad-dino" in line


@pytest.mark.slow
def test_probe_of_a_foundation_backbone_folder(tiny_demo, tmp_path):
    pytest.importorskip("transformers")
    from cxr_lightning.tasks.probe import probe
    from tests.models.test_foundation_backbones import DINO_SIZE, write_dinov2

    folder = tmp_path / "rad-dino"
    write_dinov2(folder)
    cfg = probe_config(tiny_demo, tmp_path / "run", tmp_path / "cache", "backbone=rad_dino",
                       f"+foundation_weights.rad_dino={folder}", f"data.image_size={DINO_SIZE}", "probe.n_boot=10",
                       "probe.metadata=true")
    metrics = probe(cfg)
    assert metrics["backbone"] == "rad_dino" and {v["cache"] for v in metrics["features"].values()} == {"miss"}
    # 32 class-token features, then the metadata inputs.
    assert metrics["probe"]["n_features"] == 32 + len(metrics["meta_names"]) > 32
    # Every file of the folder is part of the key: a changed preprocessor_config.json is another key.
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    assert {v["cache"] for v in probe(cfg)["features"].values()} == {"miss"}
