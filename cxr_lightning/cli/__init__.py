"""The command layer: one thin ``main`` per command behind one task wrapper.

``python -m cxr_lightning.<command>`` and the ``cxr-<command>`` scripts (``[project.scripts]`` in
pyproject.toml) run the ``<command>_main`` below. Each composes its config
from the configs shipped inside the package (:data:`CONFIG_PATH`, so a regular ``pip install``
works from any directory; users add their own through ``--config-dir`` or ``hydra.searchpath``),
sets up the run (warning filters), calls a task function of :mod:`cxr_lightning.tasks`, and turns
what can go wrong into an exit status:

- a framework error (:class:`~cxr_lightning.errors.CXRError`): one readable line on stderr, no
  traceback, exit status 2; under a Hydra multirun the job fails with that one line, and the
  sweep records it;
- SIGTERM (SLURM preemption, ``kill``): ``last.ckpt`` is saved by the callbacks, exit status 143.

Nothing below this package imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cxr_lightning.errors import CXRError

log = logging.getLogger("cxr_lightning")

CONFIG_PATH = "pkg://cxr_lightning.conf"
# The exit status of a process ended by SIGTERM, so schedulers see a preempted run as not finished.
EXIT_SIGTERM = 128 + int(signal.SIGTERM)
EXIT_ERROR = 2


class JobError(CompactHydraException):
    """A framework error inside a multirun job: Hydra prints its message alone, on one line."""


class _DropMessages(logging.Filter):
    """Drops the log records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, *patterns: str) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


# Lightning's info lines that say nothing about this run: an advertisement for its cloud logger,
# and limit_*_batches=1.0 (the default, every batch) announced as if it were a choice.
LIGHTNING_NOISE = _DropMessages(r"💡 Tip: ", r"`Trainer\(limit_\w+_batches=1\.0\)` was configured so 100%")


def quiet_known_warnings() -> None:
    """Warnings a user cannot act on, filtered where a run starts (never at import)."""
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if LIGHTNING_NOISE not in rank_zero.filters:
        rank_zero.addFilter(LIGHTNING_NOISE)
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates, once per batch.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # The model, not the data module, preprocesses batches (models/preprocess.py), by design.
    warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")
    # CXRClassifier logs epoch metrics that torchmetrics has already synchronised across ranks.
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level"
    )


