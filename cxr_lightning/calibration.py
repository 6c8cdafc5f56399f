"""Post-hoc calibration of per-label probabilities, fitted on validation predictions.

The class-weighted losses that make a multi-label model learn rare findings also push every
probability up, so raw outputs overstate risk. A :class:`Calibration` maps each label's raw
probability to a calibrated one with a monotone function fitted on the validation split:

- ``platt`` (default): ``sigmoid(a * logit(p) + b)``, a logistic regression of the label on the
  raw logit with Platt's smoothed targets (scikit-learn's
  :class:`~sklearn.linear_model.LogisticRegression`); ``a > 0`` keeps the ranking, so AUROC is
  unchanged.
- ``temperature``: ``sigmoid(logit(p) / T)``, one parameter per label. scikit-learn has no
  temperature scaling, so its negative log-likelihood is minimised here with scipy's bounded
  scalar search.
- ``isotonic``: scikit-learn's :class:`~sklearn.isotonic.IsotonicRegression`, a non-decreasing
  step function (it can merge scores into ties, so AUROC may move slightly).

Each label is fitted on the validation images that count for it: a NaN label (uncertain under
``data.uncertain=ignore``, or one the source does not give) is left out of that label's fit.
A label whose validation split lacks positives or negatives, or whose fitted slope is not
positive (the fit would reverse the ranking), keeps its raw probabilities and is listed in
``unfitted``. The parameters are plain data (:meth:`Calibration.to_dict`), saved beside the
checkpoint by :func:`cxr_lightning.checkpoints.save_calibration` and carried into exported models'
metadata.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_lightning.errors import CheckpointError, ConfigError, DataError

METHODS = ("platt", "temperature", "isotonic")
# probabilities are clipped this far from 0 and 1 before the logit, so saturated outputs stay finite
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclass
class Calibration:
    """Per-label monotone maps from raw to calibrated probabilities.

    ``params[label]`` is ``{"slope": a, "intercept": b}`` (platt, temperature) or ``{"x": [...],
    "y": [...]}`` (isotonic: the fitted step function's knots, linearly interpolated and clipped
    at the ends, as scikit-learn predicts), and ``{}`` for an unfitted label (identity).
    """

    method: str
    label_names: list[str]
    params: dict[str, dict[str, Any]]
    n_images: int
    unfitted: list[str] = field(default_factory=list)

    def apply(self, probs: Any) -> np.ndarray:
        """Calibrated ``(N, L)`` probabilities for raw ``(N, L)`` ones in ``label_names`` order."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.label_names):
            raise DataError(
                f"Calibration.apply: expected probabilities of shape (images, {len(self.label_names)}) for "
                f"{self.label_names}, got {p.shape}."
            )
        out = p.copy()
        for j, name in enumerate(self.label_names):
            par = self.params.get(name) or {}
            if "slope" in par:
                out[:, j] = _sigmoid(par["slope"] * _logit(p[:, j]) + par["intercept"])
            elif "x" in par:
                out[:, j] = np.interp(p[:, j], par["x"], par["y"])
        return out

    def over(self, names: Sequence[str]) -> Calibration:
        """The same maps for ``names`` in that order: a label fitted here keeps its map, any other is
        unfitted (identity). Selects the scored labels of an external source, or widens a fit over
        those labels to the whole checkpoint."""
        names = [str(n) for n in names]
        params = {n: dict(self.params[n]) for n in names if self.params.get(n)}
        unfitted = [n for n in names if n not in params]
        return Calibration(self.method, names, params, self.n_images, unfitted)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON files and export metadata."""
        return {
            "method": self.method,
            "label_names": list(self.label_names),  # the order; JSON writers may sort "labels"
            "labels": {name: self.params.get(name, {}) for name in self.label_names},
            "fitted_on": "val",
            "n_images": int(self.n_images),
            "unfitted_labels": list(self.unfitted),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "calibration") -> Calibration:
        """Rebuild from :meth:`to_dict`'s output; :class:`CheckpointError` naming ``where`` if malformed."""
        try:
            method = str(data["method"])
            labels = {str(k): dict(v) for k, v in data["labels"].items()}
            params = {}
            for name, par in labels.items():
                if "slope" in par:
                    params[name] = {"slope": float(par["slope"]), "intercept": float(par["intercept"])}
                elif "x" in par:
                    x, y = [float(v) for v in par["x"]], [float(v) for v in par["y"]]
                    if len(x) != len(y) or not x:
                        raise ValueError(f"label {name}: {len(x)} knots x but {len(y)} y")
                    params[name] = {"x": x, "y": y}
                else:
                    params[name] = {}
            names = [str(n) for n in data["label_names"]]
            if sorted(names) != sorted(labels):
                raise ValueError(f"label_names {names} differ from the labels with parameters {sorted(labels)}")
            return cls(method, names, params, int(data["n_images"]), list(data.get("unfitted_labels", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where} is malformed ({exc}); delete it and rerun evaluate.") from exc

    def describe(self) -> str:
        """One line for reports: the method and what it was fitted on."""
        text = f"{self.method} scaling per label, fitted on {self.n_images} validation images"
        return text + (f"; not fitted (raw probabilities) for {', '.join(self.unfitted)}" if self.unfitted else "")


def fit_calibration(y_true: Any, y_prob: Any, method: str, label_names: Sequence[str]) -> Calibration:
    """Fit one monotone map per label on validation labels ``(N, L)`` and raw probabilities."""
    if method not in METHODS:
        raise ConfigError(f"calibration.method={method!r}: expected one of {list(METHODS)}.")
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    names = [str(n) for n in label_names]
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise DataError(
            f"fit_calibration: labels {y.shape} and probabilities {p.shape} must both be (images, {len(names)})."
        )
    params: dict[str, dict[str, Any]] = {}
    unfitted: list[str] = []
    for j, name in enumerate(names):
        counted = ~np.isnan(y[:, j])
        yj, pj = y[counted, j], p[counted, j]
        if len(yj) == 0 or yj.min() == yj.max():
            params[name] = {}
            unfitted.append(name)
            continue
        params[name] = _FITTERS[method](yj, pj)
        if params[name].get("slope", 1.0) <= 0:
            params[name] = {}
            unfitted.append(name)
    if unfitted:
        warnings.warn(
            f"fit_calibration: {unfitted} keep their raw probabilities (no positives or no negatives in the "
            "validation split, or a fit that would reverse the ranking).",
            stacklevel=2,
        )
    return Calibration(method, names, params, len(y), unfitted)


# The fitters import scikit-learn/scipy themselves: checkpoints.py imports this module for every
# command, and only evaluate fits.
def _fit_platt(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    # Platt's (1999) smoothed targets, (n_pos + 1) / (n_pos + 2) and 1 / (n_neg + 2): an
    # unpenalised fit on hard 0/1 targets diverges when a small validation split is separable,
    # and saturated outputs would tie and change the AUROC. Soft targets enter scikit-learn's
    # logistic regression as each image twice, once per class, weighted by its target.
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    z = _logit(p)[:, None]
    model = LogisticRegression(C=np.inf).fit(
        np.vstack([z, z]), np.r_[np.ones(len(z)), np.zeros(len(z))].astype(int), sample_weight=np.r_[target, 1 - target]
    )
    return {"slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])}


def _fit_temperature(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from scipy.optimize import minimize_scalar

    z = _logit(p)

    def nll(log_t: float) -> float:
        q = np.clip(_sigmoid(z / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    best = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded")
    return {"slope": float(np.exp(-best.x)), "intercept": 0.0}


def _fit_isotonic(y: np.ndarray, p: np.ndarray) -> dict[str, list[float]]:
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
    return {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


_FITTERS = {"platt": _fit_platt, "temperature": _fit_temperature, "isotonic": _fit_isotonic}
