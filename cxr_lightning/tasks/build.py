"""Turn a composed Hydra config into the objects a task needs: data module, model, callbacks, and
the data module a checkpoint was trained on.

This is where ``_target_`` configs are instantiated; the library below (``data/``, ``models/``)
takes plain values and callables, and never imports Hydra.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cxr_lightning.data import sources
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.data.spec import DataSpec
from cxr_lightning.data.tables import meta_names, output_labels
from cxr_lightning.errors import CheckpointError, ConfigError, CXRError
from cxr_lightning.models.backbones import cam_layer_of
from cxr_lightning.models.module import CXRClassifier
from cxr_lightning.models.param_groups import GROUP_KEYS
from cxr_lightning.models.preprocess import DEFAULT_MEAN, DEFAULT_STD, UNIT_RANGE
from cxr_lightning.selection import selection_mode


def instantiate(cfg, **kwargs):
    """``hydra.utils.instantiate`` that lets the framework's own errors through unwrapped."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except hydra.errors.InstantiationException as exc:
        if isinstance(exc.__cause__, CXRError):
            raise exc.__cause__ from None
        raise


def data_spec(data: Mapping[str, Any] | DictConfig, **changes: Any) -> DataSpec:
    """The :class:`DataSpec` of a ``data`` config (its keys, without ``_target_``), validated once."""
    options = _plain(data) if isinstance(data, DictConfig) else dict(data)
    options.pop("_target_", None)
    return DataSpec.from_options(**{**options, **changes})


def build_datamodule(cfg: DictConfig) -> CXRDataModule:
    """The data module of ``cfg.data``, not set up: ``Trainer.fit`` runs its ``prepare_data`` (demo
    generation, image cache) on one process per node and then ``setup`` on every rank. Training
    samples carry their boxes when the loss is box-guided (``loss.box_weight > 0``)."""
    return CXRDataModule(data_spec(cfg.data, train_boxes=box_weight(cfg) > 0))


def box_weight(cfg: DictConfig) -> float:
    """``loss.box_weight`` (0: no box-guided training, and for configs without a loss: cache, bench)."""
    loss = cfg.get("loss")
    return float(loss.get("box_weight", 0.0) or 0.0) if loss is not None else 0.0


def build_model(cfg: DictConfig, dm: CXRDataModule | None = None) -> CXRClassifier:
    """The model of ``cfg``. Its labels and metadata layout follow from the data config alone; the
    training split's class weights and age fill come from ``dm`` when it is already set up, else
    from the Trainer's data module at ``setup`` (see :meth:`CXRClassifier.setup`)."""
    labels = expected_label_names(cfg.data)
    stats = {}
    if dm is not None and dm.tables is not None:
        stats = {
            "pos_frac": dm.label_stats["pos_frac"].tolist(),
            "age_fill": float(dm.age_fill),
            "sampler": dm.sampler_record,
        }
    backbone = resolve_backbone(_plain(cfg.backbone))
    backbone["cam_layer"] = cam_layer_of(backbone)
    config = _plain(cfg)
    config["backbone"]["cam_layer"] = backbone["cam_layer"]
    model = CXRClassifier(
        backbone=backbone,
        head=_plain(cfg.head),
        loss=_plain(cfg.loss),
        optimizer=_plain(cfg.optimizer),
        scheduler=_plain(cfg.get("scheduler")),
        label_names=labels,
        label_space=str(cfg.data.get("label_space") or "nih14"),
        meta_names=expected_meta_names(cfg.data),
        image_size=int(cfg.data.image_size),
        **preprocessing(backbone),
        channels_last=use_channels_last(cfg),
        config=config,
        optimizer_factory=optimizer_factory(cfg),
        scheduler_factory=scheduler_factory(cfg),
        **stats,
    )
    if cfg.get("compile", False) and model.backbone is not None:
        # In place: the state dict keeps its keys, so checkpoints load into uncompiled models.
        model.backbone.compile()
    return model


