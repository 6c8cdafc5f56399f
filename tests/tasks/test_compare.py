"""The sweep comparison: statistics per group, failed runs listed, the CLI, and a real multirun
whose Hydra callback writes the report by itself."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, tiny_overrides
from omegaconf import OmegaConf

from cxr_lightning import cli
from cxr_lightning.errors import DataError
from cxr_lightning.tasks import compare

FINDINGS = ("Atelectasis", "Hernia")


def _write_run(
    run_dir: Path, backbone: str, head: str, seed: int, metrics: dict | None, history: list[float] | None
) -> None:
    run_dir.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "backbone": {"name": backbone},
        "head": {"name": head},
        "data": {"fold": None, "image_size": 64},
    }
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if history is not None:
        pd.DataFrame({"epoch": range(len(history)), "val/loss": history}).to_csv(run_dir / "history.csv", index=False)


@pytest.fixture
def fake_sweep(tmp_path) -> tuple[Path, pd.DataFrame]:
    """Two backbones x three seeds with random metrics, one run that crashed without a trace and one
    that failed before train.py wrote its config (only Hydra's unresolved copy, plus error.txt)."""
    rng = np.random.default_rng(0)
    records = []
    for b, backbone in enumerate(("resnet50", "densenet121")):
        for seed in (1, 2, 3):
            m = {
                "params": 1000 * (b + 1),
                "best_val_loss": rng.uniform(0.5, 1.0),
                "test.auroc_mean": rng.uniform(0.6, 0.9),
                "test.f1_macro": rng.uniform(0.1, 0.4),
                "test.auroc.Atelectasis": rng.uniform(0.5, 1.0),
                # No positives in one seed's test split: NaN, left out of that label's mean.
                "test.auroc.Hernia": float("nan") if seed == 2 else rng.uniform(0.5, 1.0),
                "epochs": int(rng.integers(1, 6)),
                "seconds_per_epoch": rng.uniform(1, 10),
                "train_images_per_second": rng.uniform(10, 100),
                "best_checkpoint": "/x.ckpt",
                "n_images": {"train": 10},
            }
            _write_run(
                tmp_path / f"{b}{seed}_{backbone}", backbone, "baseline", seed, m, [1.0, 0.9, m["best_val_loss"]]
            )
            records.append({"backbone": backbone, "seed": seed, **m})
    _write_run(tmp_path / "9_vgg19_crashed", "vgg19", "baseline", 1, None, [1.2])
    hydra_only = tmp_path / "10_inception"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / ".hydra" / "config.yaml").write_text(
        "seed: 4\nbackbone: {name: inception_v3}\nhead: {name: baseline}\n"
        "data: {image_size: '${backbone.input_size}', fold: null}\npaths: {output_dir: '${hydra:runtime.output_dir}'}\n"
    )
    (hydra_only / "error.txt").write_text("ConfigError: data.image_size=64 is below inception_v3's minimum\n")
    return tmp_path, pd.DataFrame(records)


def test_summary_has_mean_std_and_n_per_backbone(fake_sweep):
    sweep, truth = fake_sweep
    files = compare.write_comparison(sweep)
    table = pd.read_csv(files.csv).set_index("backbone")
    assert set(table.index) == {"resnet50", "densenet121", "vgg19", "inception_v3"}
    for backbone, runs in truth.groupby("backbone"):
        row = table.loc[backbone]
        assert row["n_runs"] == 3 and row["n_failed"] == 0 and row["seeds"] == "1,2,3"
        for metric in ("test.auroc_mean", "best_val_loss", "test.f1_macro", "seconds_per_epoch", "epochs",
                       "train_images_per_second", "test.auroc.Atelectasis"):
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(runs[metric]))
            assert row[f"{metric}_std"] == pytest.approx(np.std(runs[metric], ddof=1))
            assert row[f"{metric}_n"] == 3
        hernia = runs["test.auroc.Hernia"].dropna()
        assert row["test.auroc.Hernia_n"] == 2
        assert row["test.auroc.Hernia_mean"] == pytest.approx(hernia.mean())
        assert row["params_mean"] == runs["params"].iloc[0]
    # Best mean AUROC first.
    ranked = truth.groupby("backbone")["test.auroc_mean"].mean().sort_values(ascending=False).index.tolist()
    assert pd.read_csv(files.csv)["backbone"].tolist()[:2] == ranked


