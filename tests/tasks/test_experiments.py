"""Experiment, launcher and sweeper configs: every one composes, and each says what it promises."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from helpers import CONF_DIR, compose_config
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cxr_lightning.models.backbones import BACKBONE_NAMES
from cxr_lightning.models.finetune import FinetuneSchedule
from cxr_lightning.tasks.build import build_callbacks
from cxr_lightning.tasks.validate import check_finetuning, validate_config

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PLUGIN_CONFIGS = sorted((CONF / "hydra" / "launcher").glob("*.yaml")) + sorted(
    (CONF / "hydra" / "sweeper").glob("*.yaml")
)
# The plugin (and its module) that provides the config each of ours extends.
PLUGINS = {
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "optuna": "hydra_plugins.hydra_optuna_sweeper",
}


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_module(config_module="cxr_lightning.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def _sweep_list(cfg, key: str) -> list[str]:
    return [v.strip() for v in str(cfg.hydra.sweeper.params[key]).split(",")]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_validates(name, tiny_demo, tmp_path):
    roots = [f"data.root={tiny_demo}"]
    if name.startswith("box_study"):  # pooled: each source's root
        for source in ("vindr", "rsna"):
            (tmp_path / source).mkdir()
        roots = [f"data.sources.nih.root={tiny_demo}", f"data.sources.vindr.root={tmp_path / 'vindr'}",
                 f"data.sources.rsna.root={tmp_path / 'rsna'}"]
    cfg = compose_config([f"experiment={name}", *roots, f"paths.output_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate_config(cfg)
    # What the experiment sets is what the run gets: each plain value of its yaml, at its key.
    own = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()) or {}
    settings = _leaves({k: v for k, v in own.items() if k not in ("defaults", "hydra")})
    assert settings, f"experiment {name} sets nothing"
    for key, value in settings.items():
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved above
        if key.split(".")[0] == "data" and key.split(".")[-1] == "root":
            continue  # overridden by this test
        assert OmegaConf.select(OmegaConf.create(resolved), key) == value, (name, key)


def _leaves(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_backbone_comparison_is_one_protocol_for_six_backbones():
    sweep = _compose("experiment=backbone_comparison", "data.root=/nih", hydra=True)
    assert sorted(_sweep_list(sweep, "backbone")) == sorted(BACKBONE_NAMES)
    configs = {b: _compose("experiment=backbone_comparison", "data.root=/nih", f"backbone={b}") for b in BACKBONE_NAMES}
    first = configs[BACKBONE_NAMES[0]]
    for backbone, cfg in configs.items():
        assert cfg.backbone.name == backbone
        # Each at its natural input size...
        assert cfg.data.image_size == cfg.backbone.input_size
        # ... and everything else identical: head, loss, optimiser, data, augmentation, schedule.
        assert cfg.seed == first.seed
        for key in ("head", "loss", "optimizer", "trainer", "callbacks"):
            assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(first[key]), (backbone, key)
        data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "image_size"}
        assert data == {k: v for k, v in OmegaConf.to_container(first.data).items() if k != "image_size"}
    assert first.head.name == "baseline" and first.loss.name == "weighted_bce" and first.data.source == "nih"
    assert first.trainer.max_epochs == 5 and first.callbacks.early_stopping.patience == 3
    # The command line beats the experiment: a fixed size for all.
    assert _compose("experiment=backbone_comparison", "backbone=vgg19", "data.image_size=128").data.image_size == 128


def test_demo_comparison_fits_every_backbone_at_one_small_size():
    sweep = _compose("experiment=backbone_comparison_demo", hydra=True)
    assert sorted(_sweep_list(sweep, "backbone")) == sorted(BACKBONE_NAMES)
    for backbone in BACKBONE_NAMES:
        cfg = _compose("experiment=backbone_comparison_demo", f"backbone={backbone}")
        assert cfg.data.source == "demo" and not cfg.backbone.pretrained  # offline, CPU
        assert cfg.data.image_size >= cfg.backbone.min_input_size
        assert cfg.data.image_size >= 107  # inception_v3's Grad-CAM map needs it
        assert cfg.trainer.max_epochs <= 2 and cfg.head.name == "baseline"


RECIPES = {"plain": ("random", 0.0), "undersample_no_finding": ("undersample_no_finding", 0.0),
           "balanced": ("balanced", 0.0), "box_guided": ("random", 0.3)}


@pytest.mark.parametrize("name", ["sampling_study", "sampling_study_demo"])
def test_sampling_study_is_one_protocol_for_four_recipes(name):
    sweep = _compose(f"experiment={name}", "data.root=/nih", hydra=True)
    assert sorted(_sweep_list(sweep, "recipe")) == sorted(RECIPES)
    assert len(_sweep_list(sweep, "seed")) >= 2
    configs = {r: _compose(f"experiment={name}", "data.root=/nih", f"recipe={r}") for r in RECIPES}
    first = configs["plain"]
    for recipe, cfg in configs.items():
        # Each arm differs from the plain recipe in its sampler and box weight only.
        assert (cfg.data.sampler, cfg.loss.box_weight) == RECIPES[recipe]
        for key in ("backbone", "head", "optimizer", "trainer", "callbacks"):
            assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(first[key]), (recipe, key)
        assert {k: v for k, v in OmegaConf.to_container(cfg.loss).items() if k != "box_weight"} == \
            {k: v for k, v in OmegaConf.to_container(first.loss).items() if k != "box_weight"}
        data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "sampler"}
        assert data == {k: v for k, v in OmegaConf.to_container(first.data).items() if k != "sampler"}
        assert cfg.data.sampler_seed == cfg.seed  # the sampler's draws follow the run's seed


def test_final_model_recipe(tmp_path):
    cfg = compose_config(["experiment=final_model", "data.root=/nih", f"paths.output_dir={tmp_path}"])
    assert cfg.backbone.name == "efficientnet_b3" and cfg.backbone.global_pool == "max"
    assert cfg.data.drop_no_finding and cfg.data.prior_labels and cfg.head.name == "fusion_residual"
    assert cfg.trainer.max_epochs == 30 and cfg.callbacks.early_stopping.patience == 3
    # Head first, then the backbone: the model's own schedule, not Lightning's BackboneFinetuning.
    schedule = FinetuneSchedule.from_config(cfg.backbone)
    assert schedule.staged and schedule.frozen(2) and not schedule.frozen(3)
    assert not [c for c in build_callbacks(cfg) if isinstance(c, pl.callbacks.BaseFinetuning)]
    # ... and it runs under DDP (trainer=ddp is no longer refused).
    ddp = compose_config(["experiment=final_model", "data.root=/nih", "trainer=ddp", f"paths.output_dir={tmp_path}"])
    check_finetuning(ddp.backbone)
    assert ddp.trainer.devices != 1


@pytest.mark.parametrize("path", PLUGIN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plugin_configs_extend_the_plugin_and_resolve(path):
    group = f"hydra/{path.parent.name}"
    own = yaml.safe_load(path.read_text())
    base = own["defaults"][0]
    assert base in PLUGINS, f"{path}: first default {base!r} is not a Hydra plugin config"
    # Their interpolations point at keys of the training config.
    main = _compose("trainer=ddp")
    fields = {k: v for k, v in own.items() if k != "defaults"}
    merged = OmegaConf.merge(OmegaConf.to_container(main), {"hydra": {path.parent.name: fields}})
    OmegaConf.to_container(merged.hydra, resolve=True)
    if path.parent.name == "launcher":
        assert merged.hydra.launcher.get("tasks_per_node", main.trainer.devices) == main.trainer.devices

    pytest.importorskip(PLUGINS[base], reason="the `cluster` extra is not installed")
    cfg = _compose(f"{group}={path.stem}", "trainer=ddp", hydra=True)
    node = OmegaConf.to_container(cfg.hydra[path.parent.name], resolve=True)
    assert node["_target_"].startswith(PLUGINS[base])
    ours = OmegaConf.to_container(merged.hydra[path.parent.name], resolve=True)
    # Our fields win; the plugin fills in the rest (e.g. the sampler's other settings).
    assert OmegaConf.to_container(OmegaConf.merge(node, ours)) == node


@pytest.mark.slow
def test_command_line_sweep_replaces_the_experiment_list(tmp_path):
    """A real `-m` run: `backbone=a,b` on the command line replaces the experiment's six-backbone
    list and `seed=1,2` multiplies it. Each job stops at the data-root check, in a second."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "cxr_lightning.train", "-m", "experiment=backbone_comparison",
        f"data.root={tmp_path}/no-such-dir", f"hydra.sweep.dir={sweep}", "~hydra.callbacks.compare",
        "backbone=tiny,vgg19", "seed=1,2",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no-such-dir" in done.stderr, done.stderr[-3000:]
    jobs = [yaml.safe_load(p.read_text()) for p in sweep.glob("*/.hydra/overrides.yaml")]
    launched = sorted(tuple(sorted(o for o in job if o.startswith(("backbone=", "seed=")))) for job in jobs)
    assert launched == sorted((f"backbone={b}", f"seed={s}") for b in ("tiny", "vgg19") for s in (1, 2))