def with_cam_layer(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``backbone.cam_layer`` set to the layer its ``cam_stride`` picks, so the run's
    config.yaml and checkpoint name the layer itself."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.backbone.cam_layer = cam_layer_of(cfg.backbone)
    return cfg


def resolve_backbone(backbone: dict[str, Any]) -> dict[str, Any]:
    """The plain backbone config with what a folder format's weights folder says filled in
    (:func:`cxr_lightning.models.folders.resolve`)."""
    from cxr_lightning.models.folders import resolve

    return resolve(backbone)


def preprocessing(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """``mean``, ``std`` and ``input_range`` of a resolved backbone config (the framework's defaults where unset)."""
    mean, std = backbone.get("mean"), backbone.get("std")
    return {
        "mean": float(DEFAULT_MEAN if mean is None else mean),
        "std": float(DEFAULT_STD if std is None else std),
        "input_range": [float(v) for v in (backbone.get("input_range") or UNIT_RANGE)],
    }


def expected_label_names(data: DictConfig) -> list[str]:
    """The labels a data module built from ``data`` produces, from the config (and at most a lab's
    label table, for ``labels=union`` over its own names)."""
    return output_labels(data_spec(data))


def expected_meta_names(data: DictConfig) -> list[str]:
    """The metadata layout a data module built from ``data`` produces, from the config alone."""
    return meta_names(expected_label_names(data), bool(data.get("prior_labels", True)))


def optimizer_factory(cfg: DictConfig):
    """``params -> torch.optim.Optimizer`` from the ``optimizer`` config (``_target_``, ``_partial_``)."""
    return _partial(cfg.get("optimizer"), "optimizer", "optimizer=adam|adamw|sgd", drop=GROUP_KEYS)


def scheduler_factory(cfg: DictConfig):
    """``optimizer -> scheduler`` from the ``scheduler`` config, or None without one."""
    if cfg.get("scheduler") is None:
        return None
    return _partial(cfg.scheduler, "scheduler", "scheduler=plateau|cosine|warmup_cosine", drop=("interval",))


def _partial(node: Any, key: str, choices: str, drop: tuple[str, ...] = ()):
    if node is None or "_target_" not in node:
        raise ConfigError(f"{key} needs a _target_ (a class path) and _partial_: true; pick {choices}.")
    if not node.get("_partial_", False):
        raise ConfigError(f"{key}._partial_ must be true: the model passes the parameters (or optimizer) itself.")
    # ``drop``: keys the model reads itself (parameter groups, the scheduler's interval).
    node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in drop})
    try:
        return hydra.utils.instantiate(node)
    except hydra.errors.InstantiationException as exc:
        raise ConfigError(
            f"{key}._target_={node._target_}: {exc}. Pick {choices} or a class path that exists."
        ) from None


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def use_channels_last(cfg: DictConfig) -> bool:
    """The ``channels_last`` key: true, false, or auto (on when the trainer runs on a CUDA GPU)."""
    value = cfg.get("channels_last", "auto")
    if value == "auto":
        accelerator = str(cfg.trainer.get("accelerator", "auto"))
        return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if not isinstance(value, bool):
        raise ConfigError(f"channels_last={value!r}: expected true, false or auto.")
    return value


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The configured callbacks; every one monitoring ``selection.metric`` gets that metric's mode.
    Head-then-backbone fine-tuning is the model's own schedule (:mod:`cxr_lightning.models.finetune`),
    not a callback."""
    metric = cfg.selection.metric
    mode = selection_mode(metric)
    return [
        instantiate(c, mode=mode) if c.get("monitor") == metric else instantiate(c)
        for c in cfg.get("callbacks", {}).values()
        if c is not None
    ]


# --------------------------------------------------------------------------------------------------
# The data a checkpoint was trained on, or an external source it is scored on
# Always as trained: these define the split, the labels or the model's inputs.
SPLIT_DEFINING = frozenset(
    {"source", "sources", "demo", "image_size", "val_fraction", "test_fraction", "split_seed", "fold", "folds",
     "prior_labels", "drop_no_finding", "labels", "label_space", "age_fill", "only_splits", "boxes", "reader_vote"}
)
# An external source's data config: what its own conf/data/<source>.yaml says (where the files
# are, how to load them, its split settings); never the model's inputs, which the checkpoint owns.
EXTERNAL_KEYS = frozenset(
    {"source", "root", "label_table", "uncertain", "val_fraction", "test_fraction", "split_seed", "on_missing",
     "verify_images", "batch_size", "num_workers", "cache", "cache_dir", "max_pixels", "table", "columns", "label_map"}
)
# Every data.* key a config may give: DataSpec's fields and the keys of one source.
DATA_KEYS = frozenset(f.name for f in dataclasses.fields(DataSpec)) | {
    "source", "root", "label_table", "uncertain", "labels", "table", "columns", "label_map", "reader_vote"}


def external_choices() -> str:
    """``data=a|b|...``: the registered sources a checkpoint can be scored on besides its own."""
    return "data=" + "|".join(n for n in sources.names() if n not in ("demo", "nih"))


def data_overrides(data: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """The non-null ``data.*`` overrides of an evaluate/explain/compare job, checked: they may say
    where and how to load the data, never change the split or the model's inputs."""
    given = _given(data)
    chosen = {k: v for k, v in given.items() if v is not None}
    fixed = sorted(set(chosen) & SPLIT_DEFINING)
    if fixed:
        raise ConfigError(
            f"data override(s) {fixed} would change the split or the model's inputs; they always come from "
            "the checkpoint's training config. Only where and how to load the data can change; to score the "
            f"checkpoint on another dataset, name it: {external_choices()} data.root=DIR."
        )
    allowed = DATA_KEYS - SPLIT_DEFINING
    unknown = sorted(set(chosen) - allowed)
    if unknown:
        raise ConfigError(f"Unknown data override(s) {unknown}; the data options are {sorted(allowed)}.")
    return chosen


