"""A linear probe's figure and report page: the label-efficiency curve (test AUROC with its
patient-bootstrap interval against the share of training patients), the per-label table of the
largest fraction, and the configuration. Built from the helpers of :mod:`cxr_lightning.evaluation.html`."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_lightning.evaluation import html
from cxr_lightning.files import write_text


def label_efficiency_figure(curve: pd.DataFrame, title: str, path: str | Path) -> Path:
    """Mean test AUROC (with its interval) and mean validation AUROC per training fraction, log x."""
    from matplotlib.figure import Figure

    from cxr_lightning.evaluation.report import save_figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    x = curve["fraction"].to_numpy() * 100
    ax.fill_between(x, curve["test_auroc_lower"], curve["test_auroc_upper"], alpha=0.2, label="test 95% CI")
    ax.plot(x, curve["test_auroc_mean"], marker="o", label="test AUROC")
    ax.plot(x, curve["val_auroc_mean"], marker="s", linestyle="--", label="val AUROC (C chosen on it)")
    if len(x) > 1:
        ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}%" for v in x])
    ax.set_xlabel("training patients (share of the training split)")
    ax.set_ylabel("mean AUROC over labels")
    ax.set_title(title, fontsize=10)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def curve_section(curve: pd.DataFrame, figure_path: Path, alpha: float = 0.05) -> str:
    """The report section of a label-efficiency curve: its figure and its table."""
    level = round(100 * (1 - alpha))
    shown = pd.DataFrame({
        "training share": [f"{f * 100:g}%" for f in curve["fraction"]],
        "patients": curve["n_patients"],
        "images": curve["n_images"],
        f"test AUROC ({level}% CI)": [
            html.interval(m, lo, hi)
            for m, lo, hi in zip(curve["test_auroc_mean"], curve["test_auroc_lower"], curve["test_auroc_upper"])
        ],
        "val AUROC": curve["val_auroc_mean"],
        "labels fitted": curve["labels_fitted"],
    })
    return (html.figure(figure_path, "Label efficiency: mean test AUROC by share of training patients")
            + html.table(shown))


def render_probe_report(metrics: Mapping[str, Any], curve: pd.DataFrame, per_label: pd.DataFrame,
                        figure_path: Path, out: Path, demo: bool, config_text: str = "") -> Path:
    """Write the probe's report.html to ``out``."""
    probe = metrics.get("probe", {})
    alpha = float(probe.get("alpha", 0.05))
    level = round(100 * (1 - alpha))
    largest = curve.iloc[-1]
    note = f'<p class="note">{html.esc(html.DEMO_NOTE)}</p>' if demo else ""
    headline = note + html.cards([
        ("mean test AUROC", html.interval(largest["test_auroc_mean"]),
         f"{level}% CI {html.interval(largest['test_auroc_lower'])}–{html.interval(largest['test_auroc_upper'])} "
         "(patient bootstrap)"),
        ("training patients", f"{int(largest['n_patients'])}", f"{largest['fraction'] * 100:g}% of the training split"),
        ("features", f"{probe.get('n_features', '?')}",
         "frozen backbone" + (" + metadata" if probe.get("metadata") else "")),
    ])
    protocol = (
        f"<p>One L2 logistic regression per label on frozen, standardised features; C chosen per label on the "
        f"validation split from {html.esc(probe.get('C'))}; test AUROC with {html.esc(probe.get('n_boot'))} "
        f"patient-bootstrap resamples. Training subsets draw whole patients, nested and seeded "
        f"(seed {html.esc(metrics.get('seed'))}).</p>"
    )
    table = per_label.loc[per_label["fraction"] == largest["fraction"]].copy()
    shown = pd.DataFrame({
        "label": table["label"],
        f"test AUROC ({level}% CI)": [html.interval(m, lo, hi) for m, lo, hi in
                                      zip(table["test_auroc"], table["test_auroc_lower"], table["test_auroc_upper"])],
        "val AUROC": table["val_auroc"],
        "C": table["C"],
        "train positives": table["n_train_pos"],
        "fitted": table["fitted"],
    })
    sections = [
        ("headline", "Headline", headline + protocol),
        ("label-efficiency", "Label efficiency", curve_section(curve, figure_path, alpha)),
        ("per-label", f"Per-label results ({largest['fraction'] * 100:g}% of training patients)", html.table(shown)),
    ]
    if config_text:
        sections.append(("config", "Configuration", f"<pre>{html.esc(config_text)}</pre>"))
    subtitle = (f"linear probe of {html.esc(metrics.get('backbone', '?'))} · test split: "
                f"{html.esc(metrics.get('n_images', {}).get('test', '?'))} images of "
                f"{html.esc(metrics.get('n_patients', {}).get('test', '?'))} patients")
    write_text(out, html.page("Linear probe report", subtitle, sections))
    return out
