"""Evaluation end to end on a tiny fit: report files, intervals, thresholds chosen on val, subgroups."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_config, fit_tiny
from torchmetrics.functional.classification import binary_auroc

from cxr_lightning import files
from cxr_lightning.checkpoints import load_model
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.evaluation.statistics import expected_calibration_error
from cxr_lightning.operating_point import load_calibration, load_operating_point, save_thresholds
from cxr_lightning.run_dir import calibration_path, thresholds_path
from cxr_lightning.tasks.build import datamodule_for
from cxr_lightning.tasks.evaluate import evaluate, predict_split

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_BOOT = 50


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    return fit_tiny(tiny_demo, tmp_path_factory.mktemp("run"), head="fusion_residual")


@pytest.fixture(scope="module")
def evaluation(fitted):
    run_dir, _ = fitted
    cfg = compose_config([f"run_dir={run_dir}", f"n_boot={N_BOOT}", "data.num_workers=0"], config_name="evaluate")
    return evaluate(cfg)


@pytest.fixture(scope="module")
def predictions(fitted, evaluation):
    """Val and test probabilities computed here, independently of evaluate's own pass, through the
    calibration evaluate saved (every figure of the report is on that scale)."""
    _, ckpt = fitted
    model = load_model(ckpt)
    dm = datamodule_for(model, {"num_workers": 0})
    labels = list(model.hparams.label_names)
    calibration, _ = load_calibration(ckpt, labels)
    cols = [f"label:{n}" for n in labels]
    out = {}
    for split in ("val", "test"):
        probs, table = predict_split(model, dm, split)
        out[split] = (calibration.apply(probs), table[cols].to_numpy(), table)
        out[f"raw_{split}"] = probs
    return labels, out


def test_calibration_is_fitted_on_val_saved_beside_the_checkpoint_and_reported(fitted, evaluation, predictions):
    _, ckpt = fitted
    labels, preds = predictions
    saved = json.loads(calibration_path(ckpt).read_text())
    assert evaluation.calibration_file == calibration_path(ckpt)
    assert saved["method"] == "platt" and saved["n_images"] == len(preds["val"][2])
    assert saved["checkpoint_sha256"] == files.file_digest(ckpt)
    _, y, _ = preds["test"]
    written = json.loads((evaluation.output_dir / "metrics.json").read_text())
    cal = expected_calibration_error(y, preds["test"][0], written["calibration_bins"])
    raw = expected_calibration_error(y, preds["raw_test"], written["calibration_bins"])
    for j, name in enumerate(labels):
        assert written[f"ece.{name}"] == pytest.approx(cal[j], abs=1e-6)
        assert written[f"ece_uncalibrated.{name}"] == pytest.approx(raw[j], abs=1e-6)
    assert written["ece_mean"] == pytest.approx(cal.mean(), abs=1e-6)
    assert written["ece_mean_uncalibrated"] == pytest.approx(raw.mean(), abs=1e-6)
    text = (evaluation.output_dir / "report.md").read_text()
    assert f"platt scaling per label, fitted on {len(preds['val'][2])} validation images" in text
    assert "ECE raw" in text


def test_writes_every_report_file_into_run_dir_evaluation(fitted, evaluation):
    run_dir, _ = fitted
    assert evaluation.output_dir == run_dir / "evaluation"
    for name in ("report.md", "metrics.json", "per_class.csv", "subgroups.csv"):
        assert (evaluation.output_dir / name).stat().st_size > 0, name
    for name in ("roc.png", "pr.png", "reliability.png"):
        assert (evaluation.output_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    # atomic writes leave no temporary files behind
    assert not [p for p in evaluation.output_dir.iterdir() if p.name.startswith(".")]


def test_report_names_data_split_counts_and_every_label(evaluation, predictions):
    labels, preds = predictions
    test_table = preds["test"][2]
    text = (evaluation.output_dir / "report.md").read_text()
    assert "Data_Entry_2017_v2020.csv" in text
    assert f"**test**: {len(test_table)} images of {test_table['Patient ID'].nunique()} patients" in text
    assert "test_resnet" in text and "fusion_residual" in text
    for name in labels:
        assert f"| {name} |" in text
    for figure in ("roc.png", "pr.png", "reliability.png"):
        assert f"]({figure})" in text
    written = json.loads((evaluation.output_dir / "metrics.json").read_text())
    assert written["n_images"] == len(test_table)
    assert written["n_patients"] == test_table["Patient ID"].nunique()
    assert written["label_table"] == "Data_Entry_2017_v2020.csv"
    assert written["config"]["backbone"] == "test_resnet"


def test_auroc_matches_an_independent_computation_and_lies_in_its_interval(evaluation, predictions):
    labels, preds = predictions
    probs, y, _ = preds["test"]
    table = pd.read_csv(evaluation.output_dir / "per_class.csv", index_col="label")
    assert list(table.index) == [*labels, "mean"]
    expected = {}
    for j, name in enumerate(labels):
        if 0 < y[:, j].sum() < len(y):
            expected[name] = float(binary_auroc(torch.from_numpy(probs[:, j]), torch.from_numpy(y[:, j]).long()))
    assert len(expected) >= 5  # enough defined labels for the test to mean something
    for name, auroc in expected.items():
        assert table.at[name, "auroc"] == pytest.approx(auroc, abs=1e-6), name
        assert table.at[name, "auroc_lower"] <= table.at[name, "auroc"] <= table.at[name, "auroc_upper"], name
    undefined = [n for n in labels if n not in expected]
    assert table.loc[undefined, "auroc"].isna().all()
    assert table.at["mean", "auroc"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    assert table.at["mean", "auroc_lower"] <= table.at["mean", "auroc"] <= table.at["mean", "auroc_upper"]
    assert table.at["mean", "auroc_lower"] < table.at["mean", "auroc_upper"]
    assert evaluation.metrics["auroc_mean"] == pytest.approx(table.at["mean", "auroc"])


def test_thresholds_saved_beside_checkpoint_are_f1_optimal_on_val(fitted, evaluation, predictions):
    _, ckpt = fitted
    labels, preds = predictions
    path = ckpt.with_name(ckpt.stem + ".thresholds.json")
    assert evaluation.thresholds_file == path == thresholds_path(ckpt)
    saved = json.loads(path.read_text())
    assert saved["method"] == "f1"
    assert saved["checkpoint_sha256"] == files.file_digest(ckpt)
    assert saved["checkpoint_size"] == ckpt.stat().st_size
    probs, y, _ = preds["val"]
    checked = 0
    for j, name in enumerate(labels):
        t = saved["thresholds"][name]
        if not 0 < y[:, j].sum() < len(y):
            assert t == 0.5 and name in saved["fallback_labels"]
            continue

        def f1(cut: float, j: int = j) -> float:
            called = probs[:, j] >= cut
            tp = (called & (y[:, j] == 1)).sum()
            return 2 * tp / (called.sum() + y[:, j].sum())

        assert f1(t) >= max(f1(c) for c in probs[:, j]) - 1e-12, name
        checked += 1
    assert checked >= 1


def test_operating_points_apply_the_val_thresholds_to_the_test_split(evaluation, predictions):
    labels, preds = predictions
    probs, y, _ = preds["test"]
    thresholds = json.loads(evaluation.thresholds_file.read_text())["thresholds"]
    table = pd.read_csv(evaluation.output_dir / "per_class.csv", index_col="label")
    for j, name in enumerate(labels):
        called = probs[:, j] >= thresholds[name]
        pos, neg = y[:, j] == 1, y[:, j] == 0
        assert table.at[name, "threshold"] == pytest.approx(thresholds[name])
        if pos.any():
            assert table.at[name, "sensitivity"] == pytest.approx((called & pos).sum() / pos.sum())
        if neg.any():
            assert table.at[name, "specificity"] == pytest.approx((~called & neg).sum() / neg.sum())
    assert 0.0 <= table.at["mean", "ece"] <= 1.0


def test_subgroups_by_sex_age_band_and_view(evaluation, predictions):
    _, preds = predictions
    test_table = preds["test"][2]
    groups = pd.read_csv(evaluation.output_dir / "subgroups.csv")
    assert set(groups["attribute"]) == {"sex", "age", "view"}
    sex = groups[groups["attribute"] == "sex"].set_index("group")["n_images"]
    assert sex.to_dict() == test_table["Patient Gender"].value_counts().to_dict()
    view = groups[groups["attribute"] == "view"].set_index("group")["n_images"]
    assert view.to_dict() == test_table["View Position"].value_counts().to_dict()
    ages = groups[groups["attribute"] == "age"]
    assert ages["n_images"].sum() == len(test_table)
    young = int((test_table["Patient Age"] < 40).sum() - (test_table["Patient Age"] < 20).sum())
    assert ages.set_index("group")["n_images"].get("20-39", 0) == young
    defined = groups[groups["n_labels"] > 0]
    assert not defined.empty
    assert (defined["lower"] <= defined["auroc_mean"] + 1e-12).all()
    assert (defined["auroc_mean"] <= defined["upper"] + 1e-12).all()


def test_load_thresholds_rejects_another_checkpoint_and_falls_back_without_file(fitted, tmp_path):
    _, ckpt = fitted
    copy = tmp_path / "model.ckpt"
    shutil.copy(ckpt, copy)
    labels = load_model(copy).hparams.label_names
    with pytest.warns(UserWarning, match="No thresholds file"):
        point = load_operating_point(copy, labels)
    assert point.thresholds_file is None and (point.thresholds == 0.5).all()

    wanted = np.linspace(0.1, 0.9, len(labels))
    save_thresholds(copy, labels, wanted, "youden", n_images=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        point = load_operating_point(copy, labels)
    np.testing.assert_allclose(point.thresholds, wanted)
    assert point.thresholds_file == tmp_path / "model.thresholds.json"

    with open(copy, "ab") as fh:  # the checkpoint changes (retrained) after evaluate
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match="different checkpoint"):
        load_operating_point(copy, labels)


def test_bad_settings_fail_before_any_work(fitted):
    run_dir, _ = fitted
    cfg = compose_config([f"run_dir={run_dir}", "threshold_method=median"], config_name="evaluate")
    with pytest.raises(ConfigError, match="threshold_method='median'"):
        evaluate(cfg)
    cfg = compose_config([f"run_dir={run_dir}", "+data.colour=red", "output_dir=unused"], config_name="evaluate")
    with pytest.raises(ConfigError, match=r"Unknown data override\(s\) \['colour'\]"):
        evaluate(cfg)
    cfg = compose_config([f"run_dir={run_dir}", "min_patients=-1"], config_name="evaluate")
    with pytest.raises(ConfigError, match="min_patients=-1"):
        evaluate(cfg)


def test_model_card_and_underdiagnosis_carry_the_real_figures(evaluation, predictions):
    labels, preds = predictions
    test_table = preds["test"][2]
    written = json.loads((evaluation.output_dir / "metrics.json").read_text())
    card = (evaluation.output_dir / "model_card.md").read_text()
    assert "frontal" in card and "text-mined" in card and "TRIPOD+AI" in card and "CLAIM" in card
    assert f"Mean AUROC {written['auroc_mean']:.3f} (" in card
    assert f"ECE {written['ece_mean']:.3f} after, {written['ece_mean_uncalibrated']:.3f} before" in card
    assert f"({len(test_table)} images, {test_table['Patient ID'].nunique()} patients)" in card
    y = preds["test"][1]
    first = labels[0]
    assert f"| {first} | " in card and f"{y[:, 0].mean():.3f}" in card  # the label's test prevalence
    audit = pd.read_csv(evaluation.output_dir / "underdiagnosis.csv")
    assert set(audit["attribute"]) == {"sex", "age", "view", "sex_x_age"}
    sex = audit[audit["attribute"] == "sex"].set_index("group")
    assert sex["n_images"].to_dict() == test_table["Patient Gender"].value_counts().to_dict()
    group = sex.index[0]
    assert written[f"underdiagnosis.sex.{group}.underdiagnosis"] == pytest.approx(
        sex.at[group, "underdiagnosis"], nan_ok=True)
    # the rate by hand: images of the group with a finding, called No Finding at the saved thresholds
    t = json.loads(evaluation.thresholds_file.read_text())["thresholds"]
    probs = preds["test"][0]
    mask = (test_table["Patient Gender"] == group).to_numpy()
    findings = [j for j, n in enumerate(labels) if n != "No Finding"]
    has = y[:, findings].max(axis=1) == 1
    called_nf = probs[:, labels.index("No Finding")] >= t["No Finding"]
    assert sex.at[group, "underdiagnosis"] == pytest.approx((has & called_nf & mask).sum() / (has & mask).sum())
    assert "## Underdiagnosis" in (evaluation.output_dir / "report.md").read_text()
