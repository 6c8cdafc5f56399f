"""A run's ``report.html``: the headline figures, then the sections of :mod:`.history`,
:mod:`.results` and :mod:`.gallery`, the localisation scores, the model card and the configuration,
from whichever of evaluate's and explain's files the run holds.

The files of a run directory the report reads (each optional except the evaluation's metrics) are
named by run_dir.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_lightning.evaluation.html.gallery import GALLERY_SCRIPT, gallery_section
from cxr_lightning.evaluation.html.history import training_curves
from cxr_lightning.evaluation.html.page import (
    DEMO_NOTE,
    cards,
    esc,
    finite,
    interval,
    optional_csv,
    optional_json,
    page,
    table,
)
from cxr_lightning.evaluation.html.results import (
    DEFAULT_MIN_PATIENTS,
    calibration_section,
    confidence_level,
    per_label_section,
    roc_pr_section,
    subgroups_section,
)
from cxr_lightning.files import write_text
from cxr_lightning.run_dir import EvaluationDir, ExplainDir, RunDir

# model_card.md may come from elsewhere: the page reads at most this much of it.
MODEL_CARD_MAX_BYTES = 1_000_000
# The evaluation's settings the configuration section lists beside the training config.
EVALUATION_FACTS = ("checkpoint", "checkpoint_sha256", "data_root", "label_table", "split",
                    "threshold_method", "thresholds_file", "n_boot", "alpha", "seed")


def run_report(run_dir: str | Path) -> Path | None:
    """(Re)render ``run_dir/report.html`` from what the run holds; None when it is not evaluated yet.

    Called at the end of evaluate and of explain, so the page shows whichever parts exist.
    """
    run = RunDir(run_dir)
    if not run.evaluation.metrics.is_file():
        return None
    return render_report(run.evaluation.root, run.explain.root, run.config, run.report_html, history=run.history)


def render_report(
    evaluation_dir: str | Path,
    explain_dir: str | Path | None = None,
    config_file: str | Path | None = None,
    out: str | Path | None = None,
    history: str | Path | None = None,
    min_patients: int | None = None,
) -> Path:
    """Write the report page of one evaluation (and its explain outputs, when given) to ``out``
    (default ``evaluation_dir/report.html``); returns its path.

    ``history`` is the training run's ``history.csv`` (drawn as training curves); subgroups of
    fewer than ``min_patients`` patients (default: the evaluation's own ``min_patients`` setting,
    else DEFAULT_MIN_PATIENTS) show ``too few`` in place of their interval."""
    ev = Path(evaluation_dir)
    metrics = optional_json(EvaluationDir(ev).metrics)
    per_class = pd.read_csv(EvaluationDir(ev).per_class, index_col=0)
    explain = Path(explain_dir) if explain_dir is not None and Path(explain_dir).is_dir() else None
    ex_metrics = optional_json(ExplainDir(explain).metrics) if explain else {}
    config = metrics.get("config") or {}
    if min_patients is None:
        min_patients = _written_min_patients(metrics)

    sections = [
        ("headline", "Headline", _headline(metrics, ex_metrics, demo=config.get("data_source") == "demo")),
        ("training", "Training curves", training_curves(history)),
        ("curves", "ROC and precision-recall curves", roc_pr_section(ev)),
        ("per-label", "Per-label results", per_label_section(per_class, metrics)),
        ("calibration", "Calibration", calibration_section(ev, metrics)),
        ("subgroups", "Subgroups and underdiagnosis", subgroups_section(ev, metrics, min_patients)),
    ]
    if explain is not None:
        sections += [
            ("gallery", "Grad-CAM gallery", gallery_section(explain, ev, per_class)),
            ("localisation", "Localisation", _localisation(explain, ex_metrics)),
        ]
    sections.append(("model-card", "Model card", _model_card(EvaluationDir(ev).model_card)))
    sections.append(("config", "Configuration", _config(metrics, config, config_file)))
    text = page("Evaluation report", _subtitle(metrics, config), sections, GALLERY_SCRIPT)
    target = Path(out) if out is not None else EvaluationDir(ev).report_html
    write_text(target, text)
    return target


def _written_min_patients(metrics: Mapping[str, Any]) -> int:
    # explain re-renders the page without evaluate's config: the evaluation's metrics keep it
    written = metrics.get("min_patients", DEFAULT_MIN_PATIENTS)
    valid = isinstance(written, int) and not isinstance(written, bool) and written >= 0
    return written if valid else DEFAULT_MIN_PATIENTS


def _subtitle(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    return (f"{esc(config.get('backbone', '?'))} + {esc(config.get('head', '?'))} · "
            f"{esc(metrics.get('split', '?'))} split: {esc(metrics.get('n_images', '?'))} images of "
            f"{esc(metrics.get('n_patients', '?'))} patients · checkpoint {esc(metrics.get('checkpoint', '?'))}")


def _headline(metrics: Mapping[str, Any], ex_metrics: Mapping[str, Any], demo: bool) -> str:
    """The demo note, the headline cards, then the notes on undefined labels, the competition labels
    and each source of a pooled run."""
    note = f'<p class="note">{esc(DEMO_NOTE)}</p>' if demo else ""
    return note + cards(_headline_cards(metrics, ex_metrics)) + _headline_notes(metrics)


def _headline_cards(metrics: Mapping[str, Any], ex_metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    level = confidence_level(metrics)

    def ci(key: str) -> str:
        lower, upper = metrics.get(f"{key}_lower"), metrics.get(f"{key}_upper")
        if not (finite(lower) and finite(upper)):
            return ""
        return f"{level}% CI {lower:.3f}–{upper:.3f} (patient bootstrap)"

    items = [
        ("mean AUROC", interval(metrics.get("auroc_mean")), ci("auroc_mean")),
        ("mean AUPRC", interval(metrics.get("auprc_mean")), ci("auprc_mean")),
        ("macro F1", interval(metrics.get("f1_macro")), "at val-chosen thresholds"),
        ("mean sensitivity", interval(metrics.get("sensitivity_mean")), "at val-chosen thresholds"),
        ("mean specificity", interval(metrics.get("specificity_mean")), "at val-chosen thresholds"),
        ("mean ECE", interval(metrics.get("ece_mean")),
         f"before calibration {interval(metrics.get('ece_mean_uncalibrated'))}"
         if metrics.get("calibration_method", "none") != "none" else "uncalibrated"),
    ]
    if "localization.pointing_game" in ex_metrics:
        items.append(("pointing game", interval(ex_metrics["localization.pointing_game"]),
                      f"random baseline {interval(ex_metrics.get('localization.random_pointing_game'))}"))
    return items


def _headline_notes(metrics: Mapping[str, Any]) -> str:
    undefined = metrics.get("undefined_labels") or []
    extra = (f"<p>Labels without a defined AUROC in this split (left out of the means): "
             f"{esc(', '.join(undefined))}.</p>" if undefined else "")
    headline = metrics.get("competition") or {}
    if headline:
        extra += (f"<p>CheXpert's five competition labels ({esc(', '.join(headline['labels']))}): mean AUROC "
                  f"{esc(interval(headline['auroc_mean'], headline['lower'], headline['upper']))}.</p>")
    per_source = metrics.get("per_source") or {}
    if per_source:
        frame = pd.DataFrame([
            {"source": name, "images": s["n_images"], "patients": s["n_patients"],
             "mean AUROC": interval(s["auroc_mean"], s["lower"], s["upper"]), "labels scored": ", ".join(s["labels"])}
            for name, s in per_source.items()])
        extra += ("<h3>Per source</h3><p>Each source's test images alone, over the labels that source scores; two "
                  "sources' means compare only over the labels both score.</p>" + table(frame))
    return extra


def _localisation(explain: Path, ex_metrics: Mapping[str, Any]) -> str:
    scores = optional_csv(ExplainDir(explain).localization, index_col=0)
    if scores is None:
        return '<p class="muted">No localisation scores (the split has no boxes, or localization=false).</p>'
    return ("<p>Pointing game, IoU and IoBB accuracy of the CAMs against the ground-truth boxes of every "
            f"boxed image of the {esc(ex_metrics.get('split') or 'given')} split, each beside its random baseline.</p>"
            + table(scores, index=True))


def _config(metrics: Mapping[str, Any], config: Mapping[str, Any], config_file: str | Path | None) -> str:
    summary = pd.DataFrame({"setting": list(config), "value": [str(v) for v in config.values()]})
    facts = {k: metrics[k] for k in EVALUATION_FACTS if k in metrics}
    evaluation = pd.DataFrame({"setting": list(facts), "value": [str(v) for v in facts.values()]})
    text = table(summary) + "<h3>Evaluation</h3>" + table(evaluation)
    if config_file is not None and Path(config_file).is_file():
        text += (f"<details><summary>Full training config ({esc(Path(config_file).name)})</summary>"
                 f"<pre>{esc(Path(config_file).read_text())}</pre></details>")
    return text


def _model_card(path: Path) -> str:
    if not path.is_file():
        return f'<p class="muted">No model card ({esc(path.name)} was not written).</p>'
    with path.open("rb") as handle:
        raw = handle.read(MODEL_CARD_MAX_BYTES + 1)
    cut = len(raw) > MODEL_CARD_MAX_BYTES
    text = raw[:MODEL_CARD_MAX_BYTES].decode("utf-8", errors="replace")
    more = (f'<p class="muted">The model card is cut at {MODEL_CARD_MAX_BYTES} bytes; read {esc(path.name)}.</p>'
            if cut else "")
    return (f"<p>The content of {esc(path.name)}, as evaluation wrote it.</p>"
            f'<pre class="model-card">{esc(text)}</pre>{more}')