_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def log_own_warnings() -> None:
    """The framework's own warnings (a missing thresholds file, no demographics, labels left raw)
    become WARNING lines of the module's logger: one readable line on the console and in the job's
    log file, instead of Python's ``path:line: UserWarning: ...`` on stderr alone. Other libraries'
    warnings keep Python's format."""
    shown = warnings.showwarning
    if getattr(shown, "routes_own_warnings", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        try:
            relative = Path(filename).resolve().relative_to(_PACKAGE_DIR)
        except (ValueError, OSError):
            return shown(message, category, filename, lineno, file, line)
        logging.getLogger(".".join((_PACKAGE_DIR.name, *relative.with_suffix("").parts))).warning("%s", message)

    show.routes_own_warnings = True
    warnings.showwarning = show


def run_task(task: Callable[[Any], Any], *args: Any) -> Any:
    """Call ``task(*args)`` with the exit-status contract above."""
    from omegaconf.errors import OmegaConfBaseException
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    quiet_known_warnings()
    log_own_warnings()
    try:
        return task(*args)
    except SIGTERMException:
        raise SystemExit(EXIT_SIGTERM) from None
    except (CXRError, OmegaConfBaseException) as exc:
        # An OmegaConf error here is the config's too: an interpolation to a missing key, a bad value.
        if isinstance(exc, CXRError):
            message = f"{type(exc).__name__}: {exc}"
        else:
            message = f"ConfigError: {hydra_error_line(exc)}"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobError(message) from exc
        remove_unstarted_run_dir()
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


def remove_unstarted_run_dir() -> None:
    """Delete the run directory Hydra made for a job that failed before writing anything: it holds
    Hydra's own files only (the job log, ``.hydra/``), and would pass for a run. A directory with
    anything else in it (a resumed run, earlier outputs) is left as it is."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    own = {f"{hydra_cfg.job.name}.log", str(hydra_cfg.output_subdir or ".hydra")}
    try:
        entries = list(out.iterdir())
    except OSError:
        return
    if not entries or any(e.name not in own for e in entries):
        return
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    try:
        out.rmdir()
    except OSError:  # the working directory itself (hydra.run.dir=.), or in use
        pass


# --------------------------------------------------------------------------------------------------
# Hydra's composition errors as one line
def _close(word: str, options: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(word, [str(o) for o in options], n=3, cutoff=0.6)


def _did_you_mean(close: Sequence[str], prefix: str = "") -> str:
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def hydra_error_line(exc: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config: what was wrong,
    close matches ("did you mean") for a group option or a key, and what to do."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc)
    if isinstance(exc, MissingConfigException):
        found = re.search(r"Could not find '([^']+)'", text)
        missing = found.group(1) if found else str(exc.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        options = list(exc.options or [])
        if group and options:
            close = _close(option, options)
            return (f"{group}={option}: there is no {group} config {option!r}{_did_you_mean(close, f'{group}=')}. "
                    f"Options: {', '.join(options)}.")
        return f"config {missing!r} not found" + (f"; options: {', '.join(options)}." if options else ".")
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if full_key and isinstance(parent, DictConfig) and "Could not override" in text:
        path, _, key = str(full_key).rpartition(".")
        close = _close(key, list(parent.keys()))
        where = f"{path} has no key {key!r}" if path else f"there is no config group or key {key!r}"
        append = re.search(r"use (\+\S+)", text)
        hint = f" (to add a new key: {append.group(1)})" if append and not close else ""
        return f"{full_key}: {where}{_did_you_mean(close, f'{path}.' if path else '')}{hint}."
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override: {text.splitlines()[0]} (Hydra's override grammar: " \
               "https://hydra.cc/docs/advanced/override_grammar/basic/)."
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("\t")]
    if full_key and not any("full_key" in line for line in lines):
        lines.append(f"(key {full_key})")
    return " ".join(line for line in lines if not line.startswith(("object_type=", "Config search path",
                                                                       "provider=", "Set the environment")))


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Hydra prints a composition error as several lines (a listing of every option, a search path)
    and exits 1; here it is one ``error:`` line and exit status 2, as for the framework's own errors.
    HYDRA_FULL_ERROR makes Hydra raise instead of printing, for the duration of the call; an error
    raised by the task itself keeps its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _state["task_started"] = False
    try:
        yield
    except JobError as exc:  # a multirun job's framework error, already one line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    except (HydraException, OmegaConfBaseException) as exc:
        if _state["task_started"]:
            raise
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


_state = {"task_started": False}


def hydra_command(config_name: str, task: str, then: Callable[[Any], Any] | None = None) -> Callable[[], Any]:
    """A ``main()`` composing ``config_name`` from the shipped configs and running ``task``
    (``"module:function"``) on it; ``then`` receives the task's result, and what it returns goes
    back to Hydra (a sweeper's objective). The task is imported only when it runs, so ``--cfg job``
    and ``--help`` answer at once, without loading torch."""
    module, function = task.split(":")

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def hydra_main(cfg: DictConfig) -> Any:
        _state["task_started"] = True
        result = run_task(getattr(importlib.import_module(module), function), cfg)
        return then(result) if then is not None else None

    @functools.wraps(hydra_main)
    def main() -> Any:
        with _one_line_errors():
            return hydra_main()

    return main


def _print_export(result: Any) -> None:
    print(f"{result.path} ({result.format}; max |logit difference| to the checkpoint {result.max_abs_diff:.2g})")


def _print_cache(cache: Any) -> None:
    print(f"{cache.directory}: {len(cache)} images of {cache.size} px")


def _selection_value(metrics: dict[str, Any]) -> float | None:
    """What a sweeper optimises: the best value of ``selection.metric`` (its direction: tasks/validate.py)."""
    return metrics["selection"]["best"]


def _exit_on_failed_files(run: Any) -> None:
    from cxr_lightning.tasks.predict import report_failures

    report_failures(run)


def _explain_dir(explicit: str | None, run_dir: str | None, fallback: str) -> str:
    from cxr_lightning.tasks.explain import job_output_dir

    return str(job_output_dir(explicit, run_dir, fallback))


# The Hydra commands.
train_main = hydra_command("train", "cxr_lightning.tasks.train:train", _selection_value)
evaluate_main = hydra_command(
    "evaluate", "cxr_lightning.tasks.evaluate:evaluate", lambda result: float(result.metrics["auroc_mean"])
)
predict_main = hydra_command("predict", "cxr_lightning.tasks.predict:predict", _exit_on_failed_files)
export_main = hydra_command("export", "cxr_lightning.tasks.export:export", _print_export)
bench_main = hydra_command("bench", "cxr_lightning.tasks.bench:run_bench")
cache_main = hydra_command("cache", "cxr_lightning.tasks.cache:build_cache", _print_cache)
inspect_main = hydra_command("inspect", "cxr_lightning.tasks.inspect:inspect")
# A sweeper optimises the probe's validation AUROC (its selection metric).
probe_main = hydra_command("probe", "cxr_lightning.tasks.probe:probe", _selection_value)
_explain_main = hydra_command("explain", "cxr_lightning.tasks.explain:explain")


def explain_main() -> None:
    # Hydra's run dir (log, .hydra/) follows the job's output dir; see conf/explain.yaml.
    OmegaConf.register_new_resolver("cxr.explain_dir", _explain_dir, replace=True)
    _explain_main()


# --------------------------------------------------------------------------------------------------
# The commands that take a directory, not a config
def compare_main(argv: Sequence[str] | None = None) -> int:
    compare_command(argv)
    return 0


def compare_command(argv: Sequence[str] | None = None) -> Any:
    """``compare``'s work, returning the files it wrote (a console script's return is its exit status)."""
    from cxr_lightning.tasks.compare import DEFAULT_BY, write_comparison

    parser = argparse.ArgumentParser(
        prog="python -m cxr_lightning.compare",
        description="Compare the runs of a sweep: writes comparison.csv, comparison.md and comparison.png. "
        "With --datasets, the cross-dataset table of several evaluations: datasets.csv and datasets.md.",
    )
    parser.add_argument("sweep_dir", type=Path, nargs="+",
                        help="a multirun directory (or any folder of run directories); with --datasets, "
                        "evaluation output directories (or folders holding them)")
    parser.add_argument(
        "--by", default=",".join(DEFAULT_BY),
        help="comma-separated config keys to group runs by (default: backbone), e.g. backbone,head or data.image_size",
    )
    parser.add_argument("--datasets", action="store_true",
                        help="one row per backbone, dataset and label over evaluations (NIH test, CheXpert, MIMIC...)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the files (default: the first directory)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.datasets:
        from cxr_lightning.tasks.compare_datasets import write_dataset_table

        written = run_task(write_dataset_table, args.sweep_dir, args.out)
        print(written.csv, written.markdown, sep="\n")
        return written
    if len(args.sweep_dir) != 1:
        parser.error("pass one sweep directory (several directories need --datasets)")
    written = run_task(write_comparison, args.sweep_dir[0], args.by, args.out)
    print(written.csv, written.markdown, written.figure, sep="\n")
    return written


def summary_main(argv: Sequence[str] | None = None) -> int:
    from cxr_lightning.tasks.summary import print_summary

    parser = argparse.ArgumentParser(
        prog="python -m cxr_lightning.summary", description="Print a run's headline figures."
    )
    parser.add_argument("run_dir", type=Path)
    return run_task(print_summary, parser.parse_args(argv).run_dir)


def demo_main(argv: Sequence[str] | None = None) -> int:
    from cxr_lightning.data import nih
    from cxr_lightning.data.demo import DEMO_DEFAULTS, generate

    parser = argparse.ArgumentParser(
        prog="python -m cxr_lightning.demo",
        description="Write a synthetic miniature ChestX-ray14 in the exact NIH layout "
        "(a demo for exercising the pipeline, not evidence about real X-rays).",
    )
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory to write into")
    parser.add_argument("--patients", type=int, default=DEMO_DEFAULTS["patients"])
    parser.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--images-per-folder", type=int, default=DEMO_DEFAULTS["images_per_folder"])
    parser.add_argument("--box-sources", action="store_true",
                        help="NIH's real layout for boxes: keep the test images' boxes only, and write the boxed "
                        "train_val images as VinDr-CXR and RSNA Pneumonia copies (DIR/vindr_cxr, DIR/rsna_pneumonia)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = run_task(generate, args.out, args.patients, args.image_size, args.seed, args.workers, args.images_per_folder)
    n_images = len((out / nih.LABEL_TABLE).read_text().splitlines()) - 1
    print(f"Wrote {n_images} images of {args.patients} patients to {out} in {time.perf_counter() - start:.1f} s.")
    if args.box_sources:
        from cxr_lightning.data.demo.box_copies import write_box_copies

        counts = run_task(write_box_copies, out)
        print(f"Box sources (demo copies, not evidence): {counts}")
    return 0
