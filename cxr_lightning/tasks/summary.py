"""The summary task behind ``python -m cxr_lightning.summary RUN_DIR``: a run's headline figures.

Reads what train, evaluate and explain wrote into the run directory (``metrics.json``,
``evaluation/metrics.json``, ``explain/metrics.json``) and prints one short table, ending with
the path of the run's browser report (``report.html``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cxr_lightning.evaluation.html import REPORT_NAME

ROWS = (
    # (file, key, label)
    ("metrics.json", "test.auroc_mean", "test mean AUROC (Lightning test of the best checkpoint)"),
    ("metrics.json", "test.f1_macro", "test macro F1 at 0.5"),
    ("metrics.json", "epochs", "epochs trained"),
    ("metrics.json", "fit_seconds", "training time (s)"),
    ("evaluation/metrics.json", "auroc_mean", "test mean AUROC (evaluate)"),
    ("evaluation/metrics.json", "auroc_mean_lower", "  95% CI lower (patient bootstrap)"),
    ("evaluation/metrics.json", "auroc_mean_upper", "  95% CI upper"),
    ("evaluation/metrics.json", "f1_macro", "test macro F1 at val-chosen thresholds"),
    ("explain/metrics.json", "localization.pointing_game", "pointing game hit rate"),
    ("explain/metrics.json", "localization.random_pointing_game", "  random heatmaps"),
    ("explain/metrics.json", "localization.iobb@0.5", "IoBB@0.5 accuracy"),
    ("explain/metrics.json", "localization.random_iobb@0.5", "  random heatmaps"),
    ("explain/metrics.json", "cams.zero_gradient", "CAMs with zero gradient"),
)


def collect(run_dir: Path) -> list[tuple[str, Any]]:
    loaded: dict[str, dict] = {}
    rows = []
    for file, key, label in ROWS:
        if file not in loaded:
            path = run_dir / file
            loaded[file] = json.loads(path.read_text()) if path.is_file() else {}
        if key in loaded[file]:
            rows.append((label, loaded[file][key]))
    return rows


def print_summary(run_dir: Path) -> int:
    """Print the table; 1 when ``run_dir`` holds no metrics."""
    rows = collect(run_dir)
    if not rows:
        print(f"{run_dir}: no metrics.json found (is it a training run directory?)")
        return 1
    table = Table(title=f"Run {run_dir}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, f"{value:.3f}" if isinstance(value, float) else str(value))
    console = Console(width=100)
    console.print(table)
    for what, rel in (("checkpoints", "checkpoints"), ("evaluation report", "evaluation/report.md"),
                      ("Grad-CAM overlays", "explain/overlays"), ("localisation", "explain/localization.csv")):
        console.print(f"{what:>18}: {run_dir / rel}")
    console.print(f"{'TensorBoard':>18}: make tensorboard  (or tensorboard --logdir {run_dir})")
    page = run_dir / REPORT_NAME
    if page.is_file():
        # Printed whole (no wrapping) so it can be pasted into a browser.
        console.print(f"{'report (browser)':>18}: {page.resolve()}", soft_wrap=True)
    return 0
