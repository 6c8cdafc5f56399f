"""Foundation-model image encoders from the local folders they are published as.

Two formats besides timm's (``backbone.format``):

* ``transformers``: a Hugging Face transformers vision model folder, ``config.json`` +
  ``model.safetensors`` (or ``pytorch_model.bin``) and the image processor's
  ``preprocessor_config.json``: RAD-DINO (``microsoft/rad-dino``, a ``Dinov2Model``), DINOv2
  (``facebook/dinov2-*``), DINOv2 with registers, ViT;
* ``open_clip``: an open_clip model folder, ``open_clip_config.json`` +
  ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``): BiomedCLIP
  (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``); only its image tower is built
  and loaded.

Nothing is downloaded and nothing from the folder runs: the network is built by the library from
the folder's JSON config (validated here: known architectures only, sizes bounded), and the
tensors are read with safetensors or ``torch.load(weights_only=True)``. The config travels in the
checkpoint (``backbone.arch_config``), so a trained model is rebuilt without the folder.

The encoders take the framework's one-channel input. Their weights saw RGB images normalised per
channel; :class:`GreyToRGB` turns the grey image normalised once by
:class:`~cxr_lightning.models.preprocess.Preprocess` (mean and std: the averages of the
channels') into exactly the three channels the library's own preprocessing gives a grey image,
so the features equal the library's forward pass on that image.
"""
from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_lightning.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FOLDER_FORMATS: tuple[str, ...] = ("transformers", "open_clip")
FORMATS: tuple[str, ...] = ("timm", *FOLDER_FORMATS)
# The pip extra that installs the libraries of the folder formats.
EXTRA = "foundation"

# model_type in config.json -> (transformers class, number of prefix tokens besides the class token
# read from this config key, the keyword that lets the model take other input sizes).
TRANSFORMERS_MODELS: dict[str, tuple[str, str | None, str | None]] = {
    "dinov2": ("Dinov2Model", None, None),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "num_register_tokens", None),
    "vit": ("ViTModel", None, "interpolate_pos_encoding"),
}
TRANSFORMERS_POOLS: tuple[str, ...] = ("token", "avg", "token_avg")
OPEN_CLIP_POOLS: tuple[str, ...] = ("embed",)

