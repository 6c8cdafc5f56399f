"""Checks of a composed config that run before any expensive work (data loading, model building).

:func:`validate_config` reads only the config, a folder listing and at most a checkpoint's
hyperparameters, so a typo fails in a second with a message that says what to pass instead,
not after the label table, the image index and a model have been built.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from cxr_lightning.checkpoints import checkpoint_hparams
from cxr_lightning.errors import CheckpointError, ConfigError, DataError
from cxr_lightning.models.heads import head_class
from cxr_lightning.models.param_groups import GROUP_KEYS
from cxr_lightning.selection import selection_mode
from cxr_lightning.tasks.build import (
    data_spec,
    expected_label_names,
    expected_meta_names,
    optimizer_factory,
    scheduler_factory,
)

log = logging.getLogger(__name__)
_warned: set[str] = set()


def validate_config(cfg: DictConfig, ckpt_path: str | os.PathLike | None = None) -> None:
    """Raise ConfigError/DataError/CheckpointError for a config that cannot run; ``ckpt_path`` is the
    checkpoint a fit will continue from (see :func:`cxr_lightning.faults.resolve_resume`)."""
    check_instantiated_keys(cfg)
    check_data_root(cfg.data)
    check_backbone(cfg.backbone, int(cfg.data.image_size))
    check_head(cfg.head.name)
    check_loss(cfg.loss.name)
    check_optimizer(cfg)
    _check_metadata_use(cfg)
    check_finetuning(cfg.backbone)
    check_selection(cfg)
    if ckpt_path:
        check_checkpoint_fits(cfg, ckpt_path)


# Keys of an instantiated config that Hydra reads itself, and those the model reads from the
# optimizer and scheduler configs rather than passing them to the class.
_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})
_READ_BY_MODEL = {"optimizer": frozenset(GROUP_KEYS), "scheduler": frozenset({"interval"})}


def check_instantiated_keys(cfg: DictConfig) -> None:
    """Every key of a config built by ``_target_`` (trainer, optimizer, scheduler, data, each
    callback and logger) is an argument of its class, so a typo such as
    ``+trainer.max_epoch=2`` is named with its close matches before anything is built, rather than
    ending in a TypeError from the class."""
    nodes = [(name, cfg.get(name)) for name in ("trainer", "optimizer", "scheduler", "data")]
    for group in ("callbacks", "logger"):
        nodes += [(f"{group}.{k}", v) for k, v in (cfg.get(group) or {}).items()]
    for where, node in nodes:
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        accepted = _arguments(str(node._target_))
        if accepted is None:
            continue
        extra = set(_READ_BY_MODEL.get(where, ())) | _HYDRA_KEYS
        unknown = [str(k) for k in node.keys() if k not in accepted and k not in extra]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(accepted), n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(f'{where}.{c}' for c in close)}?)" if close else ""
            raise ConfigError(
                f"{where}.{key}: {node._target_} takes no argument {key!r}{hint}; remove it or fix its name."
            )


def _arguments(target: str) -> set[str] | None:
    """The keyword arguments ``target`` (a class or function path) takes; None when it takes any
    (``**kwargs``) or cannot be located (Hydra then says so when it instantiates)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        signature = inspect.signature(obj)
    except Exception:  # noqa: BLE001 -- a missing module or an unreadable signature: instantiation reports it
        return None
    from cxr_lightning.data.datamodule import CXRDataModule

    if obj is CXRDataModule:  # takes the data options as **options: DataSpec's keys
        from cxr_lightning.tasks.build import DATA_KEYS

        return set(DATA_KEYS)
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_selection(cfg: DictConfig) -> None:
    """``selection.metric`` is a known metric, and a Hydra sweeper optimises it in its own direction."""
    mode = selection_mode(cfg.selection.metric)
    from hydra.core.hydra_config import HydraConfig

    direction = HydraConfig.get().sweeper.get("direction") if HydraConfig.initialized() else None
    if direction is not None and str(direction).lower() != {"min": "minimize", "max": "maximize"}[mode]:
        raise ConfigError(
            f"hydra.sweeper.direction={direction} but selection.metric={cfg.selection.metric} "
            f"is best at its {mode}imum: "
            f"set hydra.sweeper.direction={'minimize' if mode == 'min' else 'maximize'} "
            "or choose another selection.metric."
        )



