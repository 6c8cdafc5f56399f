"""A NaN label (uncertain under data.uncertain=ignore) masks that entry: every statistic of the
label equals the same statistic computed on the label's other images alone."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from cxr_lightning.evaluation.statistics import (
    bootstrap_ci,
    choose_thresholds,
    expected_calibration_error,
    operating_point_metrics,
    subgroup_auroc,
)


@pytest.fixture
def masked():
    rng = np.random.default_rng(3)
    n = 120
    y = (rng.random((n, 3)) < 0.3).astype(float)
    p = np.clip(0.5 * y + 0.6 * rng.random((n, 3)), 0, 1)
    y[rng.random((n, 3)) < 0.25] = np.nan  # about a quarter of each label uncertain
    patients = rng.integers(0, 40, n)
    return y, p, patients


def test_auroc_auprc_and_counts_skip_masked_entries(masked):
    y, p, patients = masked
    ci = bootstrap_ci(y, p, patients, "auroc", n_boot=20, label_names=list("abc"))
    for j, name in enumerate("abc"):
        keep = ~np.isnan(y[:, j])
        expected = float(binary_auroc(torch.from_numpy(p[keep, j]), torch.from_numpy(y[keep, j]).long()))
        assert ci.at[name, "estimate"] == pytest.approx(expected, abs=1e-6)  # torchmetrics computes in float32
        assert ci.at[name, "n_pos"] == int(y[keep, j].sum())
        alone = bootstrap_ci(
            y[keep, j][:, None], p[keep, j][:, None], patients[keep], "auprc", n_boot=5, label_names=[name]
        )
        both = bootstrap_ci(y, p, patients, "auprc", n_boot=5, label_names=list("abc"))
        assert both.at[name, "estimate"] == pytest.approx(alone.at[name, "estimate"], abs=1e-9)


def test_thresholds_operating_points_and_ece_skip_masked_entries(masked):
    y, p, _ = masked
    thresholds = choose_thresholds(y, p, "f1", label_names=list("abc"))
    operating = operating_point_metrics(y, p, thresholds, list("abc"))
    ece = expected_calibration_error(y, p, 10)
    for j, name in enumerate("abc"):
        keep = ~np.isnan(y[:, j])
        yj, pj = y[keep, j][:, None], p[keep, j][:, None]
        assert thresholds[j] == choose_thresholds(yj, pj, "f1", label_names=[name])[0]
        called, truth = pj[:, 0] >= thresholds[j], yj[:, 0] == 1
        assert operating.at[name, "sensitivity"] == pytest.approx((called & truth).sum() / truth.sum())
        assert operating.at[name, "specificity"] == pytest.approx((~called & ~truth).sum() / (~truth).sum())
        assert operating.at[name, "support"] + operating.at[name, "n_neg"] == keep.sum()
        assert ece[j] == pytest.approx(expected_calibration_error(yj, pj, 10)[0])


def test_subgroups_and_a_single_label_work_with_masks(masked):
    y, p, patients = masked
    groups = pd.Series(np.where(np.arange(len(y)) % 2, "F", "M"))
    table = subgroup_auroc(y, p, groups, patients, n_boot=5, label_names=list("abc"))
    assert list(table.index) == ["F", "M"] and table["n_labels"].eq(3).all()
    one = operating_point_metrics(y[:, :1], p[:, :1], [0.5], ["a"])
    assert one.at["a", "support"] == np.nansum(y[:, 0])


def test_values_other_than_0_1_or_nan_are_still_rejected(masked):
    y, p, patients = masked
    y = np.nan_to_num(y)
    y[0, 0] = 0.5
    from cxr_lightning.errors import DataError

    with pytest.raises(DataError, match="only 0/1"):
        bootstrap_ci(y, p, patients, n_boot=5)
