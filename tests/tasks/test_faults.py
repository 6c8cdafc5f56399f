"""Fault tolerance: atomic writes, checkpoints on SIGTERM, resuming killed runs, stopping on NaN."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import TESTS, compose_config, tiny_overrides
from omegaconf import OmegaConf

from cxr_lightning import checkpoints, cli, files
from cxr_lightning.errors import CheckpointError, ConfigError, TrainingError
from cxr_lightning.models import divergence
from cxr_lightning.tasks import resume as resuming
from cxr_lightning.tasks.train import train

SIGNAL_ENV = "CXR_TEST_SIGNAL_AT"


class SignalAtStep(pl.Callback):
    """Loaded by the training subprocesses below: at global step S it sends signal N to its own
    process, as ``kill -N`` would (``CXR_TEST_SIGNAL_AT=S:N``; unset: does nothing). The step comes
    from the environment so that every invocation has the same config, as a rerun of one command does."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if SIGNAL_ENV not in os.environ:
            return
        step, signum = map(int, os.environ[SIGNAL_ENV].split(":"))
        if trainer.global_step == step:
            os.kill(os.getpid(), signum)


class PoisonMetaAtStep(pl.Callback):
    """Puts a NaN into one image's metadata at global step ``step`` and records that image's name."""

    poisoned: str | None = None
    checkpoint_io: type | None = None

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        PoisonMetaAtStep.checkpoint_io = type(trainer.strategy.checkpoint_io)
        if trainer.global_step == self.step:
            batch["meta"][1, 0] = float("nan")
            table = trainer.datamodule.split_table("train")
            PoisonMetaAtStep.poisoned = table["Image Index"].iloc[int(batch["index"][1])]


# --- atomic writes ---------------------------------------------------------------------------------


