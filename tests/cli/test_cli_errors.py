"""Every composition, override and unknown-key error is one ``error:`` line with close matches,
exit status 2, and leaves no run directory behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import compose_config

from cxr_lightning.cli import hydra_error_line
from cxr_lightning.errors import ConfigError
from cxr_lightning.tasks.validate import check_instantiated_keys


def _composition_error(*overrides: str) -> str:
    with pytest.raises(Exception) as info:
        compose_config(list(overrides))
    return hydra_error_line(info.value)


@pytest.mark.parametrize(("override", "expected"), [
    ("backbone=resnet5", "backbone=resnet5: there is no backbone config 'resnet5' (did you mean backbone=resnet50"),
    ("experiment=dem", "experiment=dem: there is no experiment config 'dem' (did you mean experiment=demo?)"),
    ("trainer.max_epoch=2", "trainer.max_epoch: trainer has no key 'max_epoch' (did you mean trainer.max_epochs?)."),
    ("bakbone=tiny", "bakbone: there is no config group or key 'bakbone' (did you mean backbone?)."),
    ("data.demo.patient=3", "data.demo.patient: data.demo has no key 'patient' (did you mean data.demo.patients?)."),
    ("trainer.max_epochs=[1", "cannot parse the override: no viable alternative at input '[1'"),
])
def test_composition_errors_are_one_line_with_close_matches(override, expected):
    line = _composition_error(override)
    assert line.startswith(expected) and "\n" not in line, line


@pytest.mark.parametrize(("override", "expected"), [
    ("+trainer.max_epoch=2", "trainer.max_epoch: pytorch_lightning.Trainer takes no argument 'max_epoch' "
                             "(did you mean trainer.max_epochs"),
    ("+optimizer.lrr=0.1", "optimizer.lrr: torch.optim.Adam takes no argument 'lrr' (did you mean optimizer.lr?)"),
    ("+callbacks.early_stopping.patiense=1", "callbacks.early_stopping.patiense: "
                                            "pytorch_lightning.callbacks.EarlyStopping takes no argument 'patiense'"),
    ("+data.batchsize=4", "data.batchsize: cxr_lightning.data.datamodule.CXRDataModule takes no argument 'batchsize' "
                          "(did you mean data.batch_size?)"),
])
def test_unknown_keys_of_instantiated_groups_are_caught_before_instantiation(override, expected, tmp_path):
    cfg = compose_config([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        check_instantiated_keys(cfg)
    assert str(info.value).startswith(expected), str(info.value)


def test_the_shipped_configs_have_no_unknown_keys(tmp_path):
    for overrides in ([], ["experiment=vit_finetune"], ["scheduler=plateau"], ["experiment=final_model"]):
        check_instantiated_keys(compose_config(overrides + ["data.root=/nih", f"paths.output_dir={tmp_path}"]))


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), [
    ("backbone=resnet5", "error: backbone=resnet5: there is no backbone config"),  # Hydra composition
    ("+trainer.max_epoch=2", "error: ConfigError: trainer.max_epoch: pytorch_lightning.Trainer takes no argument"),
])
def test_the_command_prints_one_line_exits_2_and_leaves_no_run_directory(override, expected, tmp_path):
    env = {**os.environ, "CXR_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cxr_lightning.train", override], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(expected) and done.stderr.count("\n") == 1, done.stderr
    outputs = tmp_path / "outputs" / "train"
    assert not outputs.exists() or not any(outputs.iterdir()), list(outputs.rglob("*"))
