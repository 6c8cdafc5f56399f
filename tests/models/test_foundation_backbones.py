"""Foundation-model backbones from local folders in their published formats (transformers,
open_clip) and timm's DINOv2: tiny random models are saved in each format, loaded, compared with
the source library's own forward pass, trained for a step, explained and exported."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, compose_config, tiny_overrides
from helpers.foundation import DINO_SIZE, MEAN, STD, write_dinov2
from safetensors.torch import save_file

from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.explain.cams import CamWarning, compute_cams
from cxr_lightning.models.backbones import backbone_from_config
from cxr_lightning.models.folders import resolve
from cxr_lightning.tasks.build import build_model
from cxr_lightning.tasks.validate import validate_config

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

CLIP_SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    transformers.utils.logging.disable_progress_bar()
    yield


CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": CLIP_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def write_open_clip(folder: Path, model_cfg: dict = CLIP_CFG, as_bin: bool = False) -> torch.nn.Module:
    """A tiny random open_clip CLIP saved as BiomedCLIP is: open_clip_config.json + the weights."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.CLIP(**model_cfg).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if as_bin:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    return model


def rgb_input(grey: torch.Tensor) -> torch.Tensor:
    """What the source library's own preprocessing gives a grey image in [0, 1]: R=G=B, per-channel normalised."""
    return (grey.expand(-1, 3, -1, -1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def ours(cfg: dict, size: int, grey: torch.Tensor) -> torch.Tensor:
    """Our backbone's features of ``grey`` through the framework's own scalar normalisation."""
    resolved = resolve(cfg)
    assert resolved["mean"] == pytest.approx(np.mean(MEAN)) and resolved["std"] == pytest.approx(np.mean(STD))
    backbone = backbone_from_config(cfg, size).eval()
    with torch.no_grad():
        return backbone((grey - resolved["mean"]) / resolved["std"])


@pytest.mark.parametrize("registers", [0, 2])
def test_transformers_features_equal_the_library_forward(tmp_path, registers):
    source = write_dinov2(tmp_path, registers)
    grey = torch.rand(2, 1, DINO_SIZE, DINO_SIZE)
    with torch.no_grad():
        out = source(pixel_values=rgb_input(grey))
    base = {"name": "rad_dino", "format": "transformers", "weights": str(tmp_path), "mean": None, "std": None}
    torch.testing.assert_close(ours({**base, "global_pool": "token"}, DINO_SIZE, grey), out.pooler_output,
                               atol=1e-5, rtol=1e-5)
    # avg: the patch tokens only; class and register tokens left out.
    patches = out.last_hidden_state[:, 1 + registers:]
    assert patches.shape[1] == (DINO_SIZE // 14) ** 2
    torch.testing.assert_close(ours({**base, "global_pool": "avg"}, DINO_SIZE, grey), patches.mean(1),
                               atol=1e-5, rtol=1e-5)
    backbone = backbone_from_config({**base, "global_pool": "token_avg"}, DINO_SIZE)
    assert backbone.num_features == 64 and backbone.model.num_prefix_tokens == 1 + registers


def test_open_clip_features_equal_encode_image(tmp_path):
    source = write_open_clip(tmp_path)
    grey = torch.rand(2, 1, CLIP_SIZE, CLIP_SIZE)
    with torch.no_grad():
        expected = source.encode_image(rgb_input(grey))
    cfg = {"name": "biomedclip", "format": "open_clip", "weights": str(tmp_path), "global_pool": "embed",
           "mean": None, "std": None}
    torch.testing.assert_close(ours(cfg, CLIP_SIZE, grey), expected, atol=1e-5, rtol=1e-5)


def test_open_clip_timm_tower_from_a_pickle_free_bin(tmp_path):
    # BiomedCLIP's layout: a timm ViT trunk, its own pool, a linear projection; weights in a .bin.
    vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
              "timm_proj": "linear", "image_size": 224}
    model_cfg = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": CLIP_CFG["text_cfg"]}
    source = write_open_clip(tmp_path, model_cfg, as_bin=True)
    grey = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        expected = source.encode_image(rgb_input(grey))
    cfg = {"name": "biomedclip", "format": "open_clip", "weights": str(tmp_path), "global_pool": "embed",
           "mean": None, "std": None}
    torch.testing.assert_close(ours(cfg, 224, grey), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="built for 224 px"):
        backbone_from_config(cfg, 112)
    # The shipped config's CAM layer is a block of this 12-block trunk, as of BiomedCLIP's ViT-B.
    check_yaml_cam_layer("biomedclip", cfg, 224)


def check_yaml_cam_layer(stem: str, cfg: dict, size: int) -> None:
    """conf/backbone/<stem>.yaml's cam_layer exists in a 12-block model of the format and, through
    its cam_reshape, is a spatial map that gets gradient."""
    from omegaconf import OmegaConf

    from cxr_lightning.models.backbones import cam_layer_of
    from cxr_lightning.models.reshape import cam_reshape_transform

    yaml = OmegaConf.load(REPO / "conf" / "backbone" / f"{stem}.yaml")
    backbone = backbone_from_config(cfg, size)
    captured = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = backbone.get_layer(cam_layer_of(yaml)).register_forward_hook(keep)
    try:
        (backbone(torch.randn(1, 1, size, size)) * torch.randn(backbone.num_features)).sum().backward()
    finally:
        handle.remove()
    reshape = cam_reshape_transform(yaml.cam_reshape, backbone.model, (size, size))
    fmap, grad = reshape(captured[0]), reshape(captured[0].grad)
    assert fmap.shape[2:] == (size // backbone.model.patch_size[0],) * 2 and grad.abs().sum() > 0


def test_rad_dino_yaml_cam_layer_is_the_last_of_12_blocks(tmp_path):
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=12, num_attention_heads=2, mlp_ratio=1, image_size=28, patch_size=14))
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    cfg = {"name": "rad_dino", "format": "transformers", "weights": str(tmp_path), "global_pool": "token",
           "mean": None, "std": None}
    check_yaml_cam_layer("rad_dino", cfg, 28)


# ------------------------------------------------------------------------------------------------
# Each format through the framework: one training step, a CAM, an export with parity
def _folder_case(kind: str, tmp: Path) -> list[str]:
    if kind == "rad_dino":
        write_dinov2(tmp / "rad-dino", registers=0)
        return ["backbone=rad_dino", f"backbone.weights={tmp / 'rad-dino'}",
                "backbone.cam_layer=net.encoder.layer.1.norm1", f"data.image_size={DINO_SIZE}"]
    if kind == "biomedclip":
        write_open_clip(tmp / "biomedclip")
        return ["backbone=biomedclip", f"backbone.weights={tmp / 'biomedclip'}", "backbone.min_input_size=32",
                "backbone.input_multiple=8", "backbone.cam_layer=net.transformer.resblocks.1.ln_1",
                f"data.image_size={CLIP_SIZE}"]
    # timm's DINOv2 with 4 register tokens, made tiny through timm's own keyword arguments.
    import timm

    torch.manual_seed(0)
    kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    source = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=DINO_SIZE, **kwargs)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp / "dinov2.safetensors"))
    return ["backbone=dinov2_small", "backbone.name=vit_small_patch14_reg4_dinov2",
            f"backbone.weights={tmp / 'dinov2.safetensors'}",
            *(f"+backbone.model_kwargs.{k}={v}" for k, v in kwargs.items()), "backbone.cam_layer=blocks.1.norm1",
            f"data.image_size={DINO_SIZE}"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rad_dino", "biomedclip", "dinov2_small"])
def test_each_format_trains_explains_and_exports(tiny_demo, tmp_path, kind):
    from cxr_lightning.tasks.export import export, read_onnx_metadata

    cfg = compose_config(tiny_overrides(tiny_demo, tmp_path) + _folder_case(kind, tmp_path) + ["head=baseline"])
    validate_config(cfg)
    model = build_model(cfg)
    if kind == "dinov2_small":
        assert model.backbone.model.num_prefix_tokens == 5
    else:  # the architecture and statistics read from the folder travel in the hyperparameters
        assert model.hparams.backbone["arch_config"] and model.hparams.backbone["channel_std"] == STD
    model.hparams.pos_frac, model.hparams.age_fill = [0.2] * len(model.label_names), 50.0
    model._build_criterion(model.hparams.pos_frac)
    size = int(cfg.data.image_size)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (4, 1, size, size), dtype=torch.uint8)
    meta = torch.zeros(4, len(model.meta_names))
    labels = torch.randint(0, 2, (4, len(model.label_names))).float()

    # One optimiser step changes the backbone's weights.
    model.train()
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss = model.criterion(model(model.preprocess(images), meta), labels)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert torch.isfinite(loss) and changed

    # Grad-CAM on the token layer: full-size maps with a gradient and spatial contrast.
    model.eval()
    inputs = model.preprocess(images[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CamWarning)
        cams = compute_cams(model, inputs, meta[:2], model.cam_layer, top_k=1,
                            reshape_transform=model.cam_reshape((size, size)))
    assert cams.heatmaps.shape == (2, size, size)
    assert not cams.zero_gradient.any() and all(np.ptp(h) > 0 for h in cams.heatmaps)

    # The checkpoint rebuilds the model without the weights folder; ONNX export passes parity.
    ckpt = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    for path in tmp_path.glob("rad-dino/*"):
        path.unlink()
    output = tmp_path / f"{kind}.onnx"
    export(compose_config([f"ckpt_path={ckpt}", "format=onnx", f"output={output}"], config_name="export"))
    parity = json.loads(read_onnx_metadata(output)["parity"])
    assert parity["passed"], parity


# ------------------------------------------------------------------------------------------------
# Refusals
def test_unsupported_architecture_is_refused_by_name(tmp_path):
    write_dinov2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model",
                                                      "architectures": ["CLIPVisionModel"]}))
    cfg = {"name": "rad_dino", "format": "transformers", "weights": str(tmp_path), "global_pool": "token"}
    named = r"model_type='clip_vision_model' \(architectures \['CLIPVisionModel'\]\)"
    with pytest.raises(CheckpointError, match=named):
        resolve(cfg)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 10**9}))
    with pytest.raises(CheckpointError, match="hidden_size=1000000000 must be an integer in"):
        resolve(cfg)


