"""Throughput benchmark: ``python -m cxr_lightning.bench [bench.quick=true] [key=value ...]``.

Answers, for the machine it runs on, whether the loader or the accelerator sets the pace, and how
long the six-backbone comparison would take on the full dataset:

- loader images/s from PNG (decode + resize every image) and from the image cache (a copy of one
  memory-map row), on the same 1024-px demo chests, in one process and with the loader's workers;
- training-step images/s of each backbone at its input size through Lightning, fed synthetic
  batches already on the device (the model's own cost) and fed by the cache-backed loader (the
  difference is the loader's cost); on a GPU in fp32 and in bf16 + channels_last; plus forward-only
  (validation) images/s and peak memory;
- the estimated hours of the comparison from these figures, with the cache and from PNG.

It prints tables and writes ``bench.json`` into the run directory. On a CPU the step figures come
from a couple of steps at a small batch and only say that the code runs.
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import platform
import resource
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, RandomSampler, default_collate

from cxr_lightning import files
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import ConfigError
from cxr_lightning.tasks.build import build_model, instantiate

log = logging.getLogger(__name__)

# (label, Lightning precision, channels_last, compile): the step configurations a device is timed in.
GPU_MODES = (("fp32", "32-true", False, False), ("bf16+CL", "bf16-mixed", True, False))
GPU_COMPILE_MODE = ("bf16+CL+compile", "bf16-mixed", True, True)
CPU_MODES = (("fp32", "32-true", False, False),)


@dataclass
class StepFigure:
    """One timed configuration: ``feed`` is ``synthetic`` (batches already on the device) or
    ``cache`` (the data module's cache-backed loader); ``stage`` is ``train`` or ``eval``."""

    backbone: str
    image_size: int
    batch_size: int
    mode: str
    feed: str
    stage: str
    step_ms: float
    images_per_second: float
    peak_memory_mib: float


# ------------------------------------------------------------------------------------------------
# The machine
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------
# Loaders
def sampled_loader(dm: CXRDataModule, split: str, batches: int) -> DataLoader:
    """The data module's own loader for ``split``, drawing ``batches`` full batches at random with
    replacement: one long epoch whatever the split's size, so no epoch boundary is timed."""
    n = len(dm.split_table(split))
    sampler = RandomSampler(range(n), replacement=True, num_samples=batches * dm.batch_size,
                            generator=torch.Generator().manual_seed(0))
    return dm.loader(split, shuffle=False, sampler=sampler)


def loader_images_per_second(dm: CXRDataModule, batches: int) -> float:
    """Images/s the train loader delivers; the first batch of each worker (start-up) is not timed.

    Without workers the loading runs on one torch thread, as in a worker (PyTorch gives each one
    thread): collating on several threads of a busy machine measures contention, not loading."""
    warmup = max(1, dm.num_workers)
    loader = sampled_loader(dm, "train", warmup + batches)
    images, started = 0, 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if dm.num_workers == 0 else threads)
    try:
        for i, batch in enumerate(loader):
            if i == warmup - 1:
                started = time.perf_counter()
            elif i >= warmup:
                images += len(batch["index"])
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    del loader
    return images / elapsed


def loader_figures(cfg: DictConfig, size: int) -> list[dict[str, Any]]:
    """PNG and cache loader images/s at ``size``, in this process and with the configured workers."""
    rows = []
    workers = sorted({0, int(cfg.data.num_workers)})
    for source, batches in (("png", cfg.bench.loader.png_batches), ("cache", cfg.bench.loader.cache_batches)):
        for w in workers:
            dm = datamodule(cfg, size, cache=source == "cache", num_workers=w)
            ips = loader_images_per_second(dm, int(batches))
            rows.append({"image_size": size, "source": source, "workers": w, "images_per_second": ips,
                         "images_per_second_per_process": ips / max(1, w)})
    return rows


def datamodule(cfg: DictConfig, size: int, cache: bool, num_workers: int | None = None,
               batch_size: int | None = None) -> CXRDataModule:
    overrides = {"image_size": size, "cache": cache}
    if num_workers is not None:
        overrides["num_workers"] = num_workers
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    dm: CXRDataModule = instantiate(cfg.data, _convert_="all", **overrides)
    dm.prepare_data()  # generates the demo images and builds the cache once; reused afterwards
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------------
# Training steps
class _Feed(pl.LightningDataModule):
    """A loader chosen by the benchmark with ``dm``'s training augmentation, which the model's
    preprocessing applies, so the synthetic and the real feed differ in the loader only."""

    def __init__(self, dm: CXRDataModule, loader: Any) -> None:
        super().__init__()
        self.loader, self.augment = loader, dm.augment

    def train_dataloader(self) -> Any:
        return self.loader

    def val_dataloader(self) -> Any:
        return self.loader


