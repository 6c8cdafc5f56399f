"""Every experiment composes with every backbone: backbone-specific values (the CAM layer) come from
the backbone's yaml, picked by name (``backbone.cam_stride``), so a pair either validates or is
refused in one line before anything is built. A run of each experiment trains one step, explains
and exports."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONF_DIR, compose_config
from omegaconf import OmegaConf

from cxr_lightning.errors import ConfigError
from cxr_lightning.models.backbones import cam_layer_of
from cxr_lightning.tasks.validate import validate_config

CONF = Path(CONF_DIR)
# The training experiments; probe_comparison* configure the probe command (checked below with its
# own config, conf/probe.yaml, and run by tests/test_probe.py).
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if "probe" not in OmegaConf.load(p))
PROBE_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if "probe" in OmegaConf.load(p))
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
# Those that pool NIH with the box sources (their source roots are set per source).
POOLED = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if "sources" in OmegaConf.load(p).get("data", {}))
# Those built from a user's folder (transformers, open_clip): what they can run depends on the
# folder's own config, read at validation; tests/test_foundation_backbones.py runs each format.
FOLDER_BACKBONES = sorted(b for b in BACKBONES if OmegaConf.load(CONF / "backbone" / f"{b}.yaml").get("format"))
# The pairs an experiment cannot run, and the reason validation gives. Everything else must validate.
REFUSED = {
    ("backbone_comparison_demo", "swin_tiny_patch4_window7_224"): "data.image_size=112 is not a multiple of 32",
    ("sampling_study_demo", "inception_v3"): "data.image_size=64 is below inception_v3's minimum input size",
    # DINOv2's 14-px patches tile neither 128 nor 64 px
    ("demo", "dinov2_small"): "data.image_size=128 is not a multiple of 14",
    ("box_study_demo", "dinov2_small"): "data.image_size=128 is not a multiple of 14",
    ("vit_finetune", "dinov2_small"): "data.image_size=128 is not a multiple of 14",
    ("sampling_study_demo", "dinov2_small"): "data.image_size=64 is not a multiple of 14",
    **{("vit_finetune", b): "has no stochastic depth" for b in ("densenet121", "densenet121_512", "densenet121_xrv",
                                                                 "inception_v3", "vgg19")},
}


def _pair_overrides(experiment: str, backbone: str, root: Path, out: Path) -> list[str]:
    overrides = [f"experiment={experiment}", f"backbone={backbone}", f"data.root={root}", f"paths.output_dir={out}"]
    if experiment in POOLED:
        # NIH's layout from the fixture; the box sources' folders need only exist to validate
        out.mkdir(parents=True, exist_ok=True)
        overrides += [f"data.sources.nih.root={root}"] + [f"data.sources.{s}.root={out}" for s in ("vindr", "rsna")]
    if backbone in ("densenet121_xrv", "dinov2_small") or backbone in FOLDER_BACKBONES:
        # validation requires their weights; nothing is loaded here
        overrides.append(f"backbone.weights={out}/weights.safetensors")
    return overrides


def test_every_experiment_composes_with_every_backbone(tiny_demo, tmp_path, one_thread):
    refused, wrong_layer = {}, []
    for experiment in EXPERIMENTS:
        for backbone in BACKBONES:
            cfg = compose_config(_pair_overrides(experiment, backbone, tiny_demo, tmp_path))
            if backbone in FOLDER_BACKBONES:
                cam_layer_of(cfg.backbone)  # the experiment's stride exists; the folder decides the rest
                continue
            try:
                validate_config(cfg)
            except ConfigError as exc:
                refused[experiment, backbone] = str(exc)
                continue
            # The layer is the backbone's own, the coarsest at least as fine as the experiment asks for.
            own = OmegaConf.load(CONF / "backbone" / f"{backbone}.yaml")
            strides = [int(k.removeprefix("stride")) for k in own.cam_layers if int(k.removeprefix("stride"))
                       <= cfg.backbone.cam_stride]
            if cam_layer_of(cfg.backbone) != own.cam_layers[f"stride{max(strides)}"]:
                wrong_layer.append((experiment, backbone))
    assert not wrong_layer
    assert set(refused) == set(REFUSED), {k: v for k, v in refused.items() if k not in REFUSED}
    for pair, message in refused.items():
        assert REFUSED[pair] in message and "\n" not in message, (pair, message)
    # experiment=demo asks for the stride-16 map by name; every backbone has one.
    demo = compose_config(_pair_overrides("demo", "efficientnet_b3", tiny_demo, tmp_path))
    assert cam_layer_of(demo.backbone) == "blocks.4"


PROBE_REFUSED = {("probe_comparison_demo", "dinov2_small"): "data.image_size=96 is not a multiple of 14"}


def test_every_probe_experiment_composes_with_every_backbone(tiny_demo, tmp_path, one_thread):
    from cxr_lightning.tasks.validate import check_backbone

    refused = {}
    for experiment in PROBE_EXPERIMENTS:
        for backbone in BACKBONES:
            cfg = compose_config(_pair_overrides(experiment, backbone, tiny_demo, tmp_path), config_name="probe")
            if backbone in FOLDER_BACKBONES:
                continue  # what they can run is their folder's config's to say
            try:
                check_backbone(cfg.backbone, int(cfg.data.image_size))  # what the probe task checks first
            except ConfigError as exc:
                refused[experiment, backbone] = str(exc)
    assert set(refused) == set(PROBE_REFUSED), refused
    for pair, message in refused.items():
        assert PROBE_REFUSED[pair] in message and "\n" not in message, (pair, message)


# Each experiment once, end to end, with backbones of other families than the experiment's own:
# demo's stride-16 CAM on an EfficientNet-family network (the README's backbone swap), the final
# model's frozen start and max pooling on a ViT, layer decay on a CNN. Tiny images, one step.
RUNS = {
    "demo": "mobilenetv2_100",
    "backbone_comparison": "tiny",
    "backbone_comparison_demo": "tiny",
    "final_model": "vit_small_patch16_224",
    "sampling_study": "resnet18",
    "sampling_study_demo": "tiny",
    "vit_finetune": "tiny",
}


def test_every_experiment_has_a_run():
    # The pooled box studies run end to end in tests/data/test_box_pooled.py, on box-source fixtures.
    assert sorted(RUNS) == sorted(set(EXPERIMENTS) - set(POOLED))
    assert not {(e, b) for e, b in RUNS.items()} & set(REFUSED)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(RUNS))
def test_experiment_trains_explains_and_exports(experiment, tiny_demo, tmp_path, one_thread):
    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.export import export
    from cxr_lightning.tasks.train import train

    backbone = RUNS[experiment]
    out = tmp_path / "run"
    cfg = compose_config(_pair_overrides(experiment, backbone, tiny_demo, out) + [
        "data=nih", "data.image_size=32", "data.batch_size=4", "data.num_workers=0", f"paths.cache_dir={out}/cache",
        "backbone.pretrained=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "test_after_fit=false",
        "callbacks.progress_bar=null", "callbacks.sample_images=null", "callbacks.cam_grid=null",
        "callbacks.lr_monitor=null", "~logger",
    ])
    expected_layer = cam_layer_of(cfg.backbone)
    train(cfg)
    assert OmegaConf.load(out / "config.yaml").backbone.cam_layer == expected_layer

    metrics = explain(compose_config([f"run_dir={out}", "n=1", "top_k=1", "localization=false",
                                      f"output_dir={out}/explain"], config_name="explain"))
    assert metrics["cam_layer"] == expected_layer
    assert len(list((out / "explain" / "overlays").glob("*.png"))) == 1

    result = export(compose_config([f"run_dir={out}", "format=torchscript", "check_inputs=random",
                                    "check_batch_size=2"], config_name="export"))
    assert result.path.stat().st_size > 0 and result.max_abs_diff <= 1e-3