def test_failed_runs_are_listed_not_dropped(fake_sweep):
    sweep, _ = fake_sweep
    files = compare.write_comparison(sweep)
    table = pd.read_csv(files.csv).set_index("backbone")
    for backbone in ("vgg19", "inception_v3"):
        assert table.loc[backbone, "n_runs"] == 0 and table.loc[backbone, "n_failed"] == 1
        assert np.isnan(table.loc[backbone, "test.auroc_mean_mean"])
    report = files.markdown.read_text()
    assert "6 finished, 2 failed" in report
    crashed = next(line for line in report.splitlines() if "9_vgg19_crashed" in line)
    assert "| failed |" in crashed and "no metrics.json" in crashed
    hydra_only = next(line for line in report.splitlines() if "10_inception" in line)
    assert "ConfigError: data.image_size=64 is below inception_v3" in hydra_only
    assert files.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_page_is_self_contained_and_holds_the_tables_and_figure(fake_sweep):
    sweep, _ = fake_sweep
    files = compare.write_comparison(sweep)
    page = files.page.read_text()
    assert files.page == sweep / "comparison.html" and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", page) and "<link" not in page
    figure = base64.b64encode(files.figure.read_bytes()).decode()
    assert f'src="data:image/png;base64,{figure}"' in page
    assert "6 finished, 2 failed" in page and "Test AUROC per finding" in page
    crashed = page.split("9_vgg19_crashed", 1)[1].split("</tr>", 1)[0]
    assert "<td>failed</td>" in crashed and "no metrics.json" in crashed
    for backbone in ("vgg19", "inception_v3"):
        assert f"<td>{backbone}</td>" in page


def test_a_sweep_whose_runs_all_failed_still_gets_a_report(tmp_path):
    for i, backbone in enumerate(("resnet50", "vgg19")):
        _write_run(tmp_path / f"run{i}", backbone, "baseline", i, None, None)
    files = compare.write_comparison(tmp_path)
    table = pd.read_csv(files.csv)
    assert table["n_runs"].tolist() == [0, 0] and table["n_failed"].tolist() == [1, 1]
    assert "0 finished, 2 failed" in files.markdown.read_text()