def test_resnet_open_clip_tower_is_refused(tmp_path):
    tmp_path.joinpath("open_clip_model.safetensors").write_bytes(b"")
    tmp_path.joinpath("open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 1024, "vision_cfg": {"layers": [3, 4, 6, 3], "width": 64, "image_size": 224}}}))
    with pytest.raises(CheckpointError, match="ModifiedResNet image tower"):
        resolve({"name": "x", "format": "open_clip", "weights": str(tmp_path), "global_pool": "embed"})


@pytest.mark.parametrize("stem, where", [("rad_dino", "microsoft/rad-dino"),
                                         ("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
                                         ("dinov2_small", "timm/vit_small_patch14_dinov2.lvd142m")])
def test_weights_are_required_and_the_error_says_where_to_get_them(tiny_demo, tmp_path, stem, where):
    cfg = compose_config(tiny_overrides(tiny_demo, tmp_path) + [f"backbone={stem}", "data.image_size=56"])
    with pytest.raises(ConfigError, match=f"backbone={cfg.backbone.name} needs its weights") as err:
        validate_config(cfg)
    assert where in str(err.value)


def test_missing_folder_files_are_named(tmp_path):
    write_dinov2(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        resolve({"name": "rad_dino", "format": "transformers", "weights": str(tmp_path), "global_pool": "token"})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"none of \['model.safetensors', 'pytorch_model.bin'\]"):
        resolve({"name": "rad_dino", "format": "transformers", "weights": str(tmp_path), "global_pool": "token"})


def test_a_missing_library_names_the_extra(monkeypatch):
    import importlib

    from cxr_lightning.models import folders

    real = importlib.import_module

    def without_open_clip(name, *args):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_open_clip)
    with pytest.raises(ConfigError, match=r"needs the open_clip_torch package.*cxr-lightning\[foundation\]"):
        folders.require("open_clip")
