"""Transformer and modern CNN backbones: their configs, CAMs through the token reshapes, input sizes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import REPO
from omegaconf import OmegaConf

from cxr_lightning.errors import ConfigError
from cxr_lightning.explain.cams import CamWarning, compute_cams
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.models.reshape import channels_last_to_map, vit_tokens_to_map

CONF_BACKBONE = REPO / "conf" / "backbone"
NEW = ("vit_small_patch16_224", "vit_base_patch16_224", "convnext_tiny", "swin_tiny_patch4_window7_224",
       "densenet121_512")
LABELS = ["Atelectasis", "Effusion", "No Finding"]
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def backbone_cfg(stem: str, **changes) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_BACKBONE / f"{stem}.yaml"))
    return {**cfg, **changes}


def make_model(stem: str, image_size: int = SIZE, **changes) -> CXRClassifier:
    torch.manual_seed(0)
    cfg = backbone_cfg(stem, **changes)
    return CXRClassifier(
        backbone=cfg, head={"name": "baseline", "hidden": 16, "dropout": 0.0}, loss={"name": "bce"},
        optimizer={}, label_names=LABELS, meta_names=[], image_size=image_size,
        mean=cfg.get("mean", 0.449), std=cfg.get("std", 0.226), pos_frac=[0.3, 0.2, 0.5],
    ).eval()


@pytest.mark.parametrize("stem", NEW)
def test_new_backbone_cams_have_the_input_size_and_a_gradient(stem):
    # The 512-px DenseNet at 128 px: a 4x4 map (2x2 at 64 px leaves random-weight CAMs blank).
    size = 128 if stem == "densenet121_512" else SIZE
    model = make_model(stem, image_size=size)
    images = torch.randn(2, 1, size, size)
    meta = torch.zeros(2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CamWarning)  # no blank or gradient-less CAM
        result = compute_cams(
            model, images, meta, model.cam_layer, top_k=2, reshape_transform=model.cam_reshape(images.shape[-2:])
        )
    assert result.heatmaps.shape == (4, size, size)
    assert not result.zero_gradient.any() and not result.empty.any()
    assert all(np.ptp(h) > 0 for h in result.heatmaps)
    # Independently: the target layer's gradient for the top class is non-zero at more than one position.
    captured = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = model.cam_layer.register_forward_hook(keep)
    try:
        logits = model(images, meta)
        logits[0, int(result.pairs[0, 1])].backward()
    finally:
        handle.remove()
    grad = captured[0].grad
    assert grad is not None and grad.abs().sum() > 0


def test_vit_takes_other_input_sizes_and_its_grid_follows_the_input():
    model = make_model("vit_small_patch16_224", image_size=96)
    assert model.backbone.model.pos_embed.shape[1] == 1 + 6 * 6
    transform = model.cam_reshape((96, 96))
    tokens = torch.arange(2 * 37 * 3, dtype=torch.float32).reshape(2, 37, 3)
    fmap = transform(tokens)
    assert fmap.shape == (2, 3, 6, 6)
    # Token 1 + r*6 + c is position (r, c): the class token is dropped, rows are row-major.
    torch.testing.assert_close(fmap[1, :, 2, 5], tokens[1, 1 + 2 * 6 + 5])
    result = compute_cams(model, torch.randn(1, 1, 96, 96), torch.zeros(1, 0), model.cam_layer, top_k=1,
                          reshape_transform=transform)
    assert result.heatmaps.shape == (1, 96, 96) and not result.zero_gradient.any()


def test_reshapes_refuse_the_wrong_layer():
    with pytest.raises(ConfigError, match=r"1 \+ 4x4 tokens.*blocks\.11\.norm1"):
        vit_tokens_to_map(torch.zeros(1, 10, 8), (4, 4), 1)
    with pytest.raises(ConfigError, match="cam_reshape=swin"):
        channels_last_to_map(torch.zeros(2, 16, 8))
    nhwc = torch.randn(1, 3, 4, 5)
    torch.testing.assert_close(channels_last_to_map(nhwc)[0, :, 2, 1], nhwc[0, 2, 1])


def test_token_layer_without_its_reshape_is_the_crash_this_fixes():
    model = make_model("vit_small_patch16_224")
    with pytest.raises(ValueError, match="Invalid grads shape"):
        compute_cams(model, torch.randn(1, 1, SIZE, SIZE), torch.zeros(1, 0), model.cam_layer, top_k=1)


def test_final_vit_norm_gets_gradient_at_the_class_token_only_and_is_flagged():
    # Why the configs name blocks.11.norm1: at the final norm only the class token has gradient.
    model = make_model("vit_small_patch16_224", cam_layer="norm")
    with pytest.warns(CamWarning):
        result = compute_cams(model, torch.randn(1, 1, SIZE, SIZE), torch.zeros(1, 0), model.cam_layer, top_k=1,
                              reshape_transform=model.cam_reshape((SIZE, SIZE)))
    assert result.empty.all() or result.zero_gradient.all()


@pytest.mark.parametrize(
    ("stem", "size", "ok"),
    [("swin_tiny_patch4_window7_224", 96, True), ("swin_tiny_patch4_window7_224", 100, False),
     ("vit_small_patch16_224", 72, False), ("vit_small_patch16_224", 80, True), ("convnext_tiny", 70, True)],
)
def test_validate_refuses_sizes_the_patch_grid_does_not_cover(stem, size, ok):
    from cxr_lightning.tasks.validate import check_backbone

    cfg = OmegaConf.create(backbone_cfg(stem))
    if ok:
        check_backbone(cfg, size)
    else:
        with pytest.raises(
            ConfigError, match=rf"data.image_size={size} is not a multiple of \d+.*pass data.image_size="
        ):
            check_backbone(cfg, size)


def test_unknown_cam_reshape_is_a_config_error():
    from cxr_lightning.tasks.validate import check_backbone

    with pytest.raises(ConfigError, match="cam_reshape='tokens'"):
        check_backbone(OmegaConf.create(backbone_cfg("convnext_tiny", cam_reshape="tokens")), 64)


@pytest.mark.slow
def test_vit_trains_and_is_explained_end_to_end(tiny_demo, tmp_path):
    """The issue's reproduction: a ViT fitted on the demo, then the CAM grid, explain (overlays and
    localisation) and predict cam=true, with a gradient at the CAM layer everywhere."""
    import pandas as pd
    from helpers import compose_config, tiny_overrides
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.predict import predict
    from cxr_lightning.tasks.train import train

    # ViT-Ti/16 (12 blocks, like ViT-S) at 64 px keeps this to seconds; the config is ViT-S's.
    vit = ["backbone=vit_small_patch16_224", "backbone.name=vit_tiny_patch16_224", "head=baseline",
           "test_after_fit=false", "callbacks.cam_grid.n=2"]
    run = tmp_path / "run"
    ckpt = train(compose_config(tiny_overrides(tiny_demo, run) + vit))["best_checkpoint"]
    scalars = {}
    for path in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        if "cam_grid/zero_gradient" in acc.Tags()["scalars"]:
            scalars["zero_gradient"] = acc.Scalars("cam_grid/zero_gradient")[-1].value
            assert "cam_grid" in acc.Tags()["images"]
    assert scalars == {"zero_gradient": 0.0}

    out = tmp_path / "explain"
    metrics = explain(compose_config([f"run_dir={run}", "split=test", "n=2", "top_k=1", f"output_dir={out}"],
                                     "explain"))
    cams = pd.read_csv(out / "cams.csv")
    assert len(cams) == 2 and not cams["zero_gradient"].any()
    assert metrics["cam_layer"] == "blocks.11.norm1" and metrics["localization.zero_gradient"] == 0
    assert metrics["localization.n_images"] > 0

    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    run_ = predict(compose_config([f"ckpt_path={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'p.csv'}",
                                   "cam=true", "cam_top_k=1"], "predict"))
    assert len(run_.cam_files) == 1 and run_.cam_files[0].read_bytes()[:4] == b"\x89PNG"


def test_weights_sources_that_need_a_file_say_so():
    from cxr_lightning.tasks.validate import check_backbone

    with pytest.raises(
        ConfigError, match=r"weights_source=torchxrayvision needs its weights: pass backbone.weights=PATH"
    ):
        check_backbone(OmegaConf.load(CONF_BACKBONE / "densenet121_xrv.yaml"), 224)
    with pytest.raises(ConfigError, match=r"weights_source='hub' is unknown"):
        check_backbone(OmegaConf.create(backbone_cfg("convnext_tiny", weights_source="hub")), 64)
    check_backbone(OmegaConf.create(backbone_cfg("densenet121_xrv", weights="/data/xrv.safetensors")), 224)


def test_vit_finetune_experiment_states_its_recipe_and_validates(tmp_path):
    from helpers import compose_config

    from cxr_lightning.tasks.validate import validate_config

    cfg = compose_config(["experiment=vit_finetune", f"paths.output_dir={tmp_path}"])
    validate_config(cfg)
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.layer_decay == 0.75
    assert cfg.backbone.drop_path_rate == 0.1 and cfg.scheduler.warmup_epochs == 5 and cfg.scheduler.interval == "step"
    with pytest.raises(ConfigError, match=r"optimizer.layer_decay=1.2"):
        validate_config(compose_config(["experiment=vit_finetune", "optimizer.layer_decay=1.2"]))
