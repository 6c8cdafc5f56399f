"""Distributed training: a two-process DDP fit on CPU (gloo) writes one run whose test metrics equal
a single-process test of the same checkpoint; the multirun guard refuses script-launched DDP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
from helpers import tiny_overrides
from hydra import compose, initialize_config_module
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from cxr_lightning.checkpoints import load_model
from cxr_lightning.cli.sweep import CompareOnMultirunEnd, check_multirun_strategy
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import ConfigError
from cxr_lightning.tasks.build import build_datamodule


@pytest.fixture(scope="module")
def ddp_run(tiny_demo, tmp_path_factory):
    """``python -m cxr_lightning.train trainer=ddp_cpu``: Lightning re-launches the command for rank 1."""
    out = tmp_path_factory.mktemp("ddp")
    run_dir = out / "run"
    overrides = [o for o in tiny_overrides(tiny_demo, out) if not o.startswith("paths.output_dir=")]
    cmd = [sys.executable, "-m", "cxr_lightning.train", *overrides, "trainer=ddp_cpu", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, done.stdout + done.stderr


@pytest.mark.slow
def test_two_process_fit_writes_one_run(ddp_run):
    run_dir, output = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Rank 1 ran in the same run directory (its own Hydra log there), and made no run of its own.
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert [p.parent for p in run_dir.parent.rglob(".hydra")] == [run_dir]
    assert list(run_dir.parent.rglob("metrics.json")) == [run_dir / "metrics.json"]
    # Only rank zero reports (and writes) the run.
    assert output.count("Run directory:") == 1
    assert "test.auroc_mean" in metrics and metrics["epochs"] == 1
    # An odd test split: Lightning's padding DistributedSampler would score one image twice.
    assert metrics["n_images"]["test"] % 2 == 1


@pytest.mark.slow
def test_ddp_test_metrics_equal_single_process_test(ddp_run):
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dm = build_datamodule(OmegaConf.load(run_dir / "config.yaml"))
    model = load_model(metrics["best_checkpoint"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    single = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert single["test/auroc_mean"] == pytest.approx(metrics["test.auroc_mean"], abs=1e-6)
    assert single["test/loss"] == pytest.approx(metrics["test.loss"], rel=1e-5)
    for name in metrics["label_names"]:
        ddp_value, one_value = metrics[f"test.auroc.{name}"], single[f"test/auroc/{name}"]
        assert (math.isnan(ddp_value) and math.isnan(one_value)) or one_value == pytest.approx(ddp_value, abs=1e-6), (
            name
        )


def test_eval_sampler_gives_each_image_to_one_rank(tiny_demo, tmp_path):
    dm = CXRDataModule(source="nih", root=tiny_demo, cache_dir=tmp_path, image_size=64, num_workers=0)
    dm.setup()
    assert dm._eval_sampler("test") is None  # no trainer: plain sequential loading
    n = len(dm.split_table("test"))
    per_rank = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        per_rank.append([int(i) for i in dm.test_dataloader().sampler])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def _job_config(*overrides: str):
    with initialize_config_module(config_module="cxr_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    return cfg


def test_multirun_refuses_ddp_that_relaunches_the_command(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(ConfigError, match="re-running this command line.*hydra/launcher=slurm"):
        CompareOnMultirunEnd().on_job_start(_job_config("trainer=ddp_cpu"), task_function=None)
    # Not refused: spawned processes, one device, or ranks started by SLURM.
    check_multirun_strategy(_job_config("trainer=ddp_cpu", "trainer.strategy=ddp_spawn"))
    check_multirun_strategy(_job_config("trainer=ddp_cpu", "trainer.devices=1"))
    monkeypatch.setenv("SLURM_NTASKS", "2")
    check_multirun_strategy(_job_config("trainer=ddp_cpu"))


PROBE = '''
import torch, pytorch_lightning as pl

class BackboneProbe(pl.Callback):
    """Each rank's backbone weights and BatchNorm statistics at the start and after every epoch."""

    def __init__(self, out):
        self.out = out

    def _save(self, trainer, pl_module, tag):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.backbone.state_dict().items()}
        torch.save(state, f"{self.out}/rank{trainer.global_rank}_{tag}.pt")

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")
'''


@pytest.mark.slow
def test_ddp_head_then_backbone_fine_tuning_trains_one_backbone_on_both_ranks(tiny_demo, tmp_path):
    """Unfrozen after epoch 0 under two-process DDP: both ranks hold the same backbone, unchanged
    while frozen and changed after the unfreeze (DDP all-reduced its gradients)."""
    import torch

    (tmp_path / "ddp_probe.py").write_text(PROBE)
    probes = tmp_path / "probes"
    probes.mkdir()
    skip = ("paths.output_dir=", "trainer.max_epochs=")
    overrides = [o for o in tiny_overrides(tiny_demo, tmp_path) if not o.startswith(skip)] + [
        "trainer=ddp_cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=2", "test_after_fit=false",
        "backbone.freeze=true", "backbone.unfreeze_at_epoch=1", "optimizer.lr=1e-2",
        "+callbacks.probe._target_=ddp_probe.BackboneProbe", f"+callbacks.probe.out={probes}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run([sys.executable, "-m", "cxr_lightning.train", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    state = {
        (r, tag): torch.load(probes / f"rank{r}_{tag}.pt", weights_only=True)
        for r in (0, 1)
        for tag in ("start", "epoch0", "epoch1")
    }
    for tag in ("start", "epoch0", "epoch1"):
        for key, value in state[0, tag].items():
            assert torch.equal(value, state[1, tag][key]), f"ranks differ in {key} at {tag}"

    def moved(a: str, b: str) -> float:
        return sum(float((state[0, b][k].float() - v.float()).abs().sum()) for k, v in state[0, a].items())

    assert moved("start", "epoch0") == 0.0  # frozen: weights and BatchNorm statistics held
    assert moved("epoch0", "epoch1") > 0.0  # unfrozen at epoch 1, and trained on both ranks alike
