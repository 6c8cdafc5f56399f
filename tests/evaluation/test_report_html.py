"""report.html: a self-contained page of a run, checked as files and as rendered by headless Chromium.

Most tests build a run directory by hand, in the exact formats evaluate and explain write, so the
gallery's outcomes are known in advance; one slow test renders the page of a real tiny run.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_lightning import run_dir
from cxr_lightning.evaluation import html

FINDINGS = ["Effusion", "Mass", "Nodule"]
# (image, finding, probability, truth); thresholds below make each row's outcome known.
THRESHOLDS = {"Effusion": 0.5, "Mass": 0.3, "Nodule": 0.6}
CAMS = [
    ("00000001_000.png", "Effusion", 0.91, 1),  # true positive
    ("00000001_000.png", "Mass", 0.20, 1),  # false negative
    ("00000002_000.png", "Nodule", 0.70, 0),  # false positive
    ("00000002_000.png", "Effusion", 0.10, 0),  # true negative
    ("00000003_001.png", "Nodule", 0.40, 1),  # false negative
    ("00000003_001.png", "Mass", 0.55, 1),  # true positive
]
EXPECTED = ["true positive", "false negative", "false positive", "true negative", "false negative", "true positive"]
OVERLAY_COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_run(run: Path, calibrated: bool = False, underdiagnosis: bool = False) -> Path:
    ev, ex = run / "evaluation", run / "explain"
    per_class = pd.DataFrame(
        {
            "n_pos": [3, 2, 1], "n_neg": [5, 6, 7],
            "auroc": [0.9, 0.8, 0.7], "auroc_lower": [0.8, 0.6, 0.5], "auroc_upper": [0.97, 0.9, 0.85],
            "auprc": [0.7, 0.6, 0.3], "auprc_lower": [0.5, 0.4, 0.1], "auprc_upper": [0.9, 0.8, 0.5],
            "threshold": [THRESHOLDS[f] for f in FINDINGS],
            "sensitivity": [0.9, 0.5, 0.4], "specificity": [0.8, 0.9, 0.7], "precision": [0.7, 0.6, 0.2],
            "f1": [0.78, 0.55, 0.27], "ece": [0.05, 0.07, 0.09],
        },
        index=pd.Index(FINDINGS, name="label"),
    )
    per_class.loc["mean"] = per_class.mean()
    ev.mkdir(parents=True)
    per_class.to_csv(ev / "per_class.csv")
    pd.DataFrame(
        {"attribute": ["sex", "sex"], "group": ["F", "M"], "n_images": [4, 4], "n_patients": [2, 1],
         "n_labels": [3, 3], "auroc_mean": [0.81, 0.77], "lower": [0.7, 0.6], "upper": [0.9, 0.88]}
    ).to_csv(ev / "subgroups.csv", index=False)
    images = sorted({c[0] for c in CAMS})
    truth = {(i, f): t for i, f, _, t in CAMS}
    predictions = pd.DataFrame({"Image Index": images, "Patient ID": [1, 2, 3]})
    for f in FINDINGS:
        predictions[f"label:{f}"] = [truth.get((i, f), 0) for i in images]
        predictions[f"prob:{f}"] = 0.5
    predictions.to_csv(ev / run_dir.PREDICTIONS, index=False)
    metrics = {
        "checkpoint": str(run / "checkpoints" / "best.ckpt"), "split": "test", "n_images": 3, "n_patients": 3,
        "alpha": 0.05, "auroc_mean": 0.8, "auroc_mean_lower": 0.71, "auroc_mean_upper": 0.88,
        "auprc_mean": 0.53, "auprc_mean_lower": 0.4, "auprc_mean_upper": 0.66, "f1_macro": 0.53,
        "sensitivity_mean": 0.6, "specificity_mean": 0.8, "ece_mean": 0.07, "threshold_method": "f1",
        "calibration_bins": 15, "config": {"backbone": "resnet18", "head": "fusion_residual", "data_source": "demo"},
    }
    if calibrated:
        metrics.update(ece_mean_uncalibrated=0.19, calibration_method="platt",
                       calibration="platt scaling per label, fitted on 40 validation images")
    (ev / "metrics.json").write_text(json.dumps(metrics))
    for name in ("roc.png", "pr.png", run_dir.FIGURES["reliability"]):
        _png(ev / name, (400, 300), (90, 140, 200))
    if underdiagnosis:
        # the columns statistics.underdiagnosis writes: a big group and one too small for its interval
        pd.DataFrame({"attribute": ["sex", "sex"], "group": ["F", "M"], "n_images": [80, 6], "n_patients": [40, 5],
                      "n_with_finding": [50, 4], "underdiagnosis": [0.31, 0.25], "underdiagnosis_lower": [0.2, 0.25],
                      "underdiagnosis_upper": [0.42, 0.25], "fnr.Atelectasis": [0.12, 0.5],
                      "fnr.Atelectasis_lower": [0.05, 0.5], "fnr.Atelectasis_upper": [0.2, 0.5]}).to_csv(
            ev / run_dir.UNDERDIAGNOSIS, index=False)
    (ev / run_dir.MODEL_CARD).write_text("# Model card\n\n## Intended use\nResearch only <not clinical>.\n")
    pd.DataFrame({"epoch": [0, 1, 2], "step": [1, 2, 3], "train/loss": [0.9, 0.7, 0.6], "val/loss": [0.95, 0.8, 0.75],
                  "val/auroc_mean": [0.55, 0.61, 0.66], "lr": [1e-3, 5e-4, 1e-4]}).to_csv(
        run / run_dir.HISTORY, index=False)
    rows = []
    for k, ((image, finding, p, _), colour) in enumerate(zip(CAMS, OVERLAY_COLOURS)):
        overlay = f"overlays/{k:03d}_{Path(image).stem}_{finding}.png"
        _png(ex / overlay, (64, 80), colour)
        rows.append({"image": image, "finding": finding, "probability": p, "zero_gradient": False, "empty": False,
                     "n_boxes": 1, "title": f"{finding} p={p:.2f}", "overlay": overlay})
    pd.DataFrame(rows).to_csv(ex / "cams.csv", index=False)
    pd.DataFrame({"n_images": [2], "n_boxes": [2], "pointing_game": [0.5], "random_pointing_game": [0.04]},
                 index=pd.Index(["All"], name="finding")).to_csv(ex / "localization.csv")
    (ex / "metrics.json").write_text(json.dumps({"split": "test", "localization.pointing_game": 0.5,
                                                  "localization.random_pointing_game": 0.04}))
    (run / "config.yaml").write_text("backbone:\n  name: resnet18\nhead:\n  name: fusion_residual\n")
    return run


class _Elements(HTMLParser):
    """Start tags with their attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _elements(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(text)
    return parser.tags


def _cards(text: str) -> list[dict[str, str | None]]:
    return [a for t, a in _elements(text) if t == "figure" and "cam" in (a.get("class") or "").split()]


# ---------------------------------------------------------------------------------------------
# The page as a file


def test_outcome_of_each_overlay_from_truth_and_threshold(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run")
    cams = pd.read_csv(run / "explain" / "cams.csv")
    table = html.gallery_table(cams, pd.read_csv(run / "evaluation" / run_dir.PREDICTIONS), THRESHOLDS)
    assert list(table["error"]) == EXPECTED
    assert list(table["rank"]) == [html.ERROR_ORDER.index(e) for e in EXPECTED]
    # an image the evaluated split does not hold has no label to compare with
    other = cams.assign(image="elsewhere.png")
    predictions = pd.read_csv(run / "evaluation" / run_dir.PREDICTIONS)
    assert set(html.gallery_table(other, predictions, THRESHOLDS)["error"]) == {html.UNKNOWN}


def test_page_is_one_self_contained_file_with_every_part(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", underdiagnosis=True)
    page = html.run_report(run)
    assert page == run / "report.html"
    text = page.read_text()
    # nothing fetched: no external script, style sheet, image or font
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", text)
    assert "<link" not in text and "@import" not in text
    tags = _elements(text)
    images = [a["src"] for t, a in tags if t == "img"]
    # roc, pr, reliability and the six overlays, each the exact bytes of its PNG
    assert len(images) == 9 and all(src.startswith("data:image/png;base64,") for src in images)
    roc = (run / "evaluation" / "roc.png").read_bytes()
    assert base64.b64encode(roc).decode() in text
    ids = {a.get("id") for _, a in tags}
    assert {"headline", "curves", "per-label", "calibration", "subgroups", "gallery", "localisation", "config"} <= ids
    assert "0.800" in text and "0.710–0.880" in text  # headline AUROC with its interval
    for finding in FINDINGS:
        assert f"<td>{finding}</td>" in text
    # underdiagnosis: one readable cell per rate; the 5-patient group's interval is "too few"
    assert "0.310 (0.200–0.420)" in text and "0.120 (0.050–0.200)" in text and "FNR Atelectasis" in text
    assert "0.250 (too few)" in text and "0.250 (0.250–0.250)" not in text
    assert "fnr." not in text and "_lower" not in text and "_upper" not in text
    # the model card, escaped, and the training curves drawn inline
    assert "model-card" in ids and "Research only &lt;not clinical&gt;." in text
    assert "training-curves" in ids and text.count("<svg") == 1
    assert "name: fusion_residual" in text  # the config file itself
    assert html.DEMO_NOTE in text
    assert "applied no post-hoc calibration" in text


def test_min_patients_comes_from_the_evaluation(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", underdiagnosis=True)
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    (run / "evaluation" / "metrics.json").write_text(json.dumps({**metrics, "min_patients": 3}))
    text = html.run_report(run).read_text()
    assert "0.250 (0.250–0.250)" in text and "0.250 (too few)" not in text
    assert "fewer than 3 patients" in text


def test_calibrated_evaluation_shows_reliability_before_and_after(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", calibrated=True)
    text = html.run_report(run).read_text()
    assert "Reliability before (grey, raw) and after (blue) calibration" in text
    assert "0.190" in text and "platt scaling per label, fitted on 40 validation images" in text
    assert len([a for t, a in _elements(text) if t == "img"]) == 9


def test_without_explain_the_page_has_no_gallery_and_without_evaluation_there_is_none(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run")
    shutil.rmtree(run / "explain")
    text = html.run_report(run).read_text()
    assert 'id="cam-grid"' not in text and 'id="per-label"' in text
    assert html.run_report(tmp_path / "not-evaluated") is None


def test_missing_figure_is_said_on_the_page(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run")
    (run / "evaluation" / "pr.png").unlink()
    (run / "explain" / "overlays" / "000_00000001_000_Effusion.png").unlink()
    text = html.run_report(run).read_text()
    assert "pr.png was not written" in text and "overlay 000_00000001_000_Effusion.png is missing" in text


def test_readable_tables_put_interval_and_patient_count_in_each_cell() -> None:
    under = pd.DataFrame({"attribute": ["age_band", "age_band"], "group": ["20-39", "80+"], "n_images": [90, 9],
                          "n_patients": [31, 29], "n_with_finding": [60, 7], "underdiagnosis": [0.2, float("nan")],
                          "underdiagnosis_lower": [0.1, float("nan")], "underdiagnosis_upper": [0.3, float("nan")],
                          "fnr.No Finding x": [0.4, 0.6], "fnr.No Finding x_lower": [0.35, 0.6],
                          "fnr.No Finding x_upper": [0.45, 0.6]})
    shown = html.underdiagnosis_table(under, min_patients=30)
    assert list(shown.columns) == ["attribute", "group", "patients", "images", "with a finding", "underdiagnosis",
                                   "FNR No Finding x"]
    assert list(shown["patients"]) == [31, 29]
    assert list(shown["underdiagnosis"]) == ["0.200 (0.100–0.300)", "n/a"]
    assert list(shown["FNR No Finding x"]) == ["0.400 (0.350–0.450)", "0.600 (too few)"]
    # the threshold is the caller's
    assert html.underdiagnosis_table(under, min_patients=10)["FNR No Finding x"].iloc[1] == "0.600 (0.600–0.600)"
    subgroups = pd.DataFrame({"attribute": ["sex"], "group": ["F"], "n_images": [8], "n_patients": [5], "n_labels": [3],
                              "auroc_mean": [0.81], "lower": [0.7], "upper": [0.9]})
    assert html.subgroup_table(subgroups).iloc[0].to_dict() == {
        "attribute": "sex", "group": "F", "patients": 5, "images": 8, "labels scored": 3,
        "mean AUROC (95% CI)": "0.810 (too few)"}


def test_training_curves_from_history_and_one_line_when_it_is_missing_or_malformed(tmp_path: Path) -> None:
    history = tmp_path / run_dir.HISTORY
    pd.DataFrame({"epoch": [0, 1, 2], "train/loss": [0.9, "x", 0.6], "val/loss": [0.95, 0.8, 0.75],
                  "val/auroc_mean": [0.55, 0.61, float("inf")], "lr": [1e-3, 5e-4, 1e-4]}).to_csv(history, index=False)
    frame, note = html.read_history(history)
    assert note == "" and list(frame.index) == [0.0, 1.0, 2.0]
    assert frame["train/loss"].isna().tolist() == [False, True, False]  # a non-number is a gap, not a crash
    assert frame["val/auroc_mean"].notna().tolist() == [True, True, False]
    svg = html.training_curves(history)
    assert svg.count("<svg") == 1 and "learning rate" in svg and "validation mean AUROC" in svg
    assert 'id="training-curves"' in svg

    notes = {}
    notes["missing"] = html.training_curves(tmp_path / "absent.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage\x00")
    notes["binary"] = html.training_curves(tmp_path / "binary.csv")
    (tmp_path / "noepoch.csv").write_text("a,b\n1,2\n")
    notes["no epoch"] = html.training_curves(tmp_path / "noepoch.csv")
    (tmp_path / "empty.csv").write_text("")
    notes["empty"] = html.training_curves(tmp_path / "empty.csv")
    (tmp_path / "huge.csv").write_text("epoch,val/loss\n" + "0,1\n" * (html.HISTORY_MAX_BYTES // 4 + 1))
    notes["huge"] = html.training_curves(tmp_path / "huge.csv")
    for case, text in notes.items():
        assert text.startswith('<p class="muted" id="no-curves">No training curves') and "<svg" not in text, case
        assert text.count("\n") == 0, case
    assert "more than" in notes["huge"] and "no epoch column" in notes["no epoch"]


# ---------------------------------------------------------------------------------------------
# The page in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium; .ci/run installs it)"
)


def _chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def _rendered(tmp_path: Path, page: Path, fragment: str = "") -> str:
    return _chromium(tmp_path, page.as_uri() + fragment, "--dump-dom").stdout


@needs_chromium
def test_browser_shows_every_figure_and_sorts_false_negatives_first(tmp_path: Path) -> None:
    page = html.run_report(_write_run(tmp_path / "run"))
    dom = _rendered(tmp_path, page)
    tags = _elements(dom)
    assert dict(tags)["body"].get("data-figures-checked") == "yes", "the page's script did not run"
    shown = [a.get("data-shown") for t, a in tags if t == "img"]
    assert len(shown) == 9 and set(shown) == {"yes"}, shown
    # every card is still inside the gallery's grid after the script moved them (cards hold no div)
    grid = dom.split('<div id="cam-grid"', 1)[1].split("</div>", 1)[0]
    assert grid.count('<figure class="cam ') == len(CAMS)
    order = [c["data-error"] for c in _cards(dom)]
    # errors first: both false negatives, then the false positive, then the rest (ties by probability)
    assert order == ["false negative", "false negative", "false positive", "true positive", "true positive",
                     "true negative"]
    assert [float(c["data-probability"]) for c in _cards(dom)][:2] == [0.4, 0.2]
    assert "6 of 6 overlays shown" in dom
    assert "images</p>" not in dom  # no stray image counter when every figure loaded


@needs_chromium
def test_browser_page_fits_1280_px_with_curves_card_and_no_raw_columns(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", underdiagnosis=True)
    # a wide underdiagnosis table (one FNR column per finding of NIH's fourteen) must scroll in its box
    audit = pd.read_csv(run / "evaluation" / run_dir.UNDERDIAGNOSIS)
    for k in range(14):
        for suffix in ("", "_lower", "_upper"):
            audit[f"fnr.Finding number {k}{suffix}"] = 0.5
    audit.to_csv(run / "evaluation" / run_dir.UNDERDIAGNOSIS, index=False)
    page = html.run_report(run)
    probe = page.with_name("probe.html")
    script = ("<script>window.addEventListener('load',function(){var b=document.body;"
              "b.dataset.scrollWidth=document.documentElement.scrollWidth;"
              "b.dataset.visible=encodeURIComponent(b.innerText);});</script></body>")
    probe.write_text(page.read_text().replace("</body>", script))
    dom = _chromium(tmp_path, probe.as_uri(), "--window-size=1280,900", "--dump-dom").stdout
    body = dict(_elements(dom))["body"]
    assert int(body["data-scroll-width"]) <= 1280, body["data-scroll-width"]
    visible = unquote(body["data-visible"])
    assert "Training curves" in visible and "Model card" in visible and "Research only <not clinical>." in visible
    assert "FNR Finding number 13" in visible
    for raw in ("fnr.", "_lower", "_upper"):
        assert raw not in visible, raw
    assert 'id="training-curves"' in dom and "<svg" in dom


@needs_chromium
def test_browser_sorts_by_probability_and_filters_by_finding_and_outcome(tmp_path: Path) -> None:
    page = html.run_report(_write_run(tmp_path / "run"))
    by_probability = _cards(_rendered(tmp_path, page, "#sort=probability"))
    probabilities = [float(c["data-probability"]) for c in by_probability]
    assert probabilities == sorted((p for _, _, p, _ in CAMS), reverse=True)

    mass = _rendered(tmp_path, page, "#finding=Mass")
    visible = [c for c in _cards(mass) if "hidden" not in c]
    assert {c["data-finding"] for c in visible} == {"Mass"} and len(visible) == 2
    assert "2 of 6 overlays shown" in mass

    misses = [c for c in _cards(_rendered(tmp_path, page, "#error=false%20negative")) if "hidden" not in c]
    assert [(c["data-image"], c["data-finding"]) for c in misses] == [
        ("00000003_001.png", "Nodule"), ("00000001_000.png", "Mass")]


@needs_chromium
def test_screenshot_shows_the_page(tmp_path: Path) -> None:
    page = html.run_report(_write_run(tmp_path / "run"))
    shot = tmp_path / "report.png"
    _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    # the dark header band and the figures' blue (below the training curves) are drawn, not a blank page
    header = pixels[:40].reshape(-1, 3).mean(axis=0)
    assert header[2] < 120 and header.sum() < 300, header
    assert (np.abs(pixels.astype(int) - (90, 140, 200)).sum(axis=2) < 30).sum() > 5000


# ---------------------------------------------------------------------------------------------
# A real run: evaluate writes the page, explain adds its gallery, summary points at it


@pytest.mark.slow
def test_evaluate_then_explain_render_the_run_page(tiny_demo: Path, tmp_path: Path, capsys) -> None:
    from helpers import compose_config, fit_tiny

    from cxr_lightning.checkpoints import load_model
    from cxr_lightning.tasks.build import datamodule_for
    from cxr_lightning.tasks.evaluate import evaluate, predict_split
    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.summary import print_summary

    run, ckpt = fit_tiny(tiny_demo, tmp_path / "run")
    evaluate(compose_config([f"run_dir={run}", "n_boot=20", "data.num_workers=0"], config_name="evaluate"))
    page = run / "report.html"
    before = page.read_text()
    assert 'id="per-label"' in before and 'id="cam-grid"' not in before
    # the run's own history.csv drawn as curves, and evaluate's model card on the page
    assert (run / run_dir.HISTORY).is_file() and 'id="training-curves"' in before and "<svg" in before
    assert 'id="model-card"' in before and "fnr." not in before

    # predictions.csv holds the split's labels and the model's calibrated probabilities, computed again here
    from cxr_lightning.operating_point import load_calibration

    model = load_model(ckpt)
    raw, table = predict_split(model, datamodule_for(model, {"num_workers": 0}), "test")
    calibration, _ = load_calibration(ckpt, model.hparams.label_names)
    probs = calibration.apply(raw)
    predictions = pd.read_csv(run / "evaluation" / run_dir.PREDICTIONS)
    assert list(predictions["Image Index"]) == list(table["Image Index"])
    names = list(model.hparams.label_names)
    assert np.allclose(predictions[[f"prob:{n}" for n in names]].to_numpy(), probs, atol=1e-6)
    labels = [f"label:{n}" for n in names]
    assert (predictions[labels].to_numpy() == table[labels].to_numpy()).all()

    explain(compose_config([f"run_dir={run}", "split=test", "n=3", "top_k=2", "data.num_workers=0"],
                           config_name="explain"))
    text = page.read_text()
    cams = pd.read_csv(run / "explain" / "cams.csv")
    cards = _cards(text)
    assert len(cams) == 6 and len(cards) == len(cams)
    assert {(c["data-image"], c["data-finding"]) for c in cards} == set(zip(cams["image"], cams["finding"]))
    assert {c["data-error"] for c in cards} <= set(html.ERROR_ORDER) - {html.UNKNOWN}
    assert "backbone:" in text  # the run's config.yaml

    capsys.readouterr()
    assert print_summary(run) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].endswith(str(page.resolve()))
    if CHROMIUM is not None:
        shown = [a.get("data-shown") for t, a in _elements(_rendered(tmp_path, page)) if t == "img"]
        assert len(shown) == 3 + len(cams) and set(shown) == {"yes"}
