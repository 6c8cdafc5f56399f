"""Masked losses and metrics: a NaN target (uncertain under data.uncertain=ignore, or a label the
source lacks) adds nothing to the loss, its gradient, the class weights or the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_lightning.losses import create_loss
from cxr_lightning.metrics import LabelMetrics

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0, 2, size=(6, 3))
TARGETS = np.array(
    [[1, 0, np.nan], [0, np.nan, np.nan], [1, 1, np.nan], [np.nan, 0, np.nan], [0, 1, np.nan], [1, np.nan, np.nan]]
)  # label 2 fully masked


def _log_sigmoid(x):
    return -np.logaddexp(0, -x)


def _numpy_bce(x, y):
    return -(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))


def _numpy_focal(x, y, gamma=2.0, alpha=0.25):
    p = 1 / (1 + np.exp(-x))
    pt = np.where(y == 1, p, 1 - p)
    at = np.where(y == 1, alpha, 1 - alpha)
    return at * (1 - pt) ** gamma * _numpy_bce(x, y)


def _loss(name, **kw):
    if name == "weighted_bce":
        return create_loss(name, pos_weight=[0.7, 0.4, 0.9], neg_weight=[0.3, 0.6, 0.1])
    return create_loss(name, **kw)


def test_masked_bce_and_focal_equal_numpy():
    keep = ~np.isnan(TARGETS)
    y = np.nan_to_num(TARGETS)
    x = torch.tensor(LOGITS, dtype=torch.float32)
    t = torch.tensor(TARGETS, dtype=torch.float32)
    assert float(_loss("bce")(x, t)) == pytest.approx(_numpy_bce(LOGITS, y)[keep].mean(), rel=1e-5)
    assert float(_loss("focal")(x, t)) == pytest.approx(_numpy_focal(LOGITS, y)[keep].mean(), rel=1e-5)
    pos, neg = np.array([0.7, 0.4, 0.9]), np.array([0.3, 0.6, 0.1])
    per = -(pos * y * _log_sigmoid(LOGITS) + neg * (1 - y) * _log_sigmoid(-LOGITS))
    expected = sum(per[keep[:, j], j].mean() for j in range(2))  # label 2 counts nowhere: adds 0
    assert float(_loss("weighted_bce")(x, t)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["weighted_bce", "bce", "focal", "asl"])
def test_fully_masked_label_gives_zero_gradient_and_nan_adds_nothing(name):
    x = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    loss = _loss(name)(x, torch.tensor(TARGETS, dtype=torch.float32))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(x.grad[:, 2] == 0)
    assert torch.all(x.grad[np.isnan(TARGETS)] == 0)
    # Changing a masked target's logit changes nothing.
    moved = LOGITS.copy()
    moved[np.isnan(TARGETS)] += 5.0
    again = _loss(name)(torch.tensor(moved, dtype=torch.float32), torch.tensor(TARGETS, dtype=torch.float32))
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["weighted_bce", "bce", "focal", "asl"])
def test_all_masked_batch_is_a_zero_loss(name):
    x = torch.zeros(2, 3, requires_grad=True)
    loss = _loss(name)(x, torch.full((2, 3), float("nan")))
    loss.backward()
    assert float(loss) == 0.0 and torch.all(x.grad == 0)


def test_label_metrics_skip_nan_targets_per_label():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random((40, 2)) < 0.5).astype(float)
    x = rng.normal(size=(40, 2)) + y
    y[::3, 0] = np.nan
    metric = LabelMetrics(["a", "b"])
    metric.update(torch.tensor(x), torch.tensor(y))
    out = metric.compute()
    keep = ~np.isnan(y[:, 0])
    assert float(out["auroc/a"]) == pytest.approx(roc_auc_score(y[keep, 0], x[keep, 0]), abs=1e-6)
    assert float(out["auroc/b"]) == pytest.approx(roc_auc_score(y[:, 1], x[:, 1]), abs=1e-6)