def check_finetuning(backbone: DictConfig) -> None:
    """The head-then-backbone schedule (models/finetune.py) is one the model can follow; it runs the
    same on one device or under DDP (the backbone's parameters are registered from the start)."""
    at, scale = backbone.get("unfreeze_at_epoch"), backbone.get("finetune_lr_scale", 0.1)
    if at is None:
        return
    if not isinstance(at, int) or isinstance(at, bool) or at < 0:
        raise ConfigError(f"backbone.unfreeze_at_epoch={at!r}: expected an epoch number (0, 1, ...) or null.")
    if not backbone.get("freeze"):
        raise ConfigError(
            f"backbone.unfreeze_at_epoch={at} without backbone.freeze=true: the backbone trains from epoch 0 "
            "anyway. Pass backbone.freeze=true to train the head alone first, or backbone.unfreeze_at_epoch=null."
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ConfigError(f"backbone.finetune_lr_scale={scale!r}: expected a positive number (the backbone's lr / lr).")


def check_data_root(data: DictConfig) -> None:
    """The data options make a :class:`~cxr_lightning.data.spec.DataSpec`, and every source's root
    exists (NIH's holds its label table; a demo without a root is generated later)."""
    from cxr_lightning.data import nih

    if OmegaConf.is_missing(data, "root"):  # data/nih.yaml says root: ???
        data = OmegaConf.merge(data, {"root": None})
    for s in data_spec(data).sources:
        where = f"data.sources.{s.name}.root" if s.name != s.source else "data.root"
        if not s.nih_layout:
            if not s.root or not s.root.is_dir():
                raise ConfigError(f"data={s.source} needs {where}=DIR, an existing folder holding the {s.source} "
                                  f"download (got {str(s.root) if s.root else None!r}); "
                                  "see the README's datasets sections.")
            continue
        if not s.root:
            continue  # the demo, generated on first use
        if s.label_table == "auto":
            nih.find_label_table(s.root)  # DataError: which files NIH provides, where they go
            continue
        path = s.root / s.label_table
        if not path.is_file():
            raise DataError(
                f"data.label_table={s.label_table}: {path} does not exist. Put the table in {where} or pass "
                f"data.label_table=auto to use the first of {list(nih.LABEL_TABLES)} found there."
            )


def check_backbone(backbone: DictConfig, image_size: int) -> None:
    from cxr_lightning.models import folders
    from cxr_lightning.models.backbones import cam_layer_of, check_name_and_pool
    from cxr_lightning.models.reshape import CAM_RESHAPES
    from cxr_lightning.models.weights import WEIGHT_SOURCES

    name = str(backbone.name)
    fmt = backbone.get("format", "timm") or "timm"
    if fmt not in folders.FORMATS:
        raise ConfigError(f"backbone.format={fmt!r} is unknown; use one of {list(folders.FORMATS)}.")
    required = fmt != "timm" or bool(backbone.get("weights_required", False))
    if OmegaConf.is_missing(backbone, "weights") or (required and backbone.get("weights") is None):
        raise ConfigError(
            f"backbone={name} needs its weights: pass backbone.weights=PATH. "
            + str(backbone.get("weights_help")
                  or "(a state dict file, or a timm / Hugging Face folder; see docs/backbones.md)")
        )
    if fmt == "timm":
        check_name_and_pool(name, backbone.get("global_pool", "avg"))
    else:
        # Reads the folder's JSON configs only: a wrong folder fails before any data is read.
        resolved = folders.resolve(OmegaConf.to_container(backbone, resolve=True))
        folders.check_input_size(resolved, image_size)
    minimum = int(backbone.get("min_input_size", 32))
    if image_size < minimum:
        raise ConfigError(
            f"data.image_size={image_size} is below {name}'s minimum input size of {minimum} px; "
            f"pass data.image_size={minimum} or larger."
        )
    multiple = int(backbone.get("input_multiple") or 1)
    if image_size % multiple:
        lower, upper = image_size // multiple * multiple, (image_size // multiple + 1) * multiple
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of {multiple}, which {name} needs "
            f"(backbone.input_multiple: its patch grid and stage maps must cover the image exactly, or "
            f"the CAMs shift against it); pass data.image_size={lower if lower >= minimum else upper} or {upper}."
        )
    source = backbone.get("weights_source", "auto")
    if source not in WEIGHT_SOURCES:
        raise ConfigError(f"backbone.weights_source={source!r} is unknown; use one of {list(WEIGHT_SOURCES)}.")
    if OmegaConf.is_missing(backbone, "weights") or (
        source not in ("auto", "timm") and backbone.get("weights") is None
    ):
        raise ConfigError(
            f"backbone.weights_source={source} needs its weights: pass backbone.weights=PATH (a state dict file, "
            "or a timm / Hugging Face folder; see notes/backbones.md for the layouts)."
        )
    cam_layer = cam_layer_of(backbone)
    reshape = backbone.get("cam_reshape")
    if reshape is not None and reshape not in CAM_RESHAPES:
        raise ConfigError(f"backbone.cam_reshape={reshape!r} is unknown; use one of {list(CAM_RESHAPES)} or null.")
    if fmt == "timm":  # a folder format's encoder is checked from its folder's config above
        check_backbone_builds(backbone, image_size, cam_layer)


