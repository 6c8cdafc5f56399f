"""Calibration, thresholds and the underdiagnosis audit on labels with NaN (uncertain or not given)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from cxr_lightning.calibration import fit_calibration
from cxr_lightning.evaluation.statistics import choose_thresholds, underdiagnosis

RNG = np.random.default_rng(0)
Y = (RNG.random((80, 2)) < 0.4).astype(float)
P = np.clip(0.35 * Y + 0.65 * RNG.random((80, 2)), 0.01, 0.99)
Y_UNCERTAIN = Y.copy()
Y_UNCERTAIN[::4, 0] = np.nan  # uncertain validation labels under data.uncertain=ignore


@pytest.mark.parametrize("method", ["platt", "isotonic", "temperature"])
def test_calibration_fits_on_the_counted_labels_only(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = fit_calibration(Y_UNCERTAIN, P, method, ["a", "b"])
        keep = ~np.isnan(Y_UNCERTAIN[:, 0])
        reference = fit_calibration(Y[keep], P[keep], method, ["a", "b"])
    assert masked.params["a"] == reference.params["a"]
    assert masked.params["a"] != {}
    for v in masked.params["a"].values():
        assert np.all(np.isfinite(v))


def test_calibration_of_a_fully_uncertain_label_is_unfitted():
    y = Y.copy()
    y[:, 1] = np.nan
    with pytest.warns(UserWarning, match="raw probabilities"):
        cal = fit_calibration(y, P, "platt", ["a", "b"])
    assert cal.unfitted == ["b"] and cal.params["b"] == {}


def test_thresholds_with_uncertain_val_labels_equal_those_without_the_rows():
    keep = ~np.isnan(Y_UNCERTAIN[:, 0])
    t = choose_thresholds(Y_UNCERTAIN, P, "f1", 0.5, ["a", "b"])
    assert t[0] == choose_thresholds(Y[keep][:, :1], P[keep][:, :1], "f1", 0.5, ["a"])[0]
    assert t[1] == choose_thresholds(Y[:, 1:], P[:, 1:], "f1", 0.5, ["b"])[0]


def test_underdiagnosis_denominator_is_no_finding_negative_where_the_source_gives_it():
    names = ["Effusion", "Pneumothorax", "No Finding"]
    nan = np.nan
    # rows: an unmapped-only finding (No Finding 0, no scored positive); an uncertain effusion;
    # a positive pneumothorax; a normal image.
    y = np.array([[0, 0, 0], [nan, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    p = np.array([[0.1, 0.1, 0.9], [0.2, 0.1, 0.8], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    groups = pd.Series(["all"] * 4)
    audit = underdiagnosis(y, p, [0.5] * 3, groups, np.arange(4), n_boot=10, label_names=names)
    assert audit.loc[0, "n_with_finding"] == 3
    assert audit.loc[0, "underdiagnosis"] == pytest.approx(2 / 3)
    # Without No Finding: any scored finding positive (the uncertain one does not count).
    audit = underdiagnosis(y[:, :2], p[:, :2], [0.5] * 2, groups, np.arange(4), n_boot=10, label_names=names[:2])
    assert audit.loc[0, "n_with_finding"] == 1
    assert audit.loc[0, "underdiagnosis"] == 0.0
