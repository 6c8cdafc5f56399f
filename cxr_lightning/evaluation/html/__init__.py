"""Self-contained HTML pages: a run's ``report.html``, a probe's and a sweep's pages.

One file a person opens in a browser, offline: figures are embedded as base64 PNG (the training
curves as inline SVG), the style and the gallery's script are inline, nothing is fetched from the
network. The pages only lay out what evaluate, explain, probe and compare already wrote (their CSV,
JSON and PNG files); no number is computed here except the error class of each CAM overlay.

Split by what each module renders:

- :mod:`.page`: the document and its building blocks (escaping, tables, cards, intervals, figures);
- :mod:`.history`: the training curves from ``history.csv``;
- :mod:`.results`: ROC/PR figures, the per-label table, calibration, subgroups and underdiagnosis;
- :mod:`.gallery`: the Grad-CAM gallery and each overlay's error class;
- :mod:`.run_report`: a run's ``report.html``, assembled from the above.
"""
from __future__ import annotations

from cxr_lightning.evaluation.html.gallery import (
    ERROR_ORDER,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    TRUE_NEGATIVE,
    TRUE_POSITIVE,
    UNKNOWN,
    error_class,
    gallery_table,
)
from cxr_lightning.evaluation.html.history import HISTORY_MAX_BYTES, HISTORY_MAX_EPOCHS, read_history, training_curves
from cxr_lightning.evaluation.html.page import (
    DEMO_NOTE,
    TOO_FEW,
    cards,
    esc,
    figure,
    interval,
    page,
    png_data_uri,
    table,
)
from cxr_lightning.evaluation.html.results import DEFAULT_MIN_PATIENTS, subgroup_table, underdiagnosis_table
from cxr_lightning.evaluation.html.run_report import render_report, run_report

__all__ = [
    "DEFAULT_MIN_PATIENTS",
    "DEMO_NOTE",
    "ERROR_ORDER",
    "FALSE_NEGATIVE",
    "FALSE_POSITIVE",
    "HISTORY_MAX_BYTES",
    "HISTORY_MAX_EPOCHS",
    "TOO_FEW",
    "TRUE_NEGATIVE",
    "TRUE_POSITIVE",
    "UNKNOWN",
    "cards",
    "error_class",
    "esc",
    "figure",
    "gallery_table",
    "interval",
    "page",
    "png_data_uri",
    "read_history",
    "render_report",
    "run_report",
    "subgroup_table",
    "table",
    "training_curves",
    "underdiagnosis_table",
]
