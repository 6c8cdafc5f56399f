"""Hydra callback that turns a sweep's run directories into a comparison report.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``, so every multirun
(``python -m cxr_lightning.train -m ...``) ends with ``comparison.{csv,md,png}`` in its sweep
directory (see :mod:`cxr_lightning.tasks.compare`).

Hydra skips ``on_multirun_end`` when a job raised (the sweeper re-raises the job's exception),
which is exactly when the report matters most. So the callback also records each failed job's
exception in ``<run>/error.txt`` and refreshes the report after every job: an aborted or
interrupted sweep still leaves a report that lists its failed runs with their reasons.

It also refuses the one DDP setup that cannot work under a multirun: Lightning's ``ddp``
strategy re-launches ``sys.argv`` for every extra GPU, and under ``-m`` that re-runs the whole
sweep. Multi-GPU sweeps go through the SLURM launcher (``hydra/launcher=slurm``), where SLURM
starts one task per GPU and Lightning launches nothing, or run as separate single runs.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cxr_lightning.cli import JobError
from cxr_lightning.errors import ConfigError, CXRError
from cxr_lightning.files import write_text
from cxr_lightning.run_dir import ERROR
from cxr_lightning.tasks.compare import DEFAULT_BY, write_comparison

log = logging.getLogger(__name__)

# Strategies whose launcher re-runs the script (sys.argv) once per extra local process.
_SCRIPT_LAUNCHED = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
# Environment variables of process managers that start every rank themselves (SLURM, torchrun).
_EXTERNAL_LAUNCH_ENV = ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID")
_RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


class CompareOnMultirunEnd(Callback):
    """Write the sweep's comparison report (``by``: config keys to group runs by)."""

    def __init__(self, by: str | Sequence[str] = DEFAULT_BY) -> None:
        self.by = [k.strip() for k in by.split(",")] if isinstance(by, str) else list(by)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_multirun(config):
            check_multirun_strategy(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config) or not _is_rank_zero():
            return
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value  # reading .return_value would re-raise it
            # A framework error arrives as the one-line JobError of cli.run_task, already named.
            reason = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
            write_text(Path(config.hydra.runtime.output_dir) / ERROR, reason + "\n")
        try:
            write_comparison(config.hydra.sweep.dir, by=self.by)
        except (CXRError, OSError) as exc:  # a report glitch must not fail a finished run
            log.warning("Could not refresh the sweep comparison in %s: %s", config.hydra.sweep.dir, exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        files = write_comparison(sweep_dir, by=self.by)
        log.info("Sweep comparison (python -m cxr_lightning.compare %s --by %s):", sweep_dir, ",".join(self.by))
        log.info("  table:  %s", files.csv)
        log.info("  report: %s", files.markdown)
        log.info("  figure: %s", files.figure)


def check_multirun_strategy(config: DictConfig) -> None:
    """Raise :class:`ConfigError` for a multirun job whose trainer would re-launch the sweep."""
    strategy = OmegaConf.select(config, "trainer.strategy", default="auto")
    devices = OmegaConf.select(config, "trainer.devices", default=1)
    nodes = OmegaConf.select(config, "trainer.num_nodes", default=1)
    if not isinstance(strategy, str) or strategy not in _SCRIPT_LAUNCHED:
        return
    if devices in (1, "1") and nodes in (1, "1"):
        return
    if any(name in os.environ for name in _EXTERNAL_LAUNCH_ENV):
        return
    raise ConfigError(
        f"trainer.strategy={strategy} with trainer.devices={devices} under a Hydra multirun (-m): Lightning "
        "would start each extra process by re-running this command line, i.e. the whole sweep again. On a "
        "SLURM cluster add hydra/launcher=slurm (SLURM then starts one task per GPU for each run); on one "
        "machine, start the runs one by one without -m, each with hydra.run.dir=DIR/<name>, and compare them "
        "with python -m cxr_lightning.compare DIR (see README, 'Running the comparison on a cluster')."
    )


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in _RANK_ENV)
