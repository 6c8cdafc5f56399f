"""Constructed miscalibrated scores (probabilities pushed up like a class-weighted loss does)."""

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from cxr_lightning.calibration import fit_calibration
from cxr_lightning.evaluation.statistics import expected_calibration_error

rng = np.random.default_rng(0)
n, L = 4000, 3
y = (rng.random((n, L)) < [0.05, 0.2, 0.4]).astype(float)
z = rng.normal(size=(n, L)) + 1.5 * y + 2.5  # shifted logits: overconfident positives
p = 1 / (1 + np.exp(-z))
val, test = slice(0, 2000), slice(2000, None)
for method in ("platt", "temperature", "isotonic"):
    c = fit_calibration(y[val], p[val], method, ["a", "b", "c"])
    q = c.apply(p[test])
    def au(pp, j):
        return float(binary_auroc(torch.from_numpy(pp[:, j]), torch.from_numpy(y[test][:, j]).long()))
    print(
        method,
        "ECE raw",
        expected_calibration_error(y[test], p[test]).round(3),
        "cal",
        expected_calibration_error(y[test], q).round(3),
        "AUROC raw",
        [round(au(p[test], j), 4) for j in range(L)],
        "cal",
        [round(au(q, j), 4) for j in range(L)],
    )