def test_group_by_several_keys(tmp_path):
    for i, (backbone, head, auc) in enumerate(
        [
            ("resnet50", "baseline", 0.7),
            ("resnet50", "fusion", 0.8),
            ("resnet50", "fusion", 0.6),
            ("vgg19", "fusion", 0.5),
        ]
    ):
        _write_run(tmp_path / f"run{i}", backbone, head, i, {"test.auroc_mean": auc}, None)
    table = pd.read_csv(compare.write_comparison(tmp_path, by="backbone,head").csv).set_index(["backbone", "head"])
    assert set(table.index) == {("resnet50", "baseline"), ("resnet50", "fusion"), ("vgg19", "fusion")}
    fused = table.loc[("resnet50", "fusion")]
    assert fused["n_runs"] == 2
    assert fused["test.auroc_mean_mean"] == pytest.approx(0.7)
    assert fused["test.auroc_mean_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    # Any config key groups, e.g. the image size.
    by_size = pd.read_csv(compare.write_comparison(tmp_path, by=["data.image_size"]).csv)
    assert by_size["data.image_size"].tolist() == [64] and by_size["n_runs"].tolist() == [4]


def test_bad_input_is_named(tmp_path, fake_sweep):
    with pytest.raises(DataError, match="does-not-exist is not a directory"):
        compare.write_comparison(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no runs under .*empty"):
        compare.write_comparison(empty)
    sweep, _ = fake_sweep
    with pytest.raises(DataError, match="no run under .* has config key 'optimizer.lrr'"):
        compare.write_comparison(sweep, by="optimizer.lrr")
    with pytest.raises(DataError, match="name report columns"):
        compare.write_comparison(sweep, by="backbone,status")


def test_cli_writes_into_out(fake_sweep, tmp_path_factory, capsys):
    sweep, _ = fake_sweep
    out = tmp_path_factory.mktemp("report")
    files = cli.compare_command([str(sweep), "--by", "backbone", "--out", str(out)])
    assert files.csv.parent == out and all(p.is_file() for p in (files.csv, files.markdown, files.figure))
    assert not (sweep / "comparison.csv").exists()
    with pytest.raises(SystemExit) as exit_status:
        cli.compare_command([str(out / "missing")])
    assert exit_status.value.code == 2 and "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_multirun_writes_comparison_through_callback(tiny_demo, tmp_path):
    """A real sweep: two tiny backbones and one that cannot be built. The callback writes the report
    though the failed job makes Hydra skip on_multirun_end; its numbers are the runs' own."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_demo, tmp_path) if not o.startswith("paths.output_dir=")]
    cmd = [
        sys.executable, "-m", "cxr_lightning.train", "-m", *overrides,
        # resnet10t: a second small network with the ResNet layer names backbone=tiny's CAM layer uses
        # (validation refuses a backbone without it)
        f"hydra.sweep.dir={sweep}", "backbone.name=test_resnet,not_a_timm_model,resnet10t",
        "callbacks.cam_grid=null",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    # Hydra re-raises the failed job's error after running the others.
    assert done.returncode != 0, done.stdout[-3000:]
    assert "not a timm model" in done.stderr
    # The failed job's framework error is one line, not a traceback.
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "not a timm model" in line] == [
        next(line for line in done.stderr.splitlines()
             if line.startswith("error: ConfigError: backbone.name='not_a_timm_model'"))
    ]

    table = pd.read_csv(sweep / "comparison.csv").set_index("backbone")
    assert set(table.index) == {"test_resnet", "resnet10t", "not_a_timm_model"}
    assert table.loc["not_a_timm_model", "n_failed"] == 1
    for backbone in ("test_resnet", "resnet10t"):
        [metrics_path] = [p for p in sweep.glob("*/metrics.json") if f"backbone.name={backbone}" in p.parent.name]
        metrics = json.loads(metrics_path.read_text())
        assert metrics["backbone"] == backbone
        row = table.loc[backbone]
        assert row["n_runs"] == 1
        for key in ("test.auroc_mean", "test.f1_macro", "best_val_loss", "epochs", "params", "seconds_per_epoch",
                    "train_images_per_second", "test.auroc.Atelectasis"):
            assert row[f"{key}_mean"] == pytest.approx(metrics[key], rel=1e-9), key
    report = (sweep / "comparison.md").read_text()
    assert "2 finished, 1 failed" in report
    assert "ConfigError: backbone.name='not_a_timm_model' is not a timm model" in report
    assert (sweep / "comparison.png").stat().st_size > 0


def test_evaluation_and_explain_metrics_of_a_run_join_its_row(tmp_path):
    """A run's evaluate (CIs) and explain (localisation) results are read from its subfolders, and
    their own Hydra folders are not taken for runs."""
    for seed, (auroc, pointing, boxes) in enumerate([(0.7, 0.4, 12), (0.8, 0.6, 12)]):
        run = tmp_path / f"{seed}_run"
        _write_run(run, "resnet50", "baseline", seed, {"test.auroc_mean": auroc, "boxes_trained_on": boxes}, None)
        for job, metrics in (
            ("evaluation", {"auroc_mean": auroc, "auroc_mean_lower": auroc - 0.1, "auroc_mean_upper": auroc + 0.1}),
            ("explain", {"localization.pointing_game": pointing, "localization.random_pointing_game": 0.1}),
        ):
            (run / job / ".hydra").mkdir(parents=True)
            OmegaConf.save(OmegaConf.create({"task_name": job}), run / job / ".hydra" / "config.yaml")
            (run / job / "metrics.json").write_text(json.dumps(metrics))
    runs = compare.read_runs(tmp_path)
    assert sorted(runs["run"]) == ["0_run", "1_run"]
    np.testing.assert_allclose(runs.sort_values("run")["evaluation.auroc_mean_lower"], [0.6, 0.7])
    summary = compare.summarize(runs)
    assert summary.loc[0, "explain.localization.pointing_game_mean"] == pytest.approx(0.5)
    assert summary.loc[0, "explain.localization.random_pointing_game_mean"] == pytest.approx(0.1)
    assert summary.loc[0, "boxes_trained_on_mean"] == 12


def test_box_protocol_folds_are_aggregated_per_recipe(tmp_path):
    """NIH's boxed-image protocol runs one training per fold (data.boxes.fold); compare groups them."""
    for fold, (pointing, empty) in enumerate([(0.3, 0), (0.5, 2), (0.4, 1)]):
        run = tmp_path / f"fold{fold}"
        run.mkdir()
        cfg = {"seed": 1, "backbone": {"name": "resnet18"}, "loss": {"name": "bce", "box_weight": 1.0},
               "data": {"fold": None, "boxes": {"folds": 3, "fold": fold}}}
        OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
        (run / "metrics.json").write_text(json.dumps({"test.auroc_mean": 0.7, "boxes_trained_on": 10 + fold}))
        (run / "explain").mkdir()
        (run / "explain" / "metrics.json").write_text(json.dumps(
            {"localization.pointing_game": pointing, "localization.empty": empty, "localization.n_pairs": 20}))
    runs = compare.read_runs(tmp_path, by=["loss.box_weight"])
    assert sorted(runs["fold"]) == [0.0, 1.0, 2.0]
    summary = compare.summarize(runs, by=["loss.box_weight"])
    assert len(summary) == 1 and summary.loc[0, "n_runs"] == 3
    assert summary.loc[0, "explain.localization.pointing_game_mean"] == pytest.approx(0.4)
    assert summary.loc[0, "explain.localization.empty_mean"] == pytest.approx(1.0)
    assert summary.loc[0, "boxes_trained_on_mean"] == pytest.approx(11.0)
