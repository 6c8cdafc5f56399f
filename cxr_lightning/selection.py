"""The one model-selection metric: which logged validation metric picks the best checkpoint, stops
training early, is returned to a Hydra sweeper and ranks runs in compare.

Its direction follows from the metric, so no config can minimise an AUROC. ``val/loss`` is on the
scale of the loss it was trained with (the same predictions score 1.475 under weighted_bce and
0.210 under asl), so it only compares runs trained with the same loss; ``val/auroc_mean`` is
scale-free.
"""
from __future__ import annotations

from cxr_lightning.errors import ConfigError

# metric -> the direction in which it improves
MODES = {"val/loss": "min", "val/auroc_mean": "max", "val/auprc_mean": "max"}
# metrics whose value depends on the loss function's scale
LOSS_SCALED = frozenset({"val/loss"})


def selection_mode(metric: str) -> str:
    """``"min"`` or ``"max"`` for a selection metric; :class:`ConfigError` for any other name."""
    if metric not in MODES:
        raise ConfigError(f"selection.metric={metric!r}: expected one of {list(MODES)}.")
    return MODES[metric]
