"""Backbones: the six studied architectures headless on one channel, their CAM layers, weight loading."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import timm.models._builder as timm_builder
import torch
from helpers import REPO
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.models.backbones import BACKBONE_NAMES, cam_layer_of, create_backbone
from cxr_lightning.models.reshape import cam_reshape_transform

CONF_BACKBONE = REPO / "conf" / "backbone"
FEATURE_WIDTH = {
    "densenet121": 1024,
    "vgg19": 512,
    "resnet50": 2048,
    "inception_v3": 2048,
    "mobilenetv2_100": 1280,
    "efficientnet_b3": 1536,
}
TINY = "test_resnet"  # timm's 0.4M-parameter ResNet


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def built():
    """Build each (name, pool) once per module: the big backbones cost seconds on this CPU."""
    cache: dict[tuple[str, str, int | None], nn.Module] = {}

    def get(name: str, pool: str = "avg", img_size: int | None = None) -> nn.Module:
        if (name, pool, img_size) not in cache:
            torch.manual_seed(0)
            cache[name, pool, img_size] = create_backbone(name, global_pool=pool, img_size=img_size).eval()
        return cache[name, pool, img_size]

    return get


def test_backbone_names_are_the_six_studied():
    assert set(BACKBONE_NAMES) == set(FEATURE_WIDTH)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_headless_one_channel_features(built, name, pool):
    backbone = built(name, pool)
    size = 80 if name == "inception_v3" else 64
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        features = backbone(x)
        fmap = backbone.forward_features(x)
    assert backbone.num_features == FEATURE_WIDTH[name]
    assert features.shape == (2, FEATURE_WIDTH[name])
    # The output is the global pool of the last feature map, nothing more (no classifier, no fc).
    expected = fmap.mean(dim=(2, 3)) if pool == "avg" else fmap.amax(dim=(2, 3))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    first_conv = backbone.get_layer(backbone.model.pretrained_cfg["first_conv"])
    assert first_conv.in_channels == 1


def test_vgg19_drops_the_4096_unit_fc_block(built):
    backbone = built("vgg19")
    n_params = sum(p.numel() for p in backbone.parameters())
    # timm's full vgg19 has 139.6M parameters; its conv part 20.0M.
    assert 19e6 < n_params < 21e6
    assert not any("pre_logits" in name for name, _ in backbone.named_parameters())
    with torch.no_grad():
        fmap = backbone.forward_features(torch.randn(1, 1, 224, 224))
    assert fmap.shape == (1, 512, 7, 7)


def _backbone_yamls(timm_only: bool = False) -> list[Path]:
    """The backbone configs; ``timm_only``: those timm builds by name (the folder formats'
    rad_dino and biomedclip need their folder: tests/test_foundation_backbones.py)."""
    paths = sorted(CONF_BACKBONE.glob("*.yaml"))
    return [p for p in paths if not timm_only or OmegaConf.load(p).get("format", "timm") == "timm"]


def test_every_studied_backbone_has_a_config():
    names = {OmegaConf.load(p).name for p in _backbone_yamls()}
    assert set(BACKBONE_NAMES) <= names


def _cam_cases() -> list[tuple[Path, int]]:
    return [(p, int(str(k).removeprefix("stride"))) for p in _backbone_yamls(timm_only=True)
            for k in OmegaConf.load(p).cam_layers]


@pytest.mark.parametrize(("yaml_path", "stride"), _cam_cases(), ids=lambda v: v.stem if isinstance(v, Path) else str(v))
def test_cam_layers_are_spatial_maps_at_their_stride(built, yaml_path, stride):
    cfg = OmegaConf.load(yaml_path)
    for key in ("name", "input_size", "min_input_size", "cam_layers", "cam_stride", "cam_layer", "global_pool",
                "pretrained", "weights", "freeze", "unfreeze_at_epoch", "finetune_lr_scale"):
        assert key in cfg.keys(), f"{yaml_path.name} lacks {key}"  # keys(): a required ??? value counts
    assert cfg.min_input_size <= cfg.input_size
    assert f"stride{cfg.cam_stride}" in cfg.cam_layers and cfg.cam_layer is None
    assert cam_layer_of(cfg) == cfg.cam_layers[f"stride{cfg.cam_stride}"]
    # inception's valid convolutions need more pixels, and lose a few at every stage
    size = 128 if cfg.min_input_size > 32 else 64
    backbone = built(cfg.name, cfg.global_pool, size)
    path = cam_layer_of({**OmegaConf.to_container(cfg), "cam_stride": stride})
    layer = backbone.get_layer(path)
    captured = []

    def keep_output(_module, _inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = layer.register_forward_hook(keep_output)
    try:
        x = torch.randn(1, 1, size, size)
        # A random read-out: a plain sum of a LayerNorm'd output (ConvNeXt's head norm) has no gradient.
        weights = torch.randn(backbone.num_features, generator=torch.Generator().manual_seed(0))
        (backbone(x) * weights).sum().backward()
    finally:
        handle.remove()
        backbone.zero_grad(set_to_none=True)
    (out,) = captured
    grad = out.grad
    reshape = cam_reshape_transform(cfg.get("cam_reshape"), backbone.model, (size, size))
    if reshape is not None:  # token outputs (ViT, Swin) as the map Grad-CAM weighs
        out, grad = reshape(out), reshape(grad)
    assert out.ndim == 4
    # The stride the yaml names: one map cell per `stride` input pixels (inception's valid
    # convolutions lose two).
    lost = 2 if cfg.min_input_size > 32 else 0
    assert size // stride - lost <= out.shape[2] <= size // stride, (path, tuple(out.shape))
    assert out.shape[2] == out.shape[3]
    if stride == max(int(str(k).removeprefix("stride")) for k in cfg.cam_layers) and stride == 32:
        assert out.shape[1] == backbone.num_features  # the map the global pool reads
    # Grad-CAM weights channels by this gradient: it must reach the layer and not vanish.
    assert grad is not None and grad.abs().sum() > 0


def test_cam_stride_picks_the_coarsest_map_at_least_that_fine():
    resnet = OmegaConf.to_container(OmegaConf.load(CONF_BACKBONE / "resnet18.yaml"))
    assert [cam_layer_of({**resnet, "cam_stride": s}) for s in (16, 24, 32, 64)] == [
        "layer3",
        "layer3",
        "layer4",
        "layer4",
    ]
    vit = OmegaConf.to_container(OmegaConf.load(CONF_BACKBONE / "vit_small_patch16_224.yaml"))
    assert cam_layer_of({**vit, "cam_stride": 32}) == "blocks.11.norm1"  # its one map
    with pytest.raises(ConfigError, match=r"^backbone.cam_stride=8: backbone 'vit_small_patch16_224' has no CAM layer "
                       r"that fine \(its strides: \[16\]\); pass backbone.cam_stride=16") as info:
        cam_layer_of({**vit, "cam_stride": 8})
    assert "\n" not in str(info.value)
    assert cam_layer_of({**vit, "cam_stride": 8, "cam_layer": "blocks.5.norm1"}) == "blocks.5.norm1"


def test_get_layer_unknown_path_lists_nearby_names():
    backbone = create_backbone(TINY)
    with pytest.raises(ConfigError, match=r"no layer 'layer5'.*layer4"):
        backbone.get_layer("layer5")
    with pytest.raises(ConfigError, match=r"under 'layer4'.*layer4\.0"):
        backbone.get_layer("layer4.7")


def test_unknown_name_and_pool_are_config_errors():
    with pytest.raises(ConfigError, match=r"'densenet12' is not a timm model.*densenet121"):
        create_backbone("densenet12")
    with pytest.raises(ConfigError, match=r"global_pool='mean'.*avg"):
        create_backbone(TINY, global_pool="mean")


# --- weights ---------------------------------------------------------------------------------------


def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


def _assert_loaded(backbone: nn.Module, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Every backbone tensor equals the file's (classifier ``fc`` dropped); ``skip`` is checked by the caller."""
    loaded = backbone.model.state_dict()
    assert set(loaded) == {k for k in source if not k.startswith("fc.")}
    for key in set(loaded) - set(skip):
        torch.testing.assert_close(loaded[key], source[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_one_channel_weights_are_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(TINY, in_chans=1).state_dict()  # with its 1000-class fc
    path = _save(source, tmp_path / f"tiny{suffix}")
    torch.manual_seed(2)
    backbone = create_backbone(TINY, weights=path)
    _assert_loaded(backbone, source)


def test_three_channel_first_conv_is_folded_to_one(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model(TINY, in_chans=3).state_dict()
    path = _save(source, tmp_path / "rgb.pth")
    backbone = create_backbone(TINY, weights=path)
    first = backbone.model.pretrained_cfg["first_conv"] + ".weight"
    # A grey image is R = G = B, so the equivalent one-channel kernel is the sum over colours.
    torch.testing.assert_close(backbone.model.state_dict()[first], source[first].sum(dim=1, keepdim=True))
    _assert_loaded(backbone, source, skip=(first,))


def test_torchvision_state_dict_is_loaded(tmp_path):
    tv_resnet18 = pytest.importorskip("torchvision.models").resnet18
    torch.manual_seed(3)
    source = tv_resnet18(weights=None).state_dict()
    path = _save(source, tmp_path / "resnet18-torchvision.pth")
    backbone = create_backbone("resnet18", weights=path)
    torch.testing.assert_close(backbone.model.conv1.weight, source["conv1.weight"].sum(dim=1, keepdim=True))
    _assert_loaded(backbone, source, skip=("conv1.weight",))


def test_legacy_torchvision_densenet_keys_are_converted(tmp_path):
    tv_densenet121 = pytest.importorskip("torchvision.models").densenet121
    torch.manual_seed(4)
    source = tv_densenet121(weights=None).state_dict()
    # torchvision's published densenet121-a639ec97.pth spells "denselayer1.norm1" as "denselayer1.norm.1".
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", k): v for k, v in source.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    backbone = create_backbone("densenet121", weights=_save(legacy, tmp_path / "densenet121-legacy.pth"))
    first = "features.conv0.weight"
    torch.testing.assert_close(backbone.model.state_dict()[first], source[first].sum(dim=1, keepdim=True))
    loaded = backbone.model.state_dict()
    assert set(loaded) == {k for k in source if not k.startswith("classifier.")}
    for key in set(loaded) - {first}:
        torch.testing.assert_close(loaded[key], source[key], rtol=0, atol=0, msg=key)


def test_wrapped_checkpoint_is_unwrapped(tmp_path):
    source = timm.create_model(TINY, in_chans=1).state_dict()
    path = tmp_path / "train-ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}, path)
    _assert_loaded(create_backbone(TINY, weights=path), source)


def test_missing_weights_file_names_it(tmp_path):
    path = tmp_path / "nowhere" / "densenet.pth"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} does not exist"):
        create_backbone(TINY, weights=path)


def test_unreadable_or_foreign_weights_are_checkpoint_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"cannot read backbone weights file {re.escape(str(garbage))}"):
        create_backbone(TINY, weights=garbage)

    wrong_suffix = tmp_path / "weights.npy"
    wrong_suffix.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"expected one of"):
        create_backbone(TINY, weights=wrong_suffix)

    other = _save(timm.create_model("test_efficientnet", in_chans=1).state_dict(), tmp_path / "effnet.pth")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(other))} does not fit {TINY}.*size mismatch for bn1"):
        create_backbone(TINY, weights=other)

    partial_source = timm.create_model(TINY, in_chans=1).state_dict()
    partial = _save({k: v for k, v in partial_source.items() if not k.startswith("layer4.")}, tmp_path / "part.pth")
    with pytest.raises(CheckpointError, match=r"lacks \d+ of the tensors.*layer4\."):
        create_backbone(TINY, weights=partial)


@pytest.fixture
def offline(monkeypatch):
    """timm's two download paths fail the way they do without network."""

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", no_network)
    monkeypatch.setattr(timm_builder, "load_state_dict_from_url", no_network)


def test_pretrained_without_network_explains_offline_options(offline):
    with pytest.raises(CheckpointError, match=r"pretrained \(ImageNet\) weights of backbone 'test_resnet'") as info:
        create_backbone(TINY, pretrained=True)
    message = str(info.value)
    assert "backbone.weights=/path/to/file.pth" in message and "HF_HUB_OFFLINE=1" in message
    assert "name resolution" in message


def test_local_weights_take_precedence_over_download(offline, tmp_path):
    source = timm.create_model(TINY, in_chans=1).state_dict()
    path = _save(source, tmp_path / "imagenet.safetensors")
    _assert_loaded(create_backbone(TINY, pretrained=True, weights=path), source)
