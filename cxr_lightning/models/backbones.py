"""Image backbones: a network without its classifier, reading one-channel radiographs.

:func:`backbone_from_config` is the one factory: ``backbone.format`` ``timm`` (default) builds a
timm model with :func:`create_backbone`; ``transformers`` and ``open_clip`` build a foundation
model's image encoder from its local folder (:mod:`cxr_lightning.models.folders`).

``create_backbone`` builds any timm model headless (``num_classes=0``) with global pooling, so its
output is one feature vector per image. Weights come from nowhere (random init), from timm's hub
(``pretrained=True``) or from local files in the layouts of :mod:`cxr_lightning.models.weights`
(``weights=PATH``); in every case a three-channel ImageNet first convolution is folded to one
channel by timm's ``adapt_input_conv``.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vgg import ConvMlp
from torch import nn

from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.models import folders
from cxr_lightning.models.weights import WeightsReport, load_backbone_weights, preview

# The six architectures compared in the seed study (conf/backbone/<name>.yaml); any timm name works.
BACKBONE_NAMES: tuple[str, ...] = (
    "densenet121",
    "vgg19",
    "resnet50",
    "inception_v3",
    "mobilenetv2_100",
    "efficientnet_b3",
)

# "token": a vision transformer's class token (timm's default for ViTs), not a pooling of a map.
GLOBAL_POOLS: tuple[str, ...] = ("avg", "max", "avgmax", "token")

_OFFLINE_HINT = (
    "Supply the weights offline instead: download them on a machine with network access and pass "
    "backbone.weights=/path/to/file.pth (or .safetensors; a timm or torchvision state dict), or copy "
    "a populated Hugging Face cache (~/.cache/huggingface, or $HF_HOME) and run with HF_HUB_OFFLINE=1."
)


class Backbone(nn.Module):
    """A headless network: ``forward(x) -> (B, num_features)`` pooled image features.

    ``model`` is the timm network itself, or a folder format's encoder
    (:class:`~cxr_lightning.models.folders.FolderEncoder`); layer paths (``get_layer``,
    ``cam_layer`` in the config) are relative to it, e.g. ``"layer4"`` for a ResNet or
    ``"net.encoder.layer.11.norm1"`` for RAD-DINO.
    """

    def __init__(self, model: nn.Module, timm_name: str) -> None:
        super().__init__()
        self.model = model
        self.timm_name = timm_name
        self.num_features: int = int(model.num_features)
        # What loading local weights did (None without them): see models/weights.py.
        self.weights_report: WeightsReport | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, C, h, w)``, before global pooling."""
        return self.model.forward_features(x)

    def get_layer(self, path: str) -> nn.Module:
        """The sub-module at dotted ``path`` (e.g. ``"features.norm5"``), for hooks such as Grad-CAM."""
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ConfigError(_unknown_layer_message(self.model, path, self.timm_name)) from None


def cam_layer_of(backbone: Mapping[str, Any]) -> str:
    """The layer Grad-CAM hooks for a backbone config: ``cam_layer`` when it names one, else the
    entry of ``cam_layers`` (``{stride16: PATH, stride32: PATH}``) with the largest stride at most
    ``cam_stride``: an experiment asks for a map at least that fine (``cam_stride: 16``), not for a
    layer name, so it composes with every backbone (a ViT/14's one map is stride 14)."""
    explicit = backbone.get("cam_layer")
    if explicit:
        return str(explicit)
    layers = {int(str(k).removeprefix("stride")): str(v) for k, v in dict(backbone.get("cam_layers") or {}).items()}
    name = backbone.get("name", "?")
    if not layers:
        raise ConfigError(f"backbone {name!r} names no CAM layer: set backbone.cam_layer=PATH or give its yaml "
                          "cam_layers: {stride16: PATH, stride32: PATH} and cam_stride.")
    stride = backbone.get("cam_stride")
    if stride is None:
        stride = max(layers)
    fine_enough = [s for s in layers if s <= int(stride)]
    if not fine_enough:
        raise ConfigError(
            f"backbone.cam_stride={stride}: backbone {name!r} has no CAM layer that fine (its strides: "
            f"{sorted(layers)}); pass backbone.cam_stride={min(layers)} or backbone.cam_layer=PATH."
        )
    return layers[max(fine_enough)]


def backbone_from_config(backbone: Mapping[str, Any], image_size: int) -> Backbone:
    """The backbone of a plain ``backbone`` config for ``image_size`` inputs: a timm model, or a
    folder format's encoder (the config resolved by :func:`cxr_lightning.models.folders.resolve`;
    with ``weights`` null, e.g. rebuilt from a checkpoint, it starts from random weights)."""
    fmt = backbone.get("format", "timm") or "timm"
    if fmt == "timm":
        return create_backbone(
            backbone["name"],
            pretrained=bool(backbone.get("pretrained", False)),
            weights=backbone.get("weights"),
            global_pool=backbone.get("global_pool", "avg"),
            drop_path_rate=float(backbone.get("drop_path_rate", 0.0)),
            img_size=image_size,
            weights_source=backbone.get("weights_source", "auto"),
            weights_strict=bool(backbone.get("weights_strict", True)),
            model_kwargs=backbone.get("model_kwargs"),
        )
    resolved = folders.resolve(backbone)
    folders.check_input_size(resolved, image_size)
    return Backbone(folders.build_encoder(resolved), timm_name=str(resolved.get("name")))