def test_interrupted_write_leaves_the_previous_file_intact(tmp_path):
    path = files.write_json(tmp_path / "metrics.json", {"epochs": 3})
    with pytest.raises(RuntimeError, match="power cut"):
        with files.atomic_path(path) as tmp:
            tmp.write_text('{"epochs": ')  # half a file ...
            raise RuntimeError("power cut")  # ... then the crash
    assert json.loads(path.read_text()) == {"epochs": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_checkpoint_io_writes_beside_the_target_and_renames(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoints.AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "global_step": 7}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 7
    [(src, dst)] = renames
    assert dst == path and src.parent == path.parent and src != path  # same folder: an atomic rename


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    checkpoint_io = checkpoints.AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def crash_mid_write(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    kept = torch.load(path, weights_only=False)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_refuses_non_finite_weights(tmp_path):
    path = tmp_path / "last.ckpt"
    checkpoint_io = checkpoints.AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"state_dict": {"head.w": torch.ones(2)}, "global_step": 1}, path)
    diverged = {"backbone.w": torch.ones(2), "head.w": torch.tensor([1.0, float("inf")]), "steps": torch.tensor([3])}
    with pytest.raises(TrainingError, match=rf"Not writing checkpoint {path}: .*NaN/inf values \(head.w\).*are kept"):
        checkpoint_io.save_checkpoint({"state_dict": diverged, "global_step": 2}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert checkpoints.non_finite_weights({"a": torch.tensor([float("nan")]), "b": torch.ones(1)}) == ["a"]


# --- resume: which run and which checkpoint ----------------------------------------------------------


def write_run(run: Path, cfg, *, last: bool = True, finished: bool = False, age_s: float = 0.0) -> Path:
    """A run directory as train() leaves it: config.yaml resolved for that directory, last.ckpt, metrics.json."""
    saved = copy.deepcopy(cfg)
    saved.paths.output_dir = str(run)
    files.write_text(run / "config.yaml", OmegaConf.to_yaml(saved, resolve=True))
    if last:
        ckpt = run / "checkpoints" / "last.ckpt"
        files.write_text(ckpt, "checkpoint")
        mtime = ckpt.stat().st_mtime - age_s
        os.utime(ckpt, (mtime, mtime))
    if finished:
        files.write_json(run / "metrics.json", {"epochs": 3})
    return run


def run_config(out: Path, *overrides: str):
    return compose_config(tiny_overrides(out.parent / "data", out) + list(overrides))


def test_resume_auto_continues_the_latest_interrupted_run_with_the_same_config(tmp_path):
    outputs = tmp_path / "outputs" / "train"
    cfg = run_config(outputs / "now", "resume=auto")
    write_run(outputs / "older", cfg, age_s=60)
    latest = write_run(outputs / "latest", cfg, age_s=30)
    write_run(outputs / "finished", cfg, finished=True)
    write_run(outputs / "no_checkpoint", cfg, last=False)
    write_run(outputs / "other_config", run_config(outputs / "now", "trainer.max_epochs=9"))

    resumed, ckpt = resuming.resolve_resume(cfg)

    assert ckpt == str(latest / "checkpoints" / "last.ckpt")
    assert resumed.paths.output_dir == str(latest)
    # Everything derived from the output directory follows it.
    assert resumed.callbacks.model_checkpoint.dirpath == str(latest / "checkpoints")
    assert resumed.callbacks.history.path == str(latest / "history.csv")
    assert cfg.paths.output_dir == str(outputs / "now")  # the caller's config is untouched
    assert str(latest) in (outputs / "now" / resuming.RESUMED_NOTE).read_text()


def test_resume_auto_without_an_interrupted_run_starts_a_new_one(tmp_path):
    outputs = tmp_path / "outputs" / "train"
    cfg = run_config(outputs / "now", "resume=auto")
    write_run(outputs / "finished", cfg, finished=True)
    write_run(outputs / "other_config", run_config(outputs / "now", "trainer.max_epochs=9"))
    resumed, ckpt = resuming.resolve_resume(cfg)
    assert ckpt is None and resumed.paths.output_dir == str(outputs / "now")
    assert not (outputs / "now" / resuming.RESUMED_NOTE).exists()
    assert resuming.config_differences(cfg, outputs / "other_config") == ["trainer.max_epochs: 9 -> 1"]


def test_resume_auto_in_an_old_run_directory_continues_it(tmp_path):
    old = tmp_path / "outputs" / "train" / "old"
    cfg = run_config(old, "resume=auto", "trainer.max_epochs=5")  # hydra.run.dir=<old run>, more epochs
    write_run(old, run_config(old), finished=True)
    resumed, ckpt = resuming.resolve_resume(cfg)
    assert ckpt == str(old / "checkpoints" / "last.ckpt") and resumed.paths.output_dir == str(old)
    assert not (old / resuming.RESUMED_NOTE).exists()


def test_resume_takes_a_newer_slurm_requeue_checkpoint_over_last(tmp_path):
    outputs = tmp_path / "outputs" / "train"
    cfg = run_config(outputs / "now", "resume=auto")
    run = write_run(outputs / "requeued", cfg, age_s=60)
    hpc = run / "hpc_ckpt_1.ckpt"  # Lightning's save on SLURM's requeue signal (SIGUSR1)
    hpc.write_text("checkpoint")
    assert resuming.resolve_resume(cfg)[1] == str(hpc)
    old = hpc.stat().st_mtime - 120
    os.utime(hpc, (old, old))
    assert resuming.resolve_resume(cfg)[1] == str(run / "checkpoints" / "last.ckpt")


def test_resume_path_is_a_run_directory_or_one_of_its_checkpoints(tmp_path):
    cfg = run_config(tmp_path / "now")
    run = write_run(tmp_path / "run", cfg)
    best = run / "checkpoints" / "epoch002.ckpt"
    best.write_text("checkpoint")
    for resume, expected in ((run, run / "checkpoints" / "last.ckpt"), (best, best)):
        resumed, ckpt = resuming.resolve_resume(run_config(tmp_path / "now", f"resume={resume}"))
        assert (resumed.paths.output_dir, ckpt) == (str(run), str(expected))

    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(CheckpointError, match=rf"resume={run}: no checkpoints/last.ckpt in that folder"):
        resuming.resolve_resume(run_config(tmp_path / "now", f"resume={run}"))
    loose = tmp_path / "downloaded.ckpt"
    loose.write_text("checkpoint")
    with pytest.raises(CheckpointError, match=rf"not inside a run directory.*pass ckpt_path={loose} instead"):
        resuming.resolve_resume(run_config(tmp_path / "now", f"resume={loose}"))
    with pytest.raises(ConfigError, match="Pass one of them"):
        resuming.resolve_resume(run_config(tmp_path / "now", f"resume={run}", f"ckpt_path={loose}"))


# --- a diverging fit ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_non_finite_loss_stops_training_naming_step_and_image_and_keeps_the_last_good_checkpoint(tiny_demo, tmp_path):
    out = tmp_path / "run"
    cfg = compose_config(
        tiny_overrides(tiny_demo, out)
        + [
            "head=fusion",
            "trainer.max_epochs=2",
            "callbacks.step_checkpoint.every_n_train_steps=1",
            "+callbacks.poison._target_=tasks.test_faults.PoisonMetaAtStep",
            "+callbacks.poison.step=3",
        ]
    )
    with pytest.raises(TrainingError) as info:
        train(cfg)
    last = out / "checkpoints" / "last.ckpt"
    assert str(info.value) == (
        f"Training stopped: the train loss is nan at global step 3, epoch 0; images with non-finite inputs or "
        f"outputs: {PoisonMetaAtStep.poisoned}. Nothing is saved from this state (the last good checkpoint is "
        f"{last}). Check those images and their label-table rows; if they are fine, training diverged: lower "
        "optimizer.lr, set trainer.gradient_clip_val=1.0 or use trainer.precision=32-true, then restart from "
        "the last good checkpoint (ckpt_path=FILE)."
    )
    assert PoisonMetaAtStep.checkpoint_io is checkpoints.AtomicCheckpointIO
    kept = torch.load(last, weights_only=False)
    assert kept["global_step"] == 3
    assert not checkpoints.non_finite_weights(kept["state_dict"])
    assert not (out / "metrics.json").exists()


class StubStrategy:
    """A strategy whose other (simulated) DDP ranks report a finite or non-finite loss."""

    def __init__(self, others_finite: bool) -> None:
        self.others_finite = others_finite

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision and self.others_finite


def stub_module(others_finite: bool):
    trainer = SimpleNamespace(
        strategy=StubStrategy(others_finite), datamodule=None, checkpoint_callback=None, world_size=2
    )
    return SimpleNamespace(_trainer=trainer, global_step=7, current_epoch=1)


def test_every_ddp_rank_stops_when_one_rank_has_a_non_finite_loss():
    batch = {"image": torch.zeros(2, 1, 4, 4), "meta": torch.zeros(2, 3), "index": torch.tensor([4, 9])}
    logits, finite, nan = torch.zeros(2, 5), torch.tensor(0.3), torch.tensor(float("nan"))
    divergence.check_finite_loss(stub_module(True), batch, "train", finite, logits)  # all finite: goes on
    with pytest.raises(TrainingError, match="loss is NaN/inf on another process at global step 7"):
        divergence.check_finite_loss(stub_module(False), batch, "train", finite, logits)
    with pytest.raises(TrainingError, match=r"train loss is nan at global step 7, epoch 1; the batch's 2 images: "
                       r"train row 4, train row 9\. Nothing is saved from this state \(no checkpoint was written"):
        divergence.check_finite_loss(stub_module(False), batch, "train", nan, logits)
    # No per-step collective in eval, where ranks may run different numbers of batches.
    divergence.check_finite_loss(stub_module(False), batch, "val", nan, logits)


# --- killed and resumed training processes -----------------------------------------------------------

EPOCHS, BATCHES, EVERY_N_STEPS = 3, 4, 3


def run_training(root: Path, run_dir: Path, signal_at: str | None) -> subprocess.CompletedProcess:
    """``python -m cxr_lightning.train ... resume=auto`` in a fresh run directory, as a rerun would be."""
    # One cache folder for all invocations: the run directory comes from Hydra alone.
    shared = tiny_overrides(root, run_dir.parent.parent)
    overrides = [o for o in shared if not o.startswith("paths.output_dir=")] + [
        f"hydra.run.dir={run_dir}",
        "head=fusion",
        f"trainer.max_epochs={EPOCHS}",
        f"trainer.limit_train_batches={BATCHES}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"callbacks.step_checkpoint.every_n_train_steps={EVERY_N_STEPS}",
        "+callbacks.signal._target_=tasks.test_faults.SignalAtStep",
        "resume=auto",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop(SIGNAL_ENV, None)
    if signal_at:
        env[SIGNAL_ENV] = signal_at
    return subprocess.run(
        [sys.executable, "-m", "cxr_lightning.train", *overrides],
        env=env, capture_output=True, text=True, timeout=300, cwd=TESTS.parent,
    )


def last_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def interrupted_training(tiny_demo, tmp_path_factory):
    """One run, SIGTERMed at step 5 (epoch 1), resumed and SIGKILLed at step 10 (epoch 2), resumed to the end.

    Each invocation gets a new Hydra run directory, as reruns of one command do; ``resume=auto``
    finds the first. State is recorded after each invocation, before the next one changes it.
    """
    outputs = tmp_path_factory.mktemp("outputs") / "train"
    first, second, third = outputs / "1_sigterm", outputs / "2_sigkill", outputs / "3_finish"
    stages = {}
    for run_dir, signal_at in ((first, f"5:{signal.SIGTERM}"), (second, f"10:{signal.SIGKILL}"), (third, None)):
        proc = run_training(tiny_demo, run_dir, signal_at)
        history = pd.read_csv(first / "history.csv") if (first / "history.csv").exists() else pd.DataFrame()
        stages[run_dir.name] = {
            "proc": proc,
            "ckpt": last_checkpoint(first) if (first / "checkpoints" / "last.ckpt").exists() else None,
            "history": history,
            "metrics": (first / "metrics.json").exists(),
        }
    return first, second, third, stages


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_at_the_interrupted_step_and_exits_143(interrupted_training):
    first, _, _, stages = interrupted_training
    stage = stages[first.name]
    assert stage["proc"].returncode == cli.EXIT_SIGTERM == 143, stage["proc"].stderr[-3000:]
    # Step 5 is neither an epoch end (4, 8) nor a step checkpoint (3, 6): only the SIGTERM hook saves it.
    assert (stage["ckpt"]["global_step"], stage["ckpt"]["epoch"]) == (5, 1)
    log = (first / "train.log").read_text()  # Hydra's log file of the run
    assert f"SIGTERM: saved {first / 'checkpoints' / 'last.ckpt'} at epoch 1, global step 5" in log
    assert stage["history"]["epoch"].tolist() == [0] and not stage["metrics"]


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_only_the_steps_since_the_step_checkpoint(interrupted_training):
    first, second, _, stages = interrupted_training
    stage = stages[second.name]
    assert stage["proc"].returncode == -signal.SIGKILL, stage["proc"].stderr[-3000:]
    # Resumed from step 5 in the first directory; killed at step 10, last saved at step 9 (epoch 2, batch 1).
    assert (stage["ckpt"]["global_step"], stage["ckpt"]["epoch"]) == (9, 2)
    assert stage["history"]["epoch"].tolist() == [0, 1] and not stage["metrics"]
    assert str(first) in (second / resuming.RESUMED_NOTE).read_text()
    assert not (second / "checkpoints").exists()


@pytest.mark.slow
def test_resume_auto_finishes_the_killed_run_in_its_own_directory(interrupted_training):
    first, _, third, stages = interrupted_training
    proc = stages[third.name]["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(first) in (third / resuming.RESUMED_NOTE).read_text()
    assert last_checkpoint(first)["global_step"] == EPOCHS * BATCHES  # no batch lost or repeated
    history = pd.read_csv(first / "history.csv")
    assert history["epoch"].tolist() == list(range(EPOCHS))
    assert history["step"].tolist() == [BATCHES * (e + 1) for e in range(EPOCHS)]
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS
    assert 0.0 <= metrics["test.auroc_mean"] <= 1.0
    best = Path(metrics["best_checkpoint"])
    assert best.parent == first / "checkpoints" and best.is_file()
    assert not list((first / "checkpoints").glob("last-v*.ckpt"))
