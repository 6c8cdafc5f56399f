"""End-to-end: a tiny fit writes everything a run promises, and resumes where it stopped."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import compose_config, tiny_overrides

from cxr_lightning.checkpoints import load_model
from cxr_lightning.labels import ALL_LABELS
from cxr_lightning.tasks.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_epoch_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(tiny_overrides(tiny_demo, out) + ["head=fusion_residual"])
    metrics = train(cfg)
    return out, metrics, cfg


def test_fit_writes_checkpoint_tensorboard_history_and_metrics(one_epoch_run):
    out, metrics, _ = one_epoch_run
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert metrics["best_checkpoint"] and (out / "checkpoints").glob("epoch*.ckpt")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0]
    assert {"train/loss", "val/loss", "val/auroc_mean"} <= set(history.columns)

    written = json.loads((out / "metrics.json").read_text())
    for key in ("test.auroc_mean", "test.f1_macro", "test.loss", "best_checkpoint", "label_table"):
        assert key in written, key
    for name in ALL_LABELS:
        assert f"test.auroc.{name}" in written
    assert written["label_table"] == "Data_Entry_2017_v2020.csv"
    assert (out / "val_patients.txt").read_text().strip()
    # Throughput counts the images actually trained on in this invocation.
    n_train = written["n_images"]["train"]
    assert written["train_images"] == n_train
    assert n_train / written["train_images_per_second"] < written["fit_seconds"]
    assert written["epochs"] == written["epochs_this_invocation"] == 1


def test_checkpoint_alone_rebuilds_the_model(one_epoch_run, tiny_demo):
    out, metrics, _ = one_epoch_run
    model = load_model(metrics["best_checkpoint"])
    hp = model.hparams
    assert hp.label_names == list(ALL_LABELS)
    assert hp.image_size == 64 and hp.meta_names[0] == "age"
    assert hp.config["backbone"]["name"] == "test_resnet"
    x = torch.zeros(2, 1, 64, 64)
    meta = torch.zeros(2, len(hp.meta_names))
    assert model(x, meta).shape == (2, len(ALL_LABELS))
    # The loss weights travel with the checkpoint too.
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=False)
    assert any("weight" in k for k in ckpt["state_dict"] if k.startswith("criterion."))


def test_resume_from_last_checkpoint_continues_at_next_epoch(one_epoch_run):
    out, _, _ = one_epoch_run
    cfg = compose_config(
        tiny_overrides(out.parent / "unused", out)
        + ["head=fusion_residual", "trainer.max_epochs=2", "ckpt_path=auto"]
    )
    # Same data root as the first run.
    first_cfg = one_epoch_run[2]
    cfg.data.root = first_cfg.data.root
    metrics = train(cfg)
    assert metrics["epochs"] == 2 and metrics["epochs_this_invocation"] == 1
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
