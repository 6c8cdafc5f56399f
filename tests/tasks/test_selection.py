"""One selection metric: selection.metric drives the best checkpoint, early stopping, the value a
sweeper optimises and compare's loss-scale warning."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
from helpers import compose_config, tiny_overrides
from omegaconf import OmegaConf

from cxr_lightning.cli import _selection_value
from cxr_lightning.errors import ConfigError
from cxr_lightning.tasks import compare
from cxr_lightning.tasks.build import build_callbacks
from cxr_lightning.tasks.validate import check_selection


@pytest.mark.parametrize("metric, mode", [("val/loss", "min"), ("val/auroc_mean", "max")])
def test_selection_metric_sets_monitor_and_mode_of_checkpoint_and_early_stopping(tmp_path, metric, mode):
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"selection.metric={metric}", "callbacks.progress_bar=null"])
    callbacks = build_callbacks(cfg)
    best = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor]
    stopping = [c for c in callbacks if isinstance(c, pl.callbacks.EarlyStopping)]
    assert len(best) == 1 and len(stopping) == 1
    assert (best[0].monitor, best[0].mode) == (metric, mode)
    assert (stopping[0].monitor, stopping[0].mode) == (metric, mode)
    assert metric in best[0].filename


def test_an_unknown_selection_metric_is_refused():
    with pytest.raises(ConfigError, match=r"selection.metric='val/accuracy'"):
        check_selection(OmegaConf.create({"selection": {"metric": "val/accuracy"}}))


def test_the_sweeper_gets_the_best_value_of_the_selection_metric():
    metrics = {"selection": {"metric": "val/auroc_mean", "mode": "max", "best": 0.71}, "best_val_loss": 0.3}
    assert _selection_value(metrics) == 0.71


def test_compare_warns_when_runs_of_different_losses_meet(tmp_path):
    for i, loss in enumerate(["weighted_bce", "asl"]):
        run = tmp_path / f"{i}_{loss}"
        run.mkdir()
        cfg = {
            "seed": 0,
            "backbone": {"name": "tiny"},
            "head": {"name": "baseline"},
            "loss": {"name": loss},
            "data": {"fold": None},
        }
        OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
        metrics = {
            "auroc_mean": 0.7 + i / 10,
            "best_val_loss": [1.475, 0.21][i],
            "selection": {"metric": "val/loss", "mode": "min", "best": 1.0},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    text = compare.write_comparison(tmp_path, by="loss").markdown.read_text()
    assert "different losses (asl, weighted_bce)" in text and "chosen by val/loss" in text


@pytest.mark.slow
def test_a_fit_selects_and_reports_by_the_selection_metric(tiny_demo, tmp_path):
    from cxr_lightning.tasks.train import train

    metrics = train(
        compose_config(
            tiny_overrides(tiny_demo, tmp_path) + ["selection.metric=val/auroc_mean", "test_after_fit=false"]
        )
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    history = pd.read_csv(tmp_path / "history.csv")
    assert written["selection"]["metric"] == "val/auroc_mean" and written["selection"]["mode"] == "max"
    assert written["selection"]["best"] == pytest.approx(history["val/auroc_mean"].max(), abs=1e-6)
    assert _selection_value(metrics) == written["selection"]["best"]
    assert Path(written["best_checkpoint"]).name.startswith("epoch000-score")