def check_backbone_builds(backbone: DictConfig, image_size: int, cam_layer: str) -> None:
    """timm builds the network with these options, and it has the CAM layer: built on the meta
    device (shapes only, no memory, no weights), so an experiment's option that this backbone
    lacks (stochastic depth, a pooling, a layer name) is refused now, in one line."""
    from cxr_lightning.models.backbones import takes_input_size

    name, drop_path = str(backbone.name), float(backbone.get("drop_path_rate", 0.0) or 0.0)
    size = image_size if takes_input_size(name) else None
    problem = _build_problem(name, str(backbone.get("global_pool", "avg")), drop_path, size, cam_layer)
    if problem is not None:
        raise ConfigError(problem)


@functools.lru_cache(maxsize=64)
def _build_problem(name: str, global_pool: str, drop_path: float, image_size: int | None, cam_layer: str) -> str | None:
    # Cached: a sweep validates the same backbone once per job.
    import torch

    from cxr_lightning.models.backbones import create_backbone

    try:
        with torch.device("meta"):
            built = create_backbone(name, global_pool=global_pool, drop_path_rate=drop_path, img_size=image_size)
        built.get_layer(cam_layer)
    except ConfigError as exc:
        if drop_path and "drop_path_rate" in str(exc):
            return (f"backbone.drop_path_rate={drop_path}: timm's {name} has no stochastic depth; pass "
                    "backbone.drop_path_rate=0.0, or a backbone that has it (resnet, efficientnet, convnext, "
                    "vit, swin).")
        return str(exc)
    return None


def check_head(name: str) -> None:
    head_class(name)


def check_loss(name: str) -> None:
    from cxr_lightning.losses import LOSSES

    if name not in LOSSES:
        raise ConfigError(f"loss.name={name!r} is unknown; valid losses: {sorted(LOSSES)} (loss=<name>).")


def check_optimizer(cfg: DictConfig) -> None:
    """The optimizer (and scheduler) configs build, and accept their arguments, on a stand-in parameter."""
    import torch

    layer_decay = cfg.optimizer.get("layer_decay")
    if layer_decay is not None and not 0 < float(layer_decay) <= 1:
        raise ConfigError(
            f"optimizer.layer_decay={layer_decay}: must be in (0, 1] (BEiT/MAE recipes: 0.65-0.75), or null."
        )
    probe = [torch.nn.Parameter(torch.zeros(1))]
    try:
        optimizer = optimizer_factory(cfg)(probe)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer={OmegaConf.to_container(cfg.optimizer)}: {exc}") from None
    make_scheduler = scheduler_factory(cfg)
    if make_scheduler is not None:
        try:
            make_scheduler(optimizer)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"scheduler={OmegaConf.to_container(cfg.scheduler, resolve=True)}: {exc}") from None


def check_checkpoint_fits(cfg: DictConfig, ckpt_path: str | os.PathLike) -> None:
    """The checkpoint a fit continues from has this config's labels, metadata, backbone and head."""
    hparams = checkpoint_hparams(ckpt_path, trust=bool(cfg.get("trust_checkpoint", False)))
    problems = []
    labels = expected_label_names(cfg.data)
    if list(hparams["label_names"]) != labels:
        problems.append(
            f"it predicts {len(hparams['label_names'])} labels, this config {len(labels)} "
            "(set data.drop_no_finding as in that run)"
        )
    meta = expected_meta_names(cfg.data)
    if list(hparams.get("meta_names", [])) != meta:
        problems.append(
            f"it expects metadata {_short(hparams.get('meta_names', []))}, this config gives {_short(meta)} "
            "(set data.prior_labels and data.drop_no_finding as in that run)"
        )
    for group in ("backbone", "head"):
        trained = (hparams.get(group) or {}).get("name")
        if trained is not None and trained != cfg[group].name:
            problems.append(f"it was trained with {group}.name={trained}, this config asks for {cfg[group].name}")
    if problems:
        raise CheckpointError(
            f"Cannot continue training from {ckpt_path}: " + "; ".join(problems)
            + ". Use the checkpoint's settings, or start a new run (resume=null ckpt_path=null)."
        )


def _check_metadata_use(cfg: DictConfig) -> None:
    head = head_class(cfg.head.name)
    if cfg.data.get("prior_labels", True) and not getattr(head, "uses_meta", True):
        _warn_once(
            f"head={cfg.head.name} ignores metadata, so data.prior_labels=true only adds inputs the model "
            "never reads; use head=fusion or fusion_residual to learn from prior visits."
        )


def _warn_once(message: str) -> None:
    # Once per process: a sweep running many fits in one process should not repeat it.
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return f"{names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)} values)"
