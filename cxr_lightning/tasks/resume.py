"""Resuming interrupted runs: :func:`resolve_resume` turns ``resume=auto|PATH`` (or ``ckpt_path=``)
into the run directory to write into and the checkpoint to continue from."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from cxr_lightning import files
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.run_dir import CHECKPOINTS, LAST_CHECKPOINT, RESUMED_NOTE, RunDir

log = logging.getLogger(__name__)

# Keys that differ between two invocations of the same experiment.
RUN_SPECIFIC_KEYS = ("paths", "hydra", "resume", "ckpt_path", "trust_checkpoint")


# --------------------------------------------------------------------------------------------------
# Resuming


def resolve_resume(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """The config to run (``paths.output_dir`` pointing at the run to continue) and the checkpoint.

    ``resume=null``: a new run; ``ckpt_path=FILE`` starts it from that checkpoint's training state.
    ``resume=auto``: continue this output directory if it holds a checkpoint to resume from
    (:func:`latest_checkpoint`); else the most recent interrupted run (such a checkpoint, no
    ``metrics.json``) beside it whose ``config.yaml`` matches this config; else start a new run.
    ``resume=DIR`` (a run directory) or ``resume=DIR/checkpoints/X.ckpt``: continue that run from
    that checkpoint.
    Continuing another directory leaves a ``resumed_into.txt`` note in this invocation's directory.
    """
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    out = Path(cfg.paths.output_dir)
    if resume and ckpt_path:
        raise ConfigError(
            f"resume={resume} and ckpt_path={ckpt_path} both given: resume continues a run directory, "
            "ckpt_path starts a new run from a checkpoint file. Pass one of them."
        )
    if not resume:
        return cfg, resolve_ckpt_path(ckpt_path, out)
    if str(resume) == "auto":
        run = find_interrupted_run(cfg)
        if run is None:
            log.info("resume=auto: no interrupted run of this config beside %s; starting a new run.", out)
            return cfg, None
        checkpoint = latest_checkpoint(run)
    else:
        run, checkpoint = _run_of(Path(str(resume)).expanduser())
        differences = config_differences(cfg, run)
        if differences:
            log.warning("resume=%s: this config differs from the run's config.yaml: %s", resume, "; ".join(differences))
    if run.resolve() != out.resolve():
        if rank_zero_only.rank == 0:
            files.write_text(out / RESUMED_NOTE, f"This invocation continued the run in {run}\nfrom {checkpoint}\n")
        cfg = copy.deepcopy(cfg)
        cfg.paths.output_dir = str(run)
    log.info("Resuming %s from %s", run, checkpoint)
    return cfg, str(checkpoint)


def find_interrupted_run(cfg: DictConfig) -> Path | None:
    """The run ``resume=auto`` continues: see :func:`resolve_resume`."""
    out = Path(cfg.paths.output_dir)
    if latest_checkpoint(out) is not None:
        return out  # hydra.run.dir=<old run> resume=auto
    if not out.parent.is_dir():
        return None
    interrupted = [d for d in out.parent.iterdir() if d.is_dir() and d != out and _is_interrupted(d)]
    matching = [d for d in interrupted if not config_differences(cfg, d)]
    if interrupted and not matching:
        nearest = max(interrupted, key=_last_checkpoint_time)
        log.info(
            "resume=auto: %d interrupted run(s) beside %s have another config (e.g. %s: %s).",
            len(interrupted), out, nearest.name, "; ".join(config_differences(cfg, nearest)[:3]),
        )
    return max(matching, key=_last_checkpoint_time, default=None)


def config_differences(cfg: DictConfig, run: Path) -> list[str]:
    """``key: saved -> current`` for every setting in which ``cfg`` differs from ``run/config.yaml``,
    ignoring :data:`RUN_SPECIFIC_KEYS`; a run without a readable config.yaml differs in everything."""
    saved_path = RunDir(run).config
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    except Exception as exc:  # missing or unreadable: it cannot be matched
        return [f"{saved_path} unreadable ({type(exc).__name__})"]
    # Resolve as if this config ran in that directory, so paths derived from it compare equal.
    current = copy.deepcopy(cfg)
    current.paths.output_dir = str(run)
    flat_saved = _flatten(_without_run_keys(saved))
    flat_current = _flatten(_without_run_keys(OmegaConf.to_container(current, resolve=True)))
    keys = sorted(set(flat_saved) | set(flat_current))
    return [
        f"{k}: {flat_saved.get(k, '<absent>')} -> {flat_current.get(k, '<absent>')}"
        for k in keys
        if flat_saved.get(k, "<absent>") != flat_current.get(k, "<absent>")
    ]


def latest_checkpoint(run: Path) -> Path | None:
    """The newer of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` files Lightning writes
    when SLURM signals a requeue (``--signal=USR1@90``); None when the run has neither."""
    candidates = [RunDir(run).last_checkpoint, *RunDir(run).hpc_checkpoints]
    return max((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)


def _run_of(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for ``resume=PATH``."""
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise CheckpointError(
                f"resume={path}: no {CHECKPOINTS}/{LAST_CHECKPOINT} in that folder. Pass a training run "
                "directory (outputs/<task>/<time>/) or one of its checkpoints/*.ckpt files."
            )
        return path, checkpoint
    if path.is_file():
        run = RunDir.of_checkpoint(path)
        if run is None:
            raise CheckpointError(
                f"resume={path}: the checkpoint is not inside a run directory's {CHECKPOINTS}/ folder. "
                f"To start a new run from it, pass ckpt_path={path} instead."
            )
        return run.root, path
    raise CheckpointError(f"resume={path} does not exist; pass a run directory, a .ckpt file, or resume=auto.")


def _is_interrupted(run: Path) -> bool:
    return latest_checkpoint(run) is not None and not _has_complete_metrics(run)


def _has_complete_metrics(run: Path) -> bool:
    try:
        return isinstance(json.loads(RunDir(run).metrics.read_text()), dict)
    except (OSError, ValueError):
        return False


def _last_checkpoint_time(run: Path) -> float:
    return latest_checkpoint(run).stat().st_mtime


def _without_run_keys(container: Any) -> dict:
    return {k: v for k, v in dict(container).items() if k not in RUN_SPECIFIC_KEYS}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``auto`` resumes from the run directory's ``last.ckpt`` when there is one."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":
        last = RunDir(out_dir).last_checkpoint
        return str(last) if last.exists() else None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; pass an existing .ckpt file or ckpt_path=auto.")
    return ckpt_path