class _Repeat:
    """``n`` shallow copies of one device batch (copies: on_after_batch_transfer replaces its image)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict]:
        return (dict(self.batch) for _ in range(self.n))


class _StepClock(pl.Callback):
    """Wall time of batches ``warmup .. warmup + steps - 1`` (train or eval), device synchronised."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.started = self.stopped = None

    def _tick(self, batch_idx: int) -> None:
        if batch_idx == self.warmup - 1:
            _synchronize()
            self.started = time.perf_counter()
        elif batch_idx == self.warmup + self.steps - 1:
            _synchronize()
            self.stopped = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tick(batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tick(batch_idx)

    @property
    def seconds(self) -> float:
        if self.started is None or self.stopped is None:
            raise RuntimeError("the timed steps did not all run")
        return self.stopped - self.started


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(
    cfg: DictConfig,
    dm: CXRDataModule,
    backbone: Mapping[str, Any],
    mode: tuple[str, str, bool, bool],
    feed: str,
    stage: str,
    device: str,
    warmup: int,
    steps: int,
) -> StepFigure:
    """Time ``steps`` Lightning training (or validation) steps after ``warmup`` untimed ones."""
    label, precision, channels_last, compile_ = mode
    run_cfg = OmegaConf.create({
        "data": {**OmegaConf.to_container(cfg.data, resolve=True), "image_size": dm.image_size},
        "backbone": dict(backbone), "head": cfg.head, "loss": cfg.loss, "optimizer": cfg.optimizer,
        "channels_last": channels_last, "compile": compile_,
    })
    model = build_model(run_cfg, dm)
    n = warmup + steps
    if feed == "synthetic":
        dataset = dm.dataset("train")
        rows = torch.randint(len(dataset), (dm.batch_size,), generator=torch.Generator().manual_seed(0))
        one = default_collate([dataset[int(i)] for i in rows])
        loader: Any = _Repeat({k: v.to(device) for k, v in one.items()}, n)
    else:
        loader = sampled_loader(dm, "train", n)
    clock = _StepClock(warmup, steps)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
        max_epochs=1, max_steps=n, limit_val_batches=n if stage == "eval" else 0, num_sanity_val_steps=0,
        benchmark=device == "cuda", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=[clock],
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    feeder = _Feed(dm, loader)
    if stage == "train":
        trainer.fit(model, datamodule=feeder)
    else:
        trainer.validate(model, datamodule=feeder, verbose=False)
    seconds = clock.seconds
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mib()
    del trainer, feeder, loader, model
    gc.collect()
    return StepFigure(
        backbone=str(backbone["name"]), image_size=dm.image_size, batch_size=dm.batch_size, mode=label, feed=feed,
        stage=stage, step_ms=1000 * seconds / steps, images_per_second=steps * dm.batch_size / seconds,
        peak_memory_mib=peak,
    )


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB. The process's high-water mark: it never goes down.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# The estimate
def comparison_hours(train_ips: float, eval_ips: float, estimate: Mapping[str, Any]) -> float:
    """Hours of one backbone's run: ``epochs`` x (train split at ``train_ips`` + val split at
    ``eval_ips``) + the test list at ``eval_ips``."""
    train_val, epochs = float(estimate["train_val_images"]), float(estimate["epochs"])
    val = train_val * float(estimate["val_fraction"])
    seconds = epochs * ((train_val - val) / train_ips + val / eval_ips) + float(estimate["test_images"]) / eval_ips
    return seconds / 3600


def estimate_rows(figures: list[StepFigure], loader: list[dict[str, Any]], estimate: Mapping[str, Any],
                  workers: int) -> list[dict[str, Any]]:
    """Per backbone, in the mode its loader-fed steps were timed in: hours with the cache-backed
    loader (as measured) and from PNG (those speeds capped by the PNG loader's with ``workers``
    workers: decoding can only slow the feed down)."""
    png = {r["image_size"]: r["images_per_second"] for r in loader if r["source"] == "png" and r["workers"] == workers}
    rows = []
    for name in dict.fromkeys(f.backbone for f in figures):
        cached = {f.stage: f for f in figures if f.backbone == name and f.feed == "cache"}
        train, evaluate = cached["train"], cached["eval"]
        png_ips = png.get(train.image_size)
        rows.append({
            "backbone": name, "image_size": train.image_size, "mode": train.mode,
            "train_images_per_second": train.images_per_second, "eval_images_per_second": evaluate.images_per_second,
            "hours_cache": comparison_hours(train.images_per_second, evaluate.images_per_second, estimate),
            "hours_png": None if png_ips is None else comparison_hours(
                min(train.images_per_second, png_ips), min(evaluate.images_per_second, png_ips), estimate),
        })
    return rows


# ------------------------------------------------------------------------------------------------
# The run
def settings(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with ``quick_overrides`` merged in when ``bench.quick`` is set, and no more
    loader workers than usable cores (more would only measure contention)."""
    cfg = OmegaConf.merge(cfg, cfg.quick_overrides) if cfg.bench.quick else copy.deepcopy(cfg)
    cores = machine_info()["usable_cores"] or 1
    if cfg.data.num_workers > cores:
        log.warning("Timing %d loader workers instead of data.num_workers=%d: this machine has %d usable cores.",
                    cores, cfg.data.num_workers, cores)
        cfg.data.num_workers = cores
    unknown = [b for b in cfg.bench.backbones if b not in cfg.bench.models]
    if unknown:
        raise ConfigError(f"bench.backbones: {unknown} unknown; choose among {list(cfg.bench.models)}.")
    if cfg.bench.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"bench.device={cfg.bench.device!r}: expected auto, cpu or cuda.")
    if cfg.bench.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda but PyTorch sees no CUDA GPU; use bench.device=auto or cpu.")
    for device, schedule in cfg.bench.train.items():
        if min(schedule.batch_size, schedule.warmup, schedule.steps) < 1:
            raise ConfigError(f"bench.train.{device}: batch_size, warmup and steps must each be at least 1.")
    return cfg


def input_size(cfg: DictConfig, backbone: Mapping[str, Any]) -> int:
    size = max(int(cfg.bench.image_size or backbone["input_size"]), int(backbone.get("min_input_size", 32)))
    multiple = int(backbone.get("input_multiple") or 1)  # patch grids (ViT, Swin) cover the image exactly
    return -(-size // multiple) * multiple


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    """Measure, print the tables and write ``bench.json``; returns what it writes."""
    cfg = settings(cfg)
    device = "cuda" if cfg.bench.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    schedule = cfg.bench.train.gpu if on_gpu else cfg.bench.train.cpu
    modes = GPU_MODES + ((GPU_COMPILE_MODE,) if cfg.bench.compile else ()) if on_gpu else CPU_MODES
    # The loader-fed runs and the estimate use the mode training runs in: trainer=gpu's bf16 + channels_last.
    best_mode = GPU_MODES[-1] if on_gpu else CPU_MODES[-1]
    backbones = {name: OmegaConf.to_container(cfg.bench.models[name], resolve=True) for name in cfg.bench.backbones}
    sizes = sorted({input_size(cfg, b) for b in backbones.values()})
    console = Console(width=max(120, Console().width))

    machine = machine_info()
    console.print(_machine_line(machine, device))
    with _quiet():
        loader = [row for size in sizes for row in loader_figures(cfg, size)]
        console.print(_loader_table(loader, cfg))
        figures: list[StepFigure] = []
        for _name, backbone in backbones.items():
            size = input_size(cfg, backbone)
            dm = datamodule(cfg, size, cache=True, batch_size=int(schedule.batch_size))
            timed = [(mode, "synthetic", "train") for mode in modes]
            timed += [(best_mode, "cache", "train"), (best_mode, "cache", "eval")]
            for mode, feed, stage in timed:
                figures.append(time_steps(cfg, dm, backbone, mode, feed, stage, device,
                                          int(schedule.warmup), int(schedule.steps)))
                f = figures[-1]
                log.info("%s %d px %s %s %s: %.1f ms/step, %.0f images/s",
                         f.backbone, f.image_size, f.mode, f.feed, f.stage, f.step_ms, f.images_per_second)
    console.print(_step_table(figures, device, schedule))
    estimate = estimate_rows(figures, loader, cfg.bench.estimate, int(cfg.data.num_workers))
    console.print(_estimate_table(estimate, cfg.bench.estimate, device, int(cfg.data.num_workers)))

    result = {
        "machine": machine,
        "device": device,
        "quick": bool(cfg.bench.quick),
        "png": {"patients": int(cfg.data.demo.patients), "original_size": int(cfg.data.demo.image_size)},
        "loader": loader,
        "train": {"schedule": OmegaConf.to_container(schedule), "figures": [asdict(f) for f in figures]},
        "estimate": {"assumptions": OmegaConf.to_container(cfg.bench.estimate), "backbones": estimate,
                     "total_hours_cache": sum(r["hours_cache"] for r in estimate),
                     "total_hours_png": None if any(r["hours_png"] is None for r in estimate)
                     else sum(r["hours_png"] for r in estimate)},
    }
    path = files.write_json(Path(cfg.paths.output_dir) / "bench.json", result)
    console.print(f"Wrote {path}")
    return result


# Dozens of short runs on a few images: Lightning's banners and advice, the data module's split
# reports and the model's "AUROC over k labels" warnings would bury the tables.
_QUIET = {
    "pytorch_lightning": logging.WARNING, "lightning.pytorch": logging.WARNING, "lightning_fabric": logging.WARNING,
    "cxr_lightning.data.nih": logging.WARNING, "cxr_lightning.data.cohort": logging.WARNING,
    "cxr_lightning.data.datamodule": logging.WARNING, "cxr_lightning.models.module": logging.ERROR,
}


@contextmanager
def _quiet() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning.*")
        for name, level in _QUIET.items():
            logging.getLogger(name).setLevel(level)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------------------------------------
# Printing
def _machine_line(m: Mapping[str, Any], device: str) -> str:
    gpu = f"GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if m["gpu"] else "no GPU"
    return (f"Machine: {m['cpu']}, {m['cores']} cores "
            f"({m['usable_cores']} usable, torch threads {m['torch_threads']}), "
            f"{gpu}; torch {m['torch']}; timing on {device}")


def _loader_table(rows: list[dict[str, Any]], cfg: DictConfig) -> Table:
    table = Table(title=f"Loader: {cfg.data.demo.image_size}-px demo PNGs -> batches of {cfg.data.batch_size} "
                        f"(train loader of the data module)")
    for col in ("size px", "source", "workers", "images/s", "images/s per process", "cache / PNG"):
        table.add_column(col, justify="right")
    png = {(r["image_size"], r["workers"]): r["images_per_second"] for r in rows if r["source"] == "png"}
    for r in rows:
        ratio = r["images_per_second"] / png[(r["image_size"], r["workers"])] if r["source"] == "cache" else None
        table.add_row(str(r["image_size"]), r["source"], str(r["workers"] or "0 (in process)"),
                      _rate(r["images_per_second"]), _rate(r["images_per_second_per_process"]),
                      "" if ratio is None else f"{ratio:,.0f}x")
    return table


def _step_table(figures: list[StepFigure], device: str, schedule: DictConfig) -> Table:
    title = f"Steps on {device}: batch {schedule.batch_size}, {schedule.warmup} warm-up + {schedule.steps} timed steps"
    if device == "cpu":
        title += " (CPU: a couple of steps, indicative only)"
    table = Table(title=title)
    for col in ("backbone", "px", "mode", "feed", "stage", "ms/step", "images/s", "loader cost", "peak MiB"):
        table.add_column(col, justify="left" if col in ("backbone", "mode", "feed", "stage") else "right")
    synthetic = {(f.backbone, f.mode): f for f in figures if f.feed == "synthetic" and f.stage == "train"}
    for f in figures:
        cost = ""
        if f.feed == "cache" and f.stage == "train" and (f.backbone, f.mode) in synthetic:
            cost = f"{f.step_ms / synthetic[(f.backbone, f.mode)].step_ms - 1:+.0%}"
        table.add_row(f.backbone, str(f.image_size), f.mode, f.feed, f.stage, f"{f.step_ms:,.1f}",
                      _rate(f.images_per_second), cost, f"{f.peak_memory_mib:,.0f}")
    table.caption = ("peak MiB: torch.cuda.max_memory_allocated per run" if device == "cuda"
                     else "peak MiB: the process's peak RSS so far (ru_maxrss)")
    return table


def _estimate_table(rows: list[dict[str, Any]], est: Mapping[str, Any], device: str, workers: int) -> Table:
    table = Table(
        title=(
            f"Estimated comparison on {device}: {est['epochs']} epochs of {est['train_val_images']:,} "
            f"train+val images (val {est['val_fraction']:.0%}) + {est['test_images']:,} test, per backbone"
        )
    )
    for col in (
        "backbone", "px", "mode", "train img/s", "eval img/s", "hours (cache)", f"hours (PNG, {workers} workers)"
    ):
        table.add_column(col, justify="left" if col in ("backbone", "mode") else "right")
    for r in rows:
        table.add_row(r["backbone"], str(r["image_size"]), r["mode"], _rate(r["train_images_per_second"]),
                      _rate(r["eval_images_per_second"]), f"{r['hours_cache']:,.2f}",
                      "" if r["hours_png"] is None else f"{r['hours_png']:,.2f}")
    total_png = None if any(r["hours_png"] is None for r in rows) else sum(r["hours_png"] for r in rows)
    table.add_row("total", "", "", "", "", f"{sum(r['hours_cache'] for r in rows):,.2f}",
                  "" if total_png is None else f"{total_png:,.2f}", end_section=True)
    table.caption = "Steps only: excludes start-up, checkpointing, metrics at epoch end and torch.compile time."
    return table


def _rate(images_per_second: float) -> str:
    return f"{images_per_second:,.0f}" if images_per_second >= 10 else f"{images_per_second:.2f}"
