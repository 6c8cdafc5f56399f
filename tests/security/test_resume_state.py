"""Attack 1: a checkpoint's callback state names files outside its run; ``train resume=`` must not
delete them (Lightning's ModelCheckpoint restores the paths and later removes the "k-th best")."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers import compose_config, tiny_overrides

from cxr_lightning import checkpoints
from security.hostile import edited_checkpoint

pytestmark = pytest.mark.slow


def aim_at(ckpt, run, sentinel):
    escape = f"{run}/checkpoints/" + "../" * 2 + sentinel.folder.name
    for key, state in ckpt["callbacks"].items():
        if key.startswith("ModelCheckpoint"):
            state.pop("dirpath")
            state["best_k_models"] = {f"{escape}/victim.txt": torch.tensor(float("inf"))}
            state["kth_best_model_path"] = f"{escape}/victim.txt"
            state["kth_value"] = torch.tensor(float("inf"))
            state["best_model_path"] = f"{escape}/notes.md"
            state["last_model_path"] = f"{escape}/other_project.ckpt"


def test_resume_from_a_state_aimed_outside_the_run_deletes_nothing(run_copy, sentinel, tiny_demo, tmp_path, caplog):
    from cxr_lightning.tasks.train import train

    last = run_copy / "checkpoints" / "last.ckpt"
    edited_checkpoint(last, last, lambda c: aim_at(c, run_copy, sentinel))
    (run_copy / "metrics.json").unlink()
    cfg = compose_config(tiny_overrides(tiny_demo, tmp_path / "invocation")
                         + [f"resume={run_copy}", "trainer.max_epochs=2", "test_after_fit=false"])
    with caplog.at_level(logging.INFO, logger="cxr_lightning.checkpoints"):
        metrics = train(cfg)
    sentinel.assert_untouched()
    assert "dropping the ModelCheckpoint state" in caplog.text
    # The run went on in its own folder, and its best checkpoint is one of its own files.
    assert metrics["best_checkpoint"].startswith(str(run_copy / "checkpoints"))
    assert (run_copy / "metrics.json").is_file()


def test_a_genuine_state_is_rebuilt_from_the_runs_own_folder(trained_run, tmp_path):
    # A run copied elsewhere (another machine): its recorded paths point at the old place; each is
    # rebuilt from the file name inside the copy, so the best checkpoint is still tracked.
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained_run[0], moved)
    ckpt = checkpoints.read_checkpoint(moved / "checkpoints" / "last.ckpt")
    checkpoints.rebuild_callback_states(ckpt, moved / "checkpoints", "last.ckpt")
    monitored = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"])
    best = moved / "checkpoints" / trained_run[1].name
    assert monitored["best_model_path"] == str(best)
    assert monitored["kth_best_model_path"] == str(best)
    assert list(monitored["best_k_models"]) == [str(best)]
    assert monitored["last_model_path"] == str(moved / "checkpoints" / "last.ckpt")
    assert "dirpath" not in monitored
