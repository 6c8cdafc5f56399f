"""Thresholds and calibration are read as a pair: on the scale they were chosen on, with the
calibration they name by hash, and never another file's."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from cxr_lightning.calibration import Calibration
from cxr_lightning.errors import CheckpointError
from cxr_lightning.operating_point import (
    calibration_digest,
    load_calibration,
    load_operating_point,
    save_calibration,
    save_thresholds,
)
from cxr_lightning.run_dir import calibration_path, thresholds_path

LABELS = ["Effusion", "Mass", "No Finding"]


def platt(slope: float) -> Calibration:
    return Calibration("platt", LABELS, {n: {"slope": slope, "intercept": 0.0} for n in LABELS}, n_images=9)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "best.ckpt"
    path.write_bytes(b"weights")  # sidecars fingerprint the bytes; nothing here is loaded as a model
    return path


def test_sidecars_are_named_after_a_bundles_whole_name(tmp_path):
    assert thresholds_path(tmp_path / "best.ckpt") == tmp_path / "best.thresholds.json"
    assert thresholds_path(tmp_path / "best.safetensors") == tmp_path / "best.safetensors.thresholds.json"
    assert calibration_path(tmp_path / "best.safetensors") == tmp_path / "best.safetensors.calibration.json"


def test_calibrated_thresholds_come_with_their_calibration(model_file):
    calibration = platt(2.0)
    save_calibration(model_file, calibration)
    save_thresholds(model_file, LABELS, [0.2, 0.5, 0.7], "f1", 9, calibration=calibration)
    saved = json.loads(thresholds_path(model_file).read_text())
    assert saved["scale"] == "calibrated" and saved["calibration_sha256"] == calibration_digest(calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        point = load_operating_point(model_file, LABELS)
    np.testing.assert_allclose(point.thresholds, [0.2, 0.5, 0.7])
    assert point.calibration == calibration and point.calibration_file == calibration_path(model_file)
    raw = np.array([[0.6, 0.5, 0.4]])
    np.testing.assert_allclose(point.probabilities(raw), calibration.apply(raw))


def test_raw_scale_thresholds_are_applied_to_raw_probabilities_even_beside_a_calibration(model_file):
    save_calibration(model_file, platt(2.0))  # left from an earlier evaluation
    save_thresholds(model_file, LABELS, [0.3, 0.3, 0.3], "f1", 9, calibration=None)
    point = load_operating_point(model_file, LABELS)
    assert point.calibration is None and point.calibration_file is None
    raw = np.array([[0.6, 0.5, 0.4]])
    np.testing.assert_array_equal(point.probabilities(raw), raw)
    assert load_calibration(model_file, LABELS) == (None, None)


def test_a_calibration_the_thresholds_were_not_chosen_on_is_refused(model_file):
    save_thresholds(model_file, LABELS, [0.3, 0.3, 0.3], "f1", 9, calibration=platt(2.0))
    with pytest.raises(CheckpointError, match="chosen on calibrated probabilities, but no calibration"):
        load_operating_point(model_file, LABELS)
    save_calibration(model_file, platt(3.0))
    with pytest.raises(CheckpointError, match="chosen on another calibration") as info:
        load_operating_point(model_file, LABELS)
    assert str(thresholds_path(model_file)) in str(info.value) and "\n" not in str(info.value)


def test_thresholds_without_a_recorded_scale_take_the_calibration_beside_them(model_file):
    save_calibration(model_file, platt(2.0))
    save_thresholds(model_file, LABELS, [0.3, 0.3, 0.3], "f1", 9)
    path = thresholds_path(model_file)
    legacy = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("scale", "calibration_sha256")}
    path.write_text(json.dumps(legacy))
    assert load_operating_point(model_file, LABELS).calibration == platt(2.0)
    legacy["scale"] = ["calibrated"]
    path.write_text(json.dumps(legacy))
    with pytest.raises(CheckpointError, match="scale"):
        load_operating_point(model_file, LABELS)


def test_calibration_over_other_labels_keeps_fitted_maps_and_leaves_the_rest_raw():
    calibration = Calibration("platt", LABELS, {"Mass": {"slope": 2.0, "intercept": 0.0}}, 9, ["Effusion"])
    wider = calibration.over(["Mass", "Hernia"])
    assert wider.label_names == ["Mass", "Hernia"] and wider.unfitted == ["Hernia"]
    raw = np.array([[0.7, 0.7]])
    np.testing.assert_allclose(wider.apply(raw), [[calibration.apply(np.array([[0.1, 0.7, 0.2]]))[0, 1], 0.7]])
