"""Old choose_thresholds vs an exact reference: how often the float32 curves break the documented rule."""
import warnings
from fractions import Fraction

import numpy as np

from cxr_lightning.evaluation.statistics import choose_thresholds


def reference(y, p, method):
    best, best_t = None, None
    P, N = y.sum(), (1 - y).sum()
    for t in sorted(set(p.tolist()), reverse=True):  # highest first: first max wins
        c = p >= t
        tp, fp = int((c & (y == 1)).sum()), int((c & (y == 0)).sum())
        fn = int(P) - tp
        v = Fraction(2 * tp, 2 * tp + fp + fn) if method == "f1" else Fraction(tp, int(P)) - Fraction(fp, int(N))
        if best is None or v > best:
            best, best_t = v, t
    return best_t

rng = np.random.default_rng(0)
for method in ("f1", "youden"):
    wrong = 0
    for _ in range(3000):
        n = int(rng.integers(6, 30))
        y = rng.integers(0, 2, n).astype(float)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        p = rng.random(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = choose_thresholds(y[:, None], p[:, None], method)[0]
        wrong += t != reference(y, p, method)
    print(method, "wrong", wrong, "of 3000")
# J <= 0 case: all negatives score above all positives
y = np.array([0, 0, 1, 1.0])
p = np.array([0.9, 0.8, 0.2, 0.1])
print("J<=0 threshold:", choose_thresholds(y[:, None], p[:, None], "youden")[0], "observed:", p)
