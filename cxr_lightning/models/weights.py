"""Backbone weights from local files, in the layouts chest-X-ray weights are published in.

Sources (``backbone.weights_source``):

* ``timm`` (also torchvision): a state dict file, or a timm / Hugging Face folder saved for
  offline use (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, e.g. a
  ``save_pretrained``/``push_to_hf_hub`` folder or a hub cache's ``models--org--name``);
* ``torchxrayvision``: the state dict of a torchxrayvision DenseNet-121 (``features.*``, a
  ``classifier`` for its 18 outputs, ``op_threshs``; one input channel);
* ``mae``: an MAE-style ViT checkpoint (``model``/``state_dict`` wrapper, decoder and mask token
  beside the encoder; position embeddings for the pretraining size);
* ``auto``: ``mae`` when the file holds an MAE decoder, else ``timm``.

Nothing is unpickled: files are read with safetensors or ``torch.load(weights_only=True)``
(torchxrayvision's and CheXNet's released files are pickled whole models; convert them to a
state dict once, where you trust them; see notes/backbones.md). Loading is strict: any backbone
tensor the file lacks and, unless ``strict=False``, any file tensor with no place in the backbone
is refused with the keys named, since a partial load trains on random layers without a sign.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv, load_state_dict
from torch import nn

from cxr_lightning.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

WEIGHT_SOURCES: tuple[str, ...] = ("auto", "timm", "torchxrayvision", "mae")
WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")
# Weight files of a timm / Hugging Face folder, preferred first (safetensors cannot hold code).
FOLDER_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")

# Names timm gives the functions that convert foreign (e.g. torchvision) layouts of a model family's
# weights; timm applies them to every checkpoint it downloads, we apply them to local files too.
_TIMM_FILTER_FN_NAMES = ("checkpoint_filter_fn", "_filter_fn", "_filter_torchvision_pretrained")
# MAE's pretraining-only tensors: the decoder and the token standing in for masked patches.
_MAE_PRETRAIN_ONLY = ("decoder_", "mask_token")

StateDict = dict[str, torch.Tensor]


@dataclass
class WeightsReport:
    """What a load did: the tensors loaded, dropped on purpose (classifiers, decoders), resized
    (position embeddings, first convolution), left at initialisation by design (``fresh``, e.g.
    MAE fine-tuning's new ``fc_norm``), and the file's tensors with no place (``unexpected``)."""

    path: str
    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded from {self.path} ({self.source})"]
        for what, keys in (("dropped", self.dropped), ("resized", self.resized),
                           ("left at initialisation", self.fresh), ("ignored (unexpected)", self.unexpected)):
            if keys:
                parts.append(f"{what}: {preview(keys)}")
        return "; ".join(parts)


def load_backbone_weights(
    model: nn.Module, path: str | Path, source: str = "auto", strict: bool = True, timm_name: str | None = None
) -> WeightsReport:
    """Load local weights in ``source`` layout into timm ``model``; see the module docstring.

    Raises CheckpointError naming the missing (and, when ``strict``, unexpected) keys.
    """
    if source not in WEIGHT_SOURCES:
        raise ConfigError(f"backbone.weights_source={source!r} is unknown; use one of {list(WEIGHT_SOURCES)}.")
    path = Path(path).expanduser()
    state_dict, path = read_weights(path, timm_name)
    if source == "auto":
        source = "mae" if any(k.startswith(_MAE_PRETRAIN_ONLY) for k in state_dict) else "timm"
    report = WeightsReport(path=str(path), source=source)
    state_dict, expected_missing = _REMAPS[source](model, state_dict, report)
    _adapt_first_conv(model, state_dict, report)
    _drop_classifier(model, state_dict, report)
    _load(model, state_dict, report, expected_missing, strict)
    log.info("backbone weights: %s", report.summary())
    return report


def read_weights(path: Path, timm_name: str | None = None) -> tuple[StateDict, Path]:
    """The tensors of a weights file or timm / Hugging Face folder, and the file they came from."""
    if path.is_dir():
        path = _folder_weights(path, timm_name)
    elif not path.is_file():
        raise CheckpointError(
            f"backbone weights file {path} does not exist; fix backbone.weights or set backbone.weights=null."
        )
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"backbone weights file {path}: expected one of {list(WEIGHT_SUFFIXES)}, or a folder holding "
            f"config.json and one of {list(FOLDER_FILES)}."
        )
    return read_state_dict(path), path


def read_state_dict(path: Path) -> StateDict:
    """The tensors of one weights file, unpickling nothing."""
    try:
        # timm's loader: torch.load(weights_only=True) or safetensors; unwraps "state_dict"/"model"
        # entries (EMA weights first) and strips DDP/compile prefixes.
        state_dict = load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 -- pickle, zip and safetensors errors differ
        raise CheckpointError(
            f"cannot read backbone weights file {path} ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
            "it must be a tensor-only state dict saved with torch.save(model.state_dict()) or safetensors "
            "(pickled whole models are refused: loading them runs code from the file)."
        ) from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"backbone weights file {path} does not hold a state dict of tensors.")
    return dict(state_dict)


def _folder_weights(folder: Path, timm_name: str | None) -> Path:
    snapshots = sorted((folder / "snapshots").glob("*/")) if (folder / "snapshots").is_dir() else []
    if snapshots:  # a Hugging Face hub cache entry, models--org--name/snapshots/<revision>/
        folder = snapshots[-1]
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"backbone weights folder {folder} has no config.json: a timm / Hugging Face folder saved for "
            f"offline use holds config.json and one of {list(FOLDER_FILES)}."
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {config_file}: {err}") from err
    if "architecture" not in config and "model_type" in config:
        raise CheckpointError(
            f"{folder} is a Hugging Face transformers folder (model_type={config['model_type']!r}); its tensors "
            "are named for transformers, not timm. Load it with backbone.format=transformers (e.g. backbone=rad_dino), "
            "or use the timm copy of the model (hub id timm/<name>, saved with timm's save_for_hf "
            "or a hub cache of it)."
        )
    architecture = config.get("architecture")
    if timm_name is not None and architecture is not None and architecture.split(".")[0] != timm_name:
        raise CheckpointError(
            f"backbone weights folder {folder} holds {architecture!r} (config.json), the backbone is "
            f"{timm_name!r}; set backbone.name={architecture.split('.')[0]} or point backbone.weights elsewhere."
        )
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"backbone weights folder {folder} has config.json but none of {list(FOLDER_FILES)}.")


# ------------------------------------------------------------------------------------------------
# Per-source remapping: (model, state dict, report) -> (state dict in timm layout, keys of the
# model the source does not provide by design)
def _timm(model: nn.Module, state_dict: StateDict, report: WeightsReport) -> tuple[StateDict, set[str]]:
    module = sys.modules.get(type(model).__module__)
    filter_fn = next((getattr(module, n) for n in _TIMM_FILTER_FN_NAMES if hasattr(module, n)), None)
    if filter_fn is None:
        return state_dict, set()
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    try:
        converted = filter_fn(state_dict, model)
    except TypeError:  # timm's older filters take the state dict alone (as timm's own loader allows)
        converted = filter_fn(state_dict)
    report.resized += [k for k, v in converted.items() if k in shapes and tuple(v.shape) != shapes[k]]
    return converted, set()


def _torchxrayvision(model: nn.Module, state_dict: StateDict, report: WeightsReport) -> tuple[StateDict, set[str]]:
    problems = []
    if "features.conv0.weight" not in state_dict:
        problems.append(f"{report.path} has no features.conv0.weight")
    if not type(model).__name__.startswith("DenseNet"):
        problems.append(f"the backbone is {type(model).__name__}")
    if problems:
        raise CheckpointError(
            "backbone.weights_source=torchxrayvision reads torchxrayvision's DenseNet layout (features.*, classifier), "
            f"but {' and '.join(problems)}. Use backbone.name=densenet121 with a torchxrayvision "
            "densenet121-res224-* state dict."
        )
    # Its 18-output classifier and operating-point thresholds belong to its own head.
    dropped = [k for k in state_dict if k.startswith("classifier.") or k == "op_threshs"]
    report.dropped += dropped
    # Its features are named as torchvision's and timm's DenseNet (timm's filter fixes old spellings).
    return _timm(model, {k: v for k, v in state_dict.items() if k not in dropped}, report)


def _mae(model: nn.Module, state_dict: StateDict, report: WeightsReport) -> tuple[StateDict, set[str]]:
    if not hasattr(model, "patch_embed") or "pos_embed" not in state_dict:
        raise CheckpointError(
            "backbone.weights_source=mae reads a ViT encoder (pos_embed, patch_embed, blocks) into a ViT backbone; "
            + (
                f"{report.path} has no pos_embed."
                if "pos_embed" not in state_dict
                else f"{type(model).__name__} is no ViT."
            )
        )
    dropped = [k for k in state_dict if k.startswith(_MAE_PRETRAIN_ONLY)]
    report.dropped += dropped
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    fresh: set[str] = set()
    if isinstance(model.norm, nn.Identity) and not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        # Average pooling: MAE fine-tuning replaces the encoder's final norm by a new one after the pool.
        report.dropped += [k for k in state_dict if k.startswith("norm.")]
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("norm.")}
        fresh = {k for k in model.state_dict() if k.startswith("fc_norm.")}
        report.fresh += sorted(fresh)
    target = model.pos_embed
    if state_dict["pos_embed"].shape != target.shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
        report.resized.append("pos_embed")
    return state_dict, fresh


_REMAPS: dict[str, Callable[[nn.Module, StateDict, WeightsReport], tuple[StateDict, set[str]]]] = {
    "timm": _timm,
    "torchxrayvision": _torchxrayvision,
    "mae": _mae,
}


def _adapt_first_conv(model: nn.Module, state_dict: StateDict, report: WeightsReport) -> None:
    for conv_name in cfg_names(model, "first_conv"):
        key = f"{conv_name}.weight"
        if key not in state_dict:
            continue
        target_chans = model.get_submodule(conv_name).weight.shape[1]
        source = state_dict[key]
        if source.ndim == 4 and source.shape[1] != target_chans:
            state_dict[key] = adapt_input_conv(target_chans, source, base_chans=source.shape[1])
            report.resized.append(key)


def _drop_classifier(model: nn.Module, state_dict: StateDict, report: WeightsReport) -> None:
    # The classifier is replaced by our head; VGG's fc block is removed by the backbone factory.
    heads = tuple(f"{c}." for c in cfg_names(model, "classifier"))
    if isinstance(getattr(model, "pre_logits", None), nn.Identity):
        heads += ("pre_logits.",)
    dropped = [k for k in state_dict if k.startswith(heads)] if heads else []
    for key in dropped:
        del state_dict[key]
    report.dropped += dropped


def _load(
    model: nn.Module, state_dict: StateDict, report: WeightsReport, expected_missing: set[str], strict: bool,
) -> None:
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches: the file is for another architecture or width
        detail = " ".join(str(err).split())  # torch lists one mismatch per line
        raise CheckpointError(
            f"backbone weights file {report.path} does not fit {arch(model)} "
            f"(is it for another architecture?): {detail}"
        ) from err
    # BatchNorm's step counter is no learned weight: old torchvision files lack it, and timm's key
    # conversions of old layouts leave it under the old name.
    counter = "num_batches_tracked"
    missing = [k for k in result.missing_keys if not k.endswith(counter) and k not in expected_missing]
    report.unexpected = [k for k in result.unexpected_keys if not k.endswith(counter)]
    report.loaded = len(state_dict) - len(result.unexpected_keys)
    if missing or (strict and report.unexpected):
        problems = []
        if missing:
            problems.append(f"it lacks {len(missing)} of the tensors of {arch(model)}: {preview(missing)}")
        if report.unexpected:
            problems.append(f"it has {len(report.unexpected)} tensors {arch(model)} has no place for: "
                            f"{preview(report.unexpected)}")
        raise CheckpointError(
            f"backbone weights file {report.path} ({report.source} layout) does not match the backbone: "
            + "; ".join(problems)
            + f". Is it a {report.source} state dict of that architecture? Set backbone.weights_source to the "
            f"file's layout ({'|'.join(WEIGHT_SOURCES[1:])})"
            + ("; backbone.weights_strict=false ignores unexpected tensors." if not missing else ".")
        )
    if report.unexpected:
        log.warning("ignored %d tensors of %s that %s has no place for: %s",
                    len(report.unexpected), report.path, arch(model), preview(report.unexpected))


def load_folder_weights(encoder: nn.Module, path: Path, strict: bool = True) -> WeightsReport:
    """Load an open_clip weights file's image tower into ``encoder.net``
    (:class:`~cxr_lightning.models.folders.OpenCLIPEncoder`), with the checks of a timm load: a
    tensor the tower lacks is refused, and one with no place too unless ``strict=False``."""
    state = read_state_dict(path)
    prefix = "visual."  # the image tower; the text tower and the logit scale are left out on purpose
    if not any(k.startswith(prefix) for k in state):
        raise CheckpointError(f"{path} has no visual.* tensors: it is not an open_clip model's state dict.")
    state_dict = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = sorted(k for k in state if not k.startswith(prefix))
    report = WeightsReport(path=str(path), source="open_clip", dropped=dropped)
    _load(encoder.net, state_dict, report, set(), strict)
    log.info("backbone weights: %s", report.summary())
    return report


def cfg_names(model: nn.Module, key: str) -> tuple[str, ...]:
    """The module names timm's ``pretrained_cfg`` gives under ``key`` (first_conv, classifier)."""
    value = (getattr(model, "pretrained_cfg", None) or {}).get(key)
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def arch(model: nn.Module) -> str:
    """timm's architecture name of ``model`` (its class name without a pretrained_cfg)."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def preview(keys: list[str], n: int = 8) -> str:
    """The first ``n`` of ``keys``, and how many there are in all."""
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