def external_source(model: CXRClassifier, data: Mapping[str, Any] | DictConfig | None) -> str | None:
    """The dataset named by ``data=<source>`` when it is not the one the checkpoint was trained on
    (then the checkpoint is scored externally), else None."""
    source = _given(data).get("source")
    if source is None:
        return None
    trained = (model.hparams.get("config") or {}).get("data", {}).get("source")
    if source == trained:
        raise ConfigError(
            f"data={source}: the checkpoint was trained on {source}; leave out data={source} to score it on its own "
            "split (data.root=DIR says where the files are)."
        )
    return str(source)


def datamodule_for(
    model: CXRClassifier,
    data: Mapping[str, Any] | DictConfig | None = None,
    cache_dir: str | None = None,
    splits: tuple[str, ...] | None = None,
) -> CXRDataModule:
    """The data module the checkpoint was trained on (its composed config) with the checked
    :func:`data_overrides` applied, prepared, set up and checked to give the model's inputs.

    With ``data=<source>`` naming another dataset (:func:`external_source`), that source as its
    config says instead, with the checkpoint's labels and label space (those the source lacks are
    unavailable, NaN), metadata layout, image size and age imputation. ``splits``: only those
    splits' rows and images must be on disk (evaluate; None: all).

    Where generated data (the demo) and image caches are written is this command's choice
    (``data.cache_dir=``, else ``cache_dir``, the command's ``paths.cache_dir``), never the folder
    the checkpoint's config names: that file may come from someone else."""
    trained = dict(model.hparams.config["data"]) if model.hparams.get("config") else {}
    # Where to write and how much to decode are this command's, never the file's to say.
    trained.pop("cache_dir", None)
    trained.pop("max_pixels", None)
    fixed = {"labels": list(model.hparams.label_names),
             "label_space": str(model.hparams.get("label_space") or trained.get("label_space") or "nih14")}
    if model.hparams.get("age_fill") is not None:
        fixed["age_fill"] = float(model.hparams.age_fill)
    if external_source(model, data) is not None:
        given = _given(data)
        cfg = {k: v for k, v in given.items() if k in EXTERNAL_KEYS and v is not None}
        cfg.update(
            fixed,
            prior_labels=bool(trained.get("prior_labels", True)),
            drop_no_finding=bool(trained.get("drop_no_finding", False)),
        )
    else:
        cfg = {**trained, **data_overrides(data), **fixed}
    if cache_dir is not None:
        cfg.setdefault("cache_dir", cache_dir)
    cfg["image_size"] = model.hparams.image_size
    cfg["only_splits"] = tuple(splits) if splits is not None else None
    dm = CXRDataModule(data_spec(cfg))
    dm.prepare_data()
    dm.setup("test")
    check_compatible(model, dm)
    return dm


def _given(data: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if isinstance(data, DictConfig):
        if data.get("source") is not None:
            # Key by key: an external source's config interpolates keys this job lacks (image_size,
            # from the backbone), which the checkpoint owns anyway.
            return {k: data[k] for k in data if k in EXTERNAL_KEYS}
        data = OmegaConf.to_container(data, resolve=True)
    return dict(data or {})


def check_compatible(model: CXRClassifier, dm: CXRDataModule) -> None:
    if list(dm.label_names) != list(model.hparams.label_names):
        raise CheckpointError(
            f"The checkpoint predicts {len(model.hparams.label_names)} labels {list(model.hparams.label_names)}, "
            f"the data gives {len(dm.label_names)} {list(dm.label_names)}; set data.drop_no_finding and labels= "
            "to match the checkpoint."
        )
    if list(dm.meta_names) != list(model.hparams.meta_names):
        raise CheckpointError(
            f"The checkpoint expects metadata {list(model.hparams.meta_names)}, the data gives {list(dm.meta_names)}; "
            "set data.prior_labels (and drop_no_finding) as in training."
        )