TRANSFORMERS_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CONFIG_FILES = {"transformers": "config.json", "open_clip": "open_clip_config.json"}
PREPROCESSOR_FILE = "preprocessor_config.json"
_MAX_JSON_BYTES = 1 << 20
# Bounds on the sizes a folder's config may ask for: a hostile config must not make the library
# allocate terabytes. Generous for every published model (ViT-g: width 1536, 40 layers).
_LIMITS = {"width": 8192, "layers": 128, "heads": 128, "image": 4096, "patch": 64, "registers": 64}
# open_clip's defaults (OpenAI CLIP's statistics), used when open_clip_config.json has no preprocess_cfg.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def require(module: str) -> Any:
    """Import ``module`` (transformers, open_clip), or a ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"open_clip": "open_clip_torch"}.get(module, module)
        raise ConfigError(
            f"this backbone format needs the {package} package, which is not installed: "
            f"pip install 'cxr-lightning[{EXTRA}]' (or pip install {package})."
        ) from err


# ------------------------------------------------------------------------------------------------
# Reading and checking a folder's config
def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist.")
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is over {_MAX_JSON_BYTES} bytes: no model config is that large.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} as JSON: {err}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}.")
    return value


def _bounded_int(config: Mapping[str, Any], key: str, limit: str, where: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]  # a square (h, w) size
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _LIMITS[limit]:
        raise CheckpointError(
            f"{where}: {key}={value!r} must be an integer in [0, {_LIMITS[limit]}] (a square size where it is a pair)."
        )
    return value


def _stats(values: Any, key: str, where: str) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * 3
    if (not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise CheckpointError(f"{where}: {key} must be three numbers (one per RGB channel), got {values!r}.")
    if key.endswith("std") and not all(v > 0 for v in values):
        raise CheckpointError(f"{where}: {key}={values} must be positive.")
    return [float(v) for v in values]


def check_transformers_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The config.json of a supported transformers vision model, checked; CheckpointError names an
    unsupported architecture."""
    model_type = config.get("model_type")
    if model_type not in TRANSFORMERS_MODELS:
        raise CheckpointError(
            f"{where} names model_type={model_type!r} (architectures {config.get('architectures')}), which this "
            f"framework cannot build as a backbone; supported: {sorted(TRANSFORMERS_MODELS)} "
            "(e.g. microsoft/rad-dino, facebook/dinov2-base)."
        )
    for key, limit in (("hidden_size", "width"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
                       ("image_size", "image"), ("patch_size", "patch")):
        if key in config:
            _bounded_int(config, key, limit, where)
    if config.get("num_channels", 3) != 3:
        raise CheckpointError(
            f"{where}: num_channels={config.get('num_channels')!r}; the RGB models (3) are supported."
        )
    registers = TRANSFORMERS_MODELS[model_type][1]
    if registers is not None:
        _bounded_int(config, registers, "registers", where, default=0)
    # Code a folder may name for trust_remote_code is never run; keep it out of the stored config.
    return {k: v for k, v in config.items() if k not in ("auto_map", "_name_or_path")}


def check_open_clip_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """open_clip_config.json's ``model_cfg`` reduced to what the image tower needs, checked."""
    model_cfg = config.get("model_cfg", config)
    vision = model_cfg.get("vision_cfg") if isinstance(model_cfg, Mapping) else None
    if not isinstance(vision, Mapping):
        raise CheckpointError(f"{where} has no model_cfg.vision_cfg: is it an open_clip model's open_clip_config.json?")
    embed_dim = _bounded_int(model_cfg, "embed_dim", "width", where)
    if isinstance(vision.get("layers"), (list, tuple)):
        raise CheckpointError(
            f"{where}: vision_cfg.layers={list(vision['layers'])} is an open_clip ModifiedResNet image tower, which "
            "this "
            "framework cannot build as a backbone; supported: open_clip's ViT towers and timm towers (BiomedCLIP)."
        )
    name = vision.get("timm_model_name")
    if name is not None:
        import timm

        if not isinstance(name, str) or not timm.is_model(name):
            raise CheckpointError(f"{where}: vision_cfg.timm_model_name={name!r} is not a timm model.")
        if vision.get("timm_pool") in ("abs_attn", "rot_attn"):
            raise CheckpointError(f"{where}: vision_cfg.timm_pool={vision['timm_pool']!r} is not supported here.")
    else:
        for key, limit in (("width", "width"), ("layers", "layers"), ("head_width", "width"), ("patch_size", "patch")):
            _bounded_int(vision, key, limit, where, default={"width": 768, "layers": 12, "head_width": 64,
                                                               "patch_size": 16}[key])
        if vision.get("attentional_pool"):
            raise CheckpointError(f"{where}: vision_cfg.attentional_pool (CoCa) is not supported here.")
    _bounded_int(vision, "image_size", "image", where, default=224)
    vision = {k: v for k, v in vision.items() if k != "timm_model_pretrained"}
    return {"embed_dim": embed_dim, "quick_gelu": bool(model_cfg.get("quick_gelu", False)), "vision_cfg": vision}


def read_folder(fmt: str, folder: str | Path, help_text: str | None = None) -> dict[str, Any]:
    """What a weights folder of format ``fmt`` says about its model: ``arch_config`` (the checked
    architecture config), ``channel_mean``/``channel_std`` (its RGB normalisation), ``input_size``
    and ``patch_size`` (native), ``weights_file`` (the tensors to read)."""
    folder = Path(folder).expanduser()
    hint = f" {help_text}" if help_text else ""
    config_name = CONFIG_FILES[fmt]
    files = TRANSFORMERS_FILES if fmt == "transformers" else OPEN_CLIP_FILES
    if not folder.is_dir():
        raise CheckpointError(
            f"backbone.weights={folder} is not a folder; backbone.format={fmt} reads a folder holding {config_name} "
            "and "
            f"one of {list(files)}" + (f" and {PREPROCESSOR_FILE}" if fmt == "transformers" else "") + f".{hint}"
        )
    snapshots = sorted((folder / "snapshots").glob("*/")) if (folder / "snapshots").is_dir() else []
    if snapshots:  # a Hugging Face hub cache entry, models--org--name/snapshots/<revision>/
        folder = snapshots[-1]
    if not (folder / config_name).is_file():
        raise CheckpointError(
            f"backbone weights folder {folder} has no {config_name}; backbone.format={fmt} reads {config_name} and one "
            f"of {list(files)}.{hint}"
        )
    weights_file = next((folder / f for f in files if (folder / f).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"backbone weights folder {folder} has {config_name} but none of {list(files)}.{hint}")
    raw = read_json(folder / config_name)
    where = str(folder / config_name)
    if fmt == "transformers":
        arch = check_transformers_config(raw, where)
        processor = folder / PREPROCESSOR_FILE
        if not processor.is_file():
            raise CheckpointError(
                f"backbone weights folder {folder} has no {PREPROCESSOR_FILE}, which holds the mean and std the model "
                f"was trained with; copy it from the model's page beside config.json.{hint}"
            )
        prep = read_json(processor)
        mean = _stats(prep.get("image_mean"), "image_mean", str(processor))
        std = _stats(prep.get("image_std"), "image_std", str(processor))
        size = _bounded_int(arch, "image_size", "image", where, default=224)
        patch = _bounded_int(arch, "patch_size", "patch", where, default=14 if arch["model_type"] != "vit" else 16)
    else:
        arch = check_open_clip_config(raw, where)
        prep = raw.get("preprocess_cfg") or {}
        if not isinstance(prep, Mapping):
            raise CheckpointError(f"{where}: preprocess_cfg must be an object.")
        mean = _stats(prep.get("mean", list(_OPENAI_MEAN)), "preprocess_cfg.mean", where)
        std = _stats(prep.get("std", list(_OPENAI_STD)), "preprocess_cfg.std", where)
        size = _bounded_int(arch["vision_cfg"], "image_size", "image", where, default=224)
        patch = _open_clip_patch(arch["vision_cfg"])
    return {"arch_config": arch, "channel_mean": mean, "channel_std": std, "input_size": size, "patch_size": patch,
            "weights_file": weights_file}


def _open_clip_patch(vision: Mapping[str, Any]) -> int | None:
    name = vision.get("timm_model_name")
    if name is None:
        return int(vision.get("patch_size", 16))
    # timm names its ViTs ..._patch16_...; the encoder reads the built trunk's own patch size.
    sizes = [int(part[5:]) for part in name.split("_") if part.startswith("patch") and part[5:].isdigit()]
    return sizes[0] if sizes else None


def resolve(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """``backbone`` (a plain config) with what its weights folder says filled in, for the folder
    formats: ``arch_config``, ``channel_mean``/``channel_std``, ``native_input_size``,
    ``patch_size``, and ``mean``/``std`` (the grey image's: averages of the channels') where the
    config leaves them null. Other formats come back unchanged; so does a config resolved already
    (a checkpoint's), whose folder may be gone."""
    cfg = dict(backbone)
    fmt = cfg.get("format", "timm") or "timm"
    if fmt not in FORMATS:
        raise ConfigError(f"backbone.format={fmt!r} is unknown; use one of {list(FORMATS)}.")
    if fmt == "timm" or cfg.get("arch_config") is not None:
        return cfg
    weights = cfg.get("weights")
    if weights is None:
        raise ConfigError(
            f"backbone={cfg.get('name')} (backbone.format={fmt}) needs its weights folder: pass backbone.weights=PATH."
            + (f" {cfg['weights_help']}" if cfg.get("weights_help") else "")
        )
    found = read_folder(fmt, weights, cfg.get("weights_help"))
    cfg.update(arch_config=found["arch_config"], channel_mean=found["channel_mean"], channel_std=found["channel_std"],
               native_input_size=found["input_size"], patch_size=found["patch_size"])
    if cfg.get("mean") is None:
        cfg["mean"] = sum(found["channel_mean"]) / 3
    if cfg.get("std") is None:
        cfg["std"] = sum(found["channel_std"]) / 3
    return cfg


def check_input_size(backbone: Mapping[str, Any], image_size: int) -> None:
    """The folder formats' input-size rules: a multiple of the patch size (the token grid covers
    the image), and for open_clip the size it was built for (its position embeddings are not resampled)."""
    fmt = backbone.get("format", "timm")
    if fmt not in FOLDER_FORMATS or backbone.get("patch_size") is None:
        return
    # Checked like the folder's own values: a checkpoint's hyperparameters are files from elsewhere too.
    where = f"backbone config of {backbone.get('name')}"
    patch = max(1, _bounded_int(backbone, "patch_size", "patch", where))
    native = _bounded_int(backbone, "native_input_size", "image", where)
    if fmt == "open_clip" and image_size != native:
        raise ConfigError(
            f"data.image_size={image_size}: the open_clip image tower of {backbone.get('weights')} is built for "
            f"{native} px (open_clip_config.json vision_cfg.image_size); pass data.image_size={native}."
        )
    if image_size % patch:
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of the patch size {patch} of {backbone.get('weights')}; "
            f"pass data.image_size={max(patch, image_size // patch * patch)} or {(image_size // patch + 1) * patch}."
        )


# ------------------------------------------------------------------------------------------------
# The encoders
class GreyToRGB(nn.Module):
    """``(B, 1, H, W)`` grey input normalised by ``(x - mean) / std`` -> ``(B, 3, H, W)`` normalised
    per channel by ``(x - mean_c) / std_c``, the input the RGB weights were trained on."""

    def __init__(self, mean: float, std: float, channel_mean: Sequence[float], channel_std: Sequence[float]) -> None:
        super().__init__()
        cm = torch.tensor([float(v) for v in channel_mean]).view(1, 3, 1, 1)
        cs = torch.tensor([float(v) for v in channel_std]).view(1, 3, 1, 1)
        # x = std * z + mean, so (x - mean_c) / std_c = z * std / std_c + (mean - mean_c) / std_c.
        self.register_buffer("scale", float(std) / cs, persistent=False)
        self.register_buffer("shift", (float(mean) - cm) / cs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"expected one-channel images (B, 1, H, W), got {tuple(x.shape)}")
        return x * self.scale + self.shift


class FolderEncoder(nn.Module):
    """A foundation model's image encoder: ``forward(x) -> (B, num_features)``.

    ``net`` is the library's own module (a transformers model, an open_clip image tower); layer
    paths of the config (``cam_layer``) start at this module, e.g. ``net.encoder.layer.11.norm1``.
    ``patch_size`` and ``num_prefix_tokens`` describe its token sequence for Grad-CAM
    (:func:`cxr_lightning.models.reshape.cam_reshape_transform`).
    """

    net: nn.Module
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    num_features: int
    tokens_batch_first: bool = True
    # What loading the folder's weights did (None: random-initialised, e.g. before a checkpoint fills it).
    loaded: Any = None


class TransformersEncoder(FolderEncoder):
    def __init__(self, arch: Mapping[str, Any], pool: str, adapter: GreyToRGB, folder: Path | None = None,
                 strict: bool = True) -> None:
        super().__init__()
        transformers = require("transformers")
        class_name, registers, size_kw = TRANSFORMERS_MODELS[arch["model_type"]]
        config = transformers.AutoConfig.for_model(**dict(arch))
        model_class = getattr(transformers, class_name)
        kwargs = {"add_pooling_layer": False} if class_name == "ViTModel" else {}
        self.loaded: dict[str, list[str]] | None = None
        if folder is None:
            self.net = model_class(config, **kwargs)
        else:
            # The library's own loader: it renames the tensors of older releases to its current
            # modules. From the local folder only, tensors only, with the config checked above.
            self.net, info = model_class.from_pretrained(
                str(folder), config=config, local_files_only=True, weights_only=True, trust_remote_code=False,
                output_loading_info=True, **kwargs,
            )
            _check_loading_info(info, folder, class_name, strict)
            self.loaded = info
        self.adapter = adapter
        self.pool = pool
        self.forward_kwargs = {size_kw: True} if size_kw else {}
        patch = int(config.patch_size if not isinstance(config.patch_size, (list, tuple)) else config.patch_size[0])
        self.patch_size = (patch, patch)
        self.num_prefix_tokens = 1 + int(getattr(config, registers, 0) if registers else 0)
        self.num_features = int(config.hidden_size) * (2 if pool == "token_avg" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # last_hidden_state is after the final layer norm (pooler_output is its class token).
        tokens = self.net(pixel_values=self.adapter(x), **self.forward_kwargs).last_hidden_state
        cls, patches = tokens[:, 0], tokens[:, self.num_prefix_tokens:]
        if self.pool == "token":
            return cls
        if self.pool == "avg":
            return patches.mean(dim=1)
        # DINOv2's linear evaluation: the class token beside the mean of the patch tokens.
        return torch.cat([cls, patches.mean(dim=1)], dim=1)


class OpenCLIPEncoder(FolderEncoder):
    def __init__(self, arch: Mapping[str, Any], adapter: GreyToRGB) -> None:
        super().__init__()
        require("open_clip")
        # Only the image tower is built: a text tower can name a hub model (BiomedCLIP's PubMedBERT)
        # that open_clip would download. open_clip exposes no public builder for the tower alone.
        from open_clip.model import _build_vision_tower

        vision = {**arch["vision_cfg"], "timm_model_pretrained": False, "output_tokens": False}
        self.net = _build_vision_tower(int(arch["embed_dim"]), vision, quick_gelu=bool(arch.get("quick_gelu")))
        self.adapter = adapter
        trunk = getattr(self.net, "trunk", None)
        if trunk is not None:  # a timm tower (BiomedCLIP)
            patch = getattr(getattr(trunk, "patch_embed", None), "patch_size", None)
            if patch is None:
                raise CheckpointError(
                    f"open_clip timm tower {vision.get('timm_model_name')!r} is not a vision transformer."
                )
            self.patch_size = (int(patch[0]), int(patch[1]))
            self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        else:
            self.patch_size = tuple(int(p) for p in self.net.patch_size)
            self.num_prefix_tokens = 1
            self.tokens_batch_first = bool(getattr(self.net.transformer, "batch_first", True))
        self.num_features = int(arch["embed_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


def _check_loading_info(info: Mapping[str, Any], folder: Path, class_name: str, strict: bool) -> None:
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, (list, tuple)) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched or (strict and unexpected):
        from cxr_lightning.models.weights import preview

        problems = [f"{what}: {preview(sorted(keys))}" for what, keys in
                    (("missing", missing), ("of another shape", mismatched), ("with no place", unexpected)) if keys]
        raise CheckpointError(
            f"backbone weights folder {folder} does not fit the {class_name} its config.json describes; tensors "
            + "; ".join(problems) + ". Is config.json the one published with these weights?"
            + (" backbone.weights_strict=false ignores tensors with no place." if not (missing or mismatched) else "")
        )
    if unexpected:
        log.warning("ignored %d tensors of %s with no place in %s", len(unexpected), folder, class_name)


def build_encoder(backbone: Mapping[str, Any]) -> FolderEncoder:
    """The encoder of a resolved folder-format config (see :func:`resolve`): its weights folder
    loaded when ``weights`` is set, random-initialised otherwise (a checkpoint then fills it)."""
    fmt, pool = backbone["format"], backbone.get("global_pool")
    where = f"backbone.arch_config of {backbone.get('name')}"
    adapter = GreyToRGB(float(backbone["mean"]), float(backbone["std"]),
                        _stats(backbone["channel_mean"], "channel_mean", where),
                        _stats(backbone["channel_std"], "channel_std", where))
    found = read_folder(fmt, backbone["weights"], backbone.get("weights_help")) if backbone.get("weights") else None
    strict = bool(backbone.get("weights_strict", True))
    if fmt == "transformers":
        if pool not in TRANSFORMERS_POOLS:
            raise ConfigError(f"backbone.global_pool={pool!r}: backbone.format=transformers pools by one of "
                              f"{list(TRANSFORMERS_POOLS)} (token: the class token; avg: mean of patch tokens).")
        folder = found["weights_file"].parent if found else None
        arch = check_transformers_config(backbone["arch_config"], where)
        return TransformersEncoder(arch, pool, adapter, folder, strict)
    if pool not in OPEN_CLIP_POOLS:
        raise ConfigError(f"backbone.global_pool={pool!r}: backbone.format=open_clip gives the model's image embedding "
                          f"(its own pooling and projection): use {list(OPEN_CLIP_POOLS)}.")
    encoder = OpenCLIPEncoder(check_open_clip_config(backbone["arch_config"], where), adapter)
    if found:
        from cxr_lightning.models.weights import load_folder_weights

        encoder.loaded = load_folder_weights(encoder, found["weights_file"], strict=strict)
    return encoder
