"""Post-hoc calibration on constructed miscalibrated scores, and its file beside the checkpoint."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from cxr_lightning.calibration import Calibration, fit_calibration
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.evaluation.statistics import expected_calibration_error
from cxr_lightning.operating_point import load_calibration, save_calibration
from cxr_lightning.run_dir import calibration_path

NAMES = ["Nodule", "Effusion", "Mass"]


def pushed_up_scores(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels at 5/20/40 % prevalence and probabilities whose logits are shifted up by 2.5, as a
    class-weighted loss does: far above the observed rates."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(NAMES))) < [0.05, 0.2, 0.4]).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.5 * y + 2.5)))
    return y, p


def auroc(y: np.ndarray, p: np.ndarray) -> list[float]:
    return [float(binary_auroc(torch.from_numpy(p[:, j]), torch.from_numpy(y[:, j]).long())) for j in range(y.shape[1])]


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_fitted_on_val_lowers_test_ece_and_keeps_auroc(method):
    y, p = pushed_up_scores()
    val, test = slice(0, 2000), slice(2000, None)
    calibration = fit_calibration(y[val], p[val], method, NAMES)
    calibrated = calibration.apply(p[test])
    raw_ece = expected_calibration_error(y[test], p[test])
    ece = expected_calibration_error(y[test], calibrated)
    assert (raw_ece > 0.4).all()  # the constructed case is badly miscalibrated
    assert (ece < 0.05).all() and (ece < raw_ece / 10).all()
    tolerance = 0 if method == "platt" else 0.01  # isotonic steps merge scores into ties
    assert auroc(y[test], calibrated) == pytest.approx(auroc(y[test], p[test]), abs=tolerance or 1e-12)
    if method == "platt":  # strictly monotone: the order of every pair of images is kept
        order = np.argsort(p[test], axis=0, kind="stable")
        assert (np.diff(np.take_along_axis(calibrated, order, axis=0), axis=0) >= 0).all()


def test_temperature_rescales_without_reordering():
    y, p = pushed_up_scores(1000)
    calibration = fit_calibration(y, p, "temperature", NAMES)
    assert all(calibration.params[n]["intercept"] == 0.0 and calibration.params[n]["slope"] > 0 for n in NAMES)
    assert auroc(y, calibration.apply(p)) == pytest.approx(auroc(y, p), abs=1e-12)


def test_label_without_positives_keeps_raw_probabilities_and_is_named():
    y, p = pushed_up_scores(500)
    y[:, 0] = 0
    with pytest.warns(UserWarning, match=r"\['Nodule'\] keep their raw"):
        calibration = fit_calibration(y, p, "platt", NAMES)
    assert calibration.unfitted == ["Nodule"]
    np.testing.assert_array_equal(calibration.apply(p)[:, 0], p[:, 0])
    with pytest.raises(ConfigError, match="calibration.method='beta'"):
        fit_calibration(y, p, "beta", NAMES)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_file_round_trips_and_is_refused_for_a_changed_checkpoint(tmp_path, method):
    y, p = pushed_up_scores(600)
    fitted = fit_calibration(y, p, method, NAMES)
    ckpt = tmp_path / "epoch001.ckpt"
    ckpt.write_bytes(b"weights")
    with pytest.warns(UserWarning, match="No calibration file"):
        assert load_calibration(ckpt, NAMES) == (None, None)
    path = save_calibration(ckpt, fitted)
    assert path == calibration_path(ckpt) == tmp_path / "epoch001.calibration.json"
    saved = json.loads(path.read_text())
    assert saved["method"] == method and saved["n_images"] == 600 and saved["checkpoint"] == ckpt.name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, source = load_calibration(ckpt, NAMES)
    assert source == path and isinstance(loaded, Calibration)
    np.testing.assert_allclose(loaded.apply(p), fitted.apply(p), rtol=0, atol=1e-15)
    with pytest.raises(CheckpointError, match="is for labels"):
        load_calibration(ckpt, list(reversed(NAMES)))
    ckpt.write_bytes(b"retrained")  # the checkpoint changes after evaluate
    with pytest.raises(CheckpointError, match="different checkpoint"):
        load_calibration(ckpt, NAMES)
