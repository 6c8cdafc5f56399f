"""The linear probe: one logistic regression per label on frozen features, its regularisation
chosen on the validation split, and the nested patient subsets of a label-efficiency curve.

scikit-learn's ``LogisticRegression`` (L2, lbfgs) is the model; features are standardised with
the mean and standard deviation of the training rows it is fitted on. ``C`` (inverse
regularisation) is tried from strongest to weakest with warm starts, and the one with the best
validation AUROC per label is kept (validation log-loss where a label's validation rows hold one
class only). A label whose training rows hold one class cannot be fitted: it predicts its
training prevalence, which ranks nothing (AUROC 0.5), and is marked ``fitted=False``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxr_lightning.errors import ConfigError, DataError


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """``probe.train_fractions``: numbers in (0, 1], returned ascending without repeats."""
    try:
        values = sorted({float(f) for f in fractions})
    except (TypeError, ValueError):
        raise ConfigError(
            f"probe.train_fractions={list(fractions)!r}: expected numbers in (0, 1], e.g. [0.01, 0.1, 1.0]."
        ) from None
    if not values or not all(0.0 < f <= 1.0 for f in values):
        raise ConfigError(f"probe.train_fractions={list(fractions)!r}: each must lie in (0, 1], e.g. [0.01, 0.1, 1.0].")
    return values


def nested_patient_subsets(patient_ids: Sequence, fractions: Sequence[float], seed: int) -> dict[float, np.ndarray]:
    """For each fraction, a boolean row mask of the images of ``ceil(fraction * P)`` of the ``P``
    patients (at least one). All fractions take a prefix of one seeded permutation of the
    patients, so the subsets are nested: the 1% patients are among the 10%, those among the 100%."""
    ids = pd.Series(np.asarray(patient_ids))
    if ids.isna().any():
        raise DataError(
            "nested_patient_subsets: a training image has no patient id; the subsample is drawn by patient."
        )
    patients = np.sort(ids.unique())
    order = np.random.default_rng(seed).permutation(len(patients))
    masks = {}
    for fraction in check_fractions(fractions):
        chosen = patients[order[: max(1, math.ceil(fraction * len(patients)))]]
        masks[fraction] = ids.isin(chosen).to_numpy()
    return masks


@dataclass
class ProbeFit:
    """The chosen probe of every label, and how it was chosen."""

    label_names: list[str]
    C: list[float]
    val_auroc: list[float]
    fitted: list[bool]
    n_train: list[int]
    n_train_pos: list[int]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (L, F) on standardised features
    intercept: np.ndarray  # (L,)
    grid: list[float] = field(default_factory=list)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, L)``."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        logits = z @ self.coef.T + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"C": self.C, "val_auroc": self.val_auroc, "fitted": self.fitted, "n_train": self.n_train,
                             "n_train_pos": self.n_train_pos}, index=pd.Index(self.label_names, name="label"))


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, label_names: Sequence[str],
    grid: Sequence[float], max_iter: int = 1000, seed: int = 0,
) -> ProbeFit:
    """One L2 logistic regression per label on ``train_x``; ``C`` from ``grid`` chosen on ``val``.

    ``train_y``/``val_y`` are ``(N, L)`` with 0/1, and NaN where an image does not count for a
    label (it is left out of that label's fit and choice)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    grid = sorted(float(c) for c in grid)
    if not grid or not all(c > 0 for c in grid):
        raise ConfigError(f"probe.C={list(grid)}: give one or more positive inverse regularisation strengths.")
    train_x, val_x = np.asarray(train_x, np.float64), np.asarray(val_x, np.float64)
    if len(train_x) == 0 or len(val_x) == 0:
        raise DataError(f"the linear probe needs training and validation images; got {len(train_x)} and {len(val_x)}.")
    mean = train_x.mean(axis=0)
    scale = train_x.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a constant feature carries nothing; leave it at zero
    z_train, z_val = (train_x - mean) / scale, (val_x - mean) / scale
    n_labels, n_features = train_y.shape[1], train_x.shape[1]
    coef, intercept = np.zeros((n_labels, n_features)), np.zeros(n_labels)
    chosen_c, val_auroc, fitted, n_train, n_pos = [], [], [], [], []
    for j in range(n_labels):
        rows = ~np.isnan(train_y[:, j])
        y = train_y[rows, j]
        n_train.append(int(rows.sum()))
        n_pos.append(int(y.sum()))
        if not 0 < y.sum() < len(y):
            prevalence = float(y.mean()) if len(y) else 0.5
            intercept[j] = math.log(max(prevalence, 1e-6) / max(1 - prevalence, 1e-6))
            chosen_c.append(math.nan)
            val_auroc.append(math.nan)
            fitted.append(False)
            continue
        vrows = ~np.isnan(val_y[:, j])
        yv = val_y[vrows, j]
        model = LogisticRegression(C=grid[0], max_iter=int(max_iter), warm_start=True, random_state=seed)
        best: tuple[float, float, np.ndarray, float, float] | None = None  # (score, C, coef, intercept, auroc)
        for c in grid:
            model.set_params(C=c)
            with warnings.catch_warnings():
                # At weak regularisation a separable label never converges; the chosen C is judged on val.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(z_train[rows], y)
            pv = model.predict_proba(z_val[vrows])[:, 1]
            auroc = _auroc(yv, pv)
            score = auroc if not math.isnan(auroc) else -_log_loss(yv, pv) if len(yv) else 0.0
            if best is None or score > best[0]:
                best = (score, c, model.coef_[0].copy(), float(model.intercept_[0]), auroc)
        _, c, w, b, auroc = best
        coef[j], intercept[j] = w, b
        chosen_c.append(c)
        val_auroc.append(auroc)
        fitted.append(True)
    return ProbeFit(list(label_names), chosen_c, val_auroc, fitted, n_train, n_pos, mean, scale, coef, intercept, grid)