def check_name_and_pool(name: str, global_pool: str) -> None:
    """ConfigError unless ``name`` is a timm model and ``global_pool`` one timm supports here."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(
            f"backbone.name={name!r} is not a timm model"
            + (f" (did you mean one of {close}?)" if close else "")
            + f". The six studied backbones are backbone={{{','.join(BACKBONE_NAMES)}}} (conf/backbone/); "
            "any other model name that timm.list_models() prints also works as backbone.name."
        )
    if global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"backbone.global_pool={global_pool!r} is not supported; use one of {list(GLOBAL_POOLS)}.")


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    global_pool: str = "avg",
    in_chans: int = 1,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    img_size: int | None = None,
    weights_source: str = "auto",
    weights_strict: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Backbone:
    """Build timm model ``name`` without classifier, reading ``in_chans`` channels.

    ``weights`` (a local state dict file) takes precedence over ``pretrained``, so a machine without
    network can set both and still start from ImageNet weights. ``drop_rate`` is timm's dropout on
    the pooled features, ``drop_path_rate`` its stochastic depth (passed only when non-zero: not
    every timm family takes it). ``img_size`` is given to the families built for one input size
    (ViT, Swin: timm's ``fixed_input_size``); timm then sizes their position embeddings and
    windows for it and resamples pretrained position embeddings on load. ``weights_source`` and
    ``weights_strict``: the file's layout and key checking, see :mod:`cxr_lightning.models.weights`.
    ``model_kwargs``: further keyword arguments of ``timm.create_model`` (e.g. ``depth``,
    ``reg_tokens``), plain values only.
    """
    check_name_and_pool(name, global_pool)

    kwargs: dict[str, Any] = dict(num_classes=0, global_pool=global_pool, in_chans=in_chans, drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    if img_size is not None and takes_input_size(name):
        kwargs["img_size"] = int(img_size)
    for key, value in dict(model_kwargs or {}).items():
        if key in kwargs or not isinstance(value, (int, float, str, bool, type(None))):
            raise ConfigError(f"backbone.model_kwargs.{key}={value!r}: pass plain values, and not {sorted(kwargs)} "
                              "(set by their own backbone keys).")
        kwargs[key] = value
    if pretrained and weights is None:
        model = _create_pretrained(name, kwargs)
    else:
        model = _create(name, kwargs)
    _remove_vgg_pre_logits(model)
    report = None
    if weights is not None:
        report = load_backbone_weights(model, weights, source=weights_source, strict=weights_strict, timm_name=name)
    backbone = Backbone(model, timm_name=name)
    backbone.weights_report = report
    return backbone


def takes_input_size(name: str) -> bool:
    """Whether timm builds ``name`` for one input size (position embeddings, attention windows)."""
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, AssertionError, ValueError) as err:  # timm's checks of its keyword arguments
        given = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_chans")}
        raise ConfigError(f"timm cannot build backbone {name!r} with {given}: {err}") from err


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ConfigError(
            f"timm has no pretrained weights for backbone {name!r}; set backbone.pretrained=false "
            "or backbone.weights=/path/to/file.pth."
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 -- hub, HTTP and cache failures have no common base class
        raise CheckpointError(
            f"could not obtain the pretrained (ImageNet) weights of backbone {name!r} through timm "
            f"({type(err).__name__}: {err}). {_OFFLINE_HINT}"
        ) from err


def _remove_vgg_pre_logits(model: nn.Module) -> None:
    """Drop VGG's 4096-unit fully connected block so the pooled conv features are the output.

    Keras' ``include_top=False`` VGG19 (the seed's) has no such block; keeping it would add ~120M
    parameters and squash the last feature map to 1x1, where Grad-CAM maps are all zero.
    """
    if isinstance(getattr(model, "pre_logits", None), ConvMlp):
        model.pre_logits = nn.Identity()
        model.head_hidden_size = model.num_features


def _unknown_layer_message(model: nn.Module, path: str, timm_name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    # Children of the deepest part of the path that exists show where the path went wrong.
    parts = path.split(".")
    parent_path, children = "", [n for n, _ in model.named_children()]
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        try:
            parent = model.get_submodule(prefix)
        except AttributeError:
            continue
        parent_path, children = prefix, [f"{prefix}.{n}" for n, _ in parent.named_children()]
        break
    close = difflib.get_close_matches(path, names, n=6, cutoff=0.5)
    where = f"under {parent_path!r}" if parent_path else "at the top level"
    return (
        f"backbone {timm_name!r} has no layer {path!r} (fix backbone.cam_layer). "
        + (f"Closest names: {close}. " if close else "")
        + f"Modules {where}: {preview(children, n=12)}."
    )
