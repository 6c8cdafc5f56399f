"""Configuration errors are caught by ``train()`` before any data is loaded, each with a message that
says what to pass instead."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import hydra
import pytest
import torch
from helpers import FIXTURES, REPO, compose_config, tiny_overrides

from cxr_lightning import labels
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import CheckpointError, ConfigError, DataError
from cxr_lightning.models.backbones import BACKBONE_NAMES
from cxr_lightning.tasks import validate
from cxr_lightning.tasks.build import build_datamodule
from cxr_lightning.tasks.train import train

# The NIH fixture holds a label table but no images: enough for every check, useless for training.
TABLE_ONLY = FIXTURES / "nih"


class DataLoadingStarted(AssertionError):
    pass


@pytest.fixture
def no_data_loading(monkeypatch):
    """Any attempt to build or set up a data module fails the test."""

    def refuse(*args, **kwargs):
        raise DataLoadingStarted("the data module was built before the configuration was checked")

    monkeypatch.setattr(CXRDataModule, "__init__", refuse)
    monkeypatch.setattr(CXRDataModule, "setup", refuse)
    monkeypatch.setattr(CXRDataModule, "prepare_data", refuse)
    monkeypatch.setattr("cxr_lightning.tasks.train.build_datamodule", refuse)


def config(tmp_path: Path, *overrides: str, root: Path = TABLE_ONLY):
    return compose_config(tiny_overrides(root, tmp_path / "run") + list(overrides))


def fake_checkpoint(
    path: Path, drop_no_finding=False, prior_labels=True, backbone="test_resnet", head="fusion_residual"
) -> Path:
    """A checkpoint file with only the hyperparameters the compatibility check reads."""
    names = labels.label_names(drop_no_finding)
    meta = ["age", "age_missing", "sex_male", "view_ap"]
    if prior_labels:
        meta += [f"prior:{n}" for n in names] + ["has_prior"]
    hparams = {
        "label_names": names, "meta_names": meta, "backbone": {"name": backbone}, "head": {"name": head},
        # what the checkpoint reader's schema requires of every checkpoint (schema.REQUIRED_HPARAMS)
        "loss": {"name": "weighted_bce"}, "optimizer": {"lr": 1e-4}, "image_size": 64,
    }
    torch.save({"hyper_parameters": hparams, "state_dict": {"w": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            ["backbone.name=nonexistent_timm_model"],
            ConfigError,
            r"backbone.name='nonexistent_timm_model' is not a timm model.*"
            + re.escape("backbone={" + ",".join(BACKBONE_NAMES) + "}")
            + r".*any other model name that timm.list_models\(\) prints also works",
        ),
        (["backbone.name=resnet5"], ConfigError, r"did you mean one of \[.*'resnet50'"),
        (
            ["backbone.global_pool=median"],
            ConfigError,
            r"backbone.global_pool='median'.*\['avg', 'max', 'avgmax', 'token'\]",
        ),
        (["head.name=transformer"], ConfigError, r"head.name='transformer' is unknown; valid heads: \['baseline', "),
        (
            ["loss.name=dice"],
            ConfigError,
            r"loss.name='dice' is unknown; valid losses: \['asl', 'bce', 'focal', 'weighted_bce'",
        ),
        (
            ["backbone=inception_v3", "data.image_size=64"],
            ConfigError,
            r"data.image_size=64 is below inception_v3's minimum input size of 75 px; pass data.image_size=75",
        ),
        (["data.root=/nonexistent/nih"], DataError, r"data root /nonexistent/nih does not exist; set data.root"),
        (
            ["data.label_table=Data_Entry_2016.csv"],
            DataError,
            r"label_table=Data_Entry_2016.csv: .*2016.csv does not exist",
        ),
        (["resume=/nonexistent/run"], CheckpointError, r"resume=/nonexistent/run does not exist"),
        (
            ["resume=auto", "ckpt_path=/some/file.ckpt"],
            ConfigError,
            r"resume=auto and ckpt_path=/some/file.ckpt both given",
        ),
        (["ckpt_path=/nonexistent/last.ckpt"], CheckpointError, r"ckpt_path=/nonexistent/last.ckpt does not exist"),
        (
            ["backbone.freeze=true", "backbone.unfreeze_at_epoch=-1"],
            ConfigError,
            r"backbone.unfreeze_at_epoch=-1: expected an epoch",
        ),
        (["backbone.unfreeze_at_epoch=2"], ConfigError, r"backbone.unfreeze_at_epoch=2 without backbone.freeze=true"),
        (
            ["backbone.freeze=true", "backbone.unfreeze_at_epoch=1", "backbone.finetune_lr_scale=0"],
            ConfigError,
            r"backbone.finetune_lr_scale=0: expected a positive number",
        ),
    ],
)
def test_configuration_error_is_raised_before_data_loading(tmp_path, no_data_loading, overrides, error, message):
    with pytest.raises(error, match=message):
        train(config(tmp_path, *overrides))


def test_data_root_without_label_table_says_which_files_nih_provides(tmp_path, no_data_loading):
    empty = tmp_path / "download"
    empty.mkdir()
    (empty / "images_001.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=rf"no NIH label table in {empty}\. Put one of .*Data_Entry_2017_v2020.csv.*"
                       r"images_001.tar.gz \.\.\. images_012.tar.gz.*holds: images_001.tar.gz"):
        train(config(tmp_path, root=empty))


def test_nih_data_without_root_asks_for_it(tmp_path, no_data_loading):
    cfg = compose_config([o for o in tiny_overrides(TABLE_ONLY, tmp_path) if not o.startswith("data.root")])
    with pytest.raises(ConfigError, match=r"data=nih needs data.root=DIR.*Data_Entry_2017_v2020.csv"):
        train(cfg)


@pytest.mark.parametrize(
    "checkpoint_kwargs, message",
    [
        ({"drop_no_finding": True}, r"predicts 14 labels, this config 15 \(set data.drop_no_finding"),
        ({"prior_labels": False}, r"expects metadata .*\(4 values\), this config gives .*\(20 values\).*prior_labels"),
        ({"backbone": "resnet50"}, r"trained with backbone.name=resnet50, this config asks for test_resnet"),
        ({"head": "baseline"}, r"trained with head.name=baseline, this config asks for fusion_residual"),
    ],
)
def test_checkpoint_that_does_not_fit_the_data_is_rejected_before_data_loading(
    tmp_path, no_data_loading, checkpoint_kwargs, message
):
    ckpt = fake_checkpoint(tmp_path / "other.ckpt", **checkpoint_kwargs)
    with pytest.raises(CheckpointError, match=rf"Cannot continue training from {re.escape(str(ckpt))}: .*{message}"):
        train(config(tmp_path, "head=fusion_residual", f"ckpt_path={ckpt}"))


def test_resume_checks_the_run_checkpoint_too(tmp_path, no_data_loading):
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    fake_checkpoint(run / "checkpoints" / "last.ckpt", drop_no_finding=True)
    with pytest.raises(CheckpointError, match=r"predicts 14 labels, this config 15"):
        train(config(tmp_path, "head=fusion_residual", f"resume={run}"))


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path, no_data_loading):
    ckpt = tmp_path / "truncated.ckpt"
    fake_checkpoint(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=rf"Cannot read checkpoint {re.escape(str(ckpt))}.*not a torch checkpoint"
    ):
        train(config(tmp_path, f"ckpt_path={ckpt}"))
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(CheckpointError, match=r"is not a cxr-lightning checkpoint"):
        train(config(tmp_path, f"ckpt_path={ckpt}"))


def test_fitting_checkpoint_and_valid_config_pass(tmp_path):
    """The same checkpoint passes with the config it was made for, silently, and fails with a
    config one setting away from it: the check looks at that setting, not at nothing."""
    ckpt = fake_checkpoint(tmp_path / "same.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate.validate_config(config(tmp_path, "head=fusion_residual"), ckpt) is None
    with pytest.raises(CheckpointError, match=r"predicts 15 labels, this config 14"):
        validate.validate_config(config(tmp_path, "head=fusion_residual", "data.drop_no_finding=true"), ckpt)


@pytest.mark.parametrize("group, option", [("backbone", "resnet"), ("head", "attention"), ("loss", "dice")])
def test_unknown_group_option_lists_the_available_ones(group, option):
    with pytest.raises(hydra.errors.MissingConfigException) as info:
        compose_config([f"{group}={option}"])
    message = str(info.value)
    assert f"Could not find '{group}/{option}'" in message
    available = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert f"Available options in '{group}':\n\t" + "\n\t".join(available) in message


def test_baseline_with_prior_labels_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(validate, "_warned", set())
    cfg = config(tmp_path, "head=baseline")
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.tasks.validate"):
        validate.validate_config(cfg)
        validate.validate_config(cfg)
    warnings = [r.getMessage() for r in caplog.records if "ignores metadata" in r.getMessage()]
    assert warnings == [
        "head=baseline ignores metadata, so data.prior_labels=true only adds inputs the model never reads; "
        "use head=fusion or fusion_residual to learn from prior visits."
    ]
    caplog.clear()
    monkeypatch.setattr(validate, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.tasks.validate"):
        validate.validate_config(config(tmp_path, "head=baseline", "data.prior_labels=false"))
        validate.validate_config(config(tmp_path, "head=fusion", "data.prior_labels=true"))
    assert not caplog.records


@pytest.mark.parametrize(
    "overrides", [[], ["data.prior_labels=false"], ["data.drop_no_finding=true"]], ids=["default", "no_prior", "no_nf"]
)
def test_expected_names_are_what_the_data_module_produces(tiny_demo, tmp_path, overrides):
    # The checkpoint check predicts the data module's layout from the config alone; it must not drift.
    cfg = config(tmp_path, *overrides, root=tiny_demo)
    dm = build_datamodule(cfg)
    dm.setup()
    assert validate.expected_label_names(cfg.data) == dm.label_names
    table = dm.split_table("train")
    assert sorted(c for c in table.columns if c.startswith("label:")) == sorted(f"label:{n}" for n in dm.label_names)
    assert sorted(c for c in table.columns if c.startswith("meta:")) == sorted(
        f"meta:{n}" for n in validate.expected_meta_names(cfg.data)
    )
