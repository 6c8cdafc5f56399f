"""The training-curves section: a run's ``history.csv`` (per-epoch loss, validation AUROC and
learning rate) read under bounds and drawn as one inline SVG."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.evaluation.html.page import esc
from cxr_lightning.run_dir import HISTORY

# history.csv may come from elsewhere: the page reads at most this much of it.
HISTORY_MAX_BYTES = 2_000_000
HISTORY_MAX_EPOCHS = 10_000
# Training-curve panels: (title, history.csv columns drawn in it, log scale when positive).
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss"), False),
    ("validation mean AUROC", ("val/auroc_mean",), False),
    ("learning rate", ("lr",), True),
)


def read_history(path: str | Path | None) -> tuple[pd.DataFrame | None, str]:
    """The numeric columns of ``history.csv`` that the curves draw, indexed by epoch, or ``(None,
    note)`` with the one line the page shows instead: the file is missing, too large, unreadable,
    or has no epoch column or nothing to draw."""
    if path is None:
        return None, "No training curves: this evaluation was not given a training run's history."
    path = Path(path)
    if not path.is_file():
        return None, f"No training curves: the run has no {HISTORY}."
    size = path.stat().st_size
    if size > HISTORY_MAX_BYTES:
        return None, (f"No training curves: {path.name} is {size} bytes, "
                      f"more than the {HISTORY_MAX_BYTES} the page reads.")
    try:
        frame = pd.read_csv(path, nrows=HISTORY_MAX_EPOCHS + 1)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, f"No training curves: cannot read {path.name} ({reason})."
    if len(frame) > HISTORY_MAX_EPOCHS:
        return None, f"No training curves: {path.name} has more than {HISTORY_MAX_EPOCHS} rows."
    if "epoch" not in frame.columns:
        return None, f"No training curves: {path.name} has no epoch column."
    wanted = [c for _, columns, _ in CURVE_PANELS for c in columns if c in frame.columns]
    epoch = pd.to_numeric(frame["epoch"], errors="coerce")
    values = frame[wanted].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    values = values[epoch.notna().to_numpy()].set_axis(epoch.dropna().astype(float), axis=0)
    values = values.dropna(axis=1, how="all")
    if values.empty or values.shape[1] == 0:
        names = ", ".join(c for _, columns, _ in CURVE_PANELS for c in columns)
        return None, f"No training curves: {path.name} has no numeric {names} values."
    return values.rename_axis("epoch").sort_index(), ""


def curves_svg(history: pd.DataFrame) -> str:
    """Inline SVG of the training curves (one panel per CURVE_PANELS entry with data), drawn by
    matplotlib; inline so the figure scales with the page and is text a test can read."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(title, [c for c in columns if c in history.columns], log) for title, columns, log in CURVE_PANELS]
    panels = [p for p in panels if p[1]]
    fig = Figure(figsize=(3.6 * len(panels), 2.8))
    FigureCanvasSVG(fig)
    for k, (title, columns, log) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for column in columns:
            series = history[column].dropna()
            ax.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=column)
        if log and (history[columns].dropna() > 0).all().all() and history[columns].notna().any().any():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def training_curves(history: str | Path | None) -> str:
    frame, note = read_history(history)
    if frame is None:
        return f'<p class="muted" id="no-curves">{esc(note)}</p>'
    return (f'<figure class="svg" id="training-curves">{curves_svg(frame)}<figcaption>Per-epoch training loss, '
            "validation loss, validation mean AUROC and learning rate from the run's history.csv."
            "</figcaption></figure>")
