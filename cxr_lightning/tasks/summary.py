"""The summary task behind ``python -m cxr_lightning.summary RUN_DIR``: a run's headline figures.

Reads what train, evaluate and explain wrote into the run directory (``metrics.json``,
``evaluation/metrics.json``, ``explain/metrics.json``) and prints one short table, ending with
the path of the run's browser report (``report.html``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cxr_lightning import schema
from cxr_lightning.errors import DataError
from cxr_lightning.run_dir import RunDir

# (file of the run, key, label); each file is read once.
ROWS = (
    (lambda run: run.metrics, "test.auroc_mean", "test mean AUROC (Lightning test of the best checkpoint)"),
    (lambda run: run.metrics, "test.f1_macro", "test macro F1 at 0.5"),
    (lambda run: run.metrics, "epochs", "epochs trained"),
    (lambda run: run.metrics, "fit_seconds", "training time (s)"),
    (lambda run: run.evaluation.metrics, "auroc_mean", "test mean AUROC (evaluate)"),
    (lambda run: run.evaluation.metrics, "auroc_mean_lower", "  95% CI lower (patient bootstrap)"),
    (lambda run: run.evaluation.metrics, "auroc_mean_upper", "  95% CI upper"),
    (lambda run: run.evaluation.metrics, "f1_macro", "test macro F1 at val-chosen thresholds"),
    (lambda run: run.explain.metrics, "localization.pointing_game", "pointing game hit rate"),
    (lambda run: run.explain.metrics, "localization.random_pointing_game", "  random heatmaps"),
    (lambda run: run.explain.metrics, "localization.iobb@0.5", "IoBB@0.5 accuracy"),
    (lambda run: run.explain.metrics, "localization.random_iobb@0.5", "  random heatmaps"),
    (lambda run: run.explain.metrics, "cams.zero_gradient", "CAMs with zero gradient"),
)


def collect(run_dir: Path) -> list[tuple[str, Any]]:
    run = RunDir(run_dir)
    loaded: dict[Path, dict] = {}
    rows = []
    for file_of, key, label in ROWS:
        path = file_of(run)
        if path not in loaded:
            check = schema.Checker(str(path), DataError)  # a shared run's file: plain data only
            loaded[path] = schema.mapping(schema.read_json(path, check), check, "") if path.is_file() else {}
        if key in loaded[path]:
            rows.append((label, loaded[path][key]))
    return rows


def print_summary(run_dir: Path) -> int:
    """Print the table; 1 when ``run_dir`` holds no metrics."""
    rows = collect(run_dir)
    run = RunDir(run_dir)
    if not rows:
        print(f"{run_dir}: no {run.metrics.name} found (is it a training run directory?)")
        return 1
    table = Table(title=f"Run {run_dir}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, f"{value:.3f}" if isinstance(value, float) else str(value))
    console = Console(width=100)
    console.print(table)
    for what, path in (("checkpoints", run.checkpoints), ("evaluation report", run.evaluation.report_md),
                       ("Grad-CAM overlays", run.explain.overlays), ("localisation", run.explain.localization)):
        console.print(f"{what:>18}: {path}")
    console.print(f"{'TensorBoard':>18}: make tensorboard  (or tensorboard --logdir {run_dir})")
    page = run.report_html
    if page.is_file():
        # Printed whole (no wrapping) so it can be pasted into a browser.
        console.print(f"{'report (browser)':>18}: {page.resolve()}", soft_wrap=True)
    return 0
