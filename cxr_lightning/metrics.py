""":class:`LabelMetrics`, the stateful, DDP-synchronised metric the LightningModule updates every step.

A thin wrapper around a torchmetrics ``MetricCollection`` that turns per-label results into a flat
dict for logging and, unlike torchmetrics, marks a label whose AUROC is undefined (no positives or
no negatives in the split) as NaN and leaves it out of the mean instead of averaging in a silent
0. The offline statistics of saved predictions live in :mod:`cxr_lightning.evaluation.statistics`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelStatScores,
)
from torchmetrics.wrappers.abstract import WrapperMetric

from cxr_lightning.errors import ConfigError, DataError

__all__ = ["LabelMetrics"]

# torchmetrics warns about every label without positives/negatives on every compute; LabelMetrics
# reports those labels itself (NaN + skipped_labels()), so these repeats would only be noise.
_UNDEFINED_LABEL_WARNINGS = (
    r"No positive samples found in target",
    r"No positive samples in targets",
    r"No negative samples in targets",
)


_IGNORED = -1


class LabelMetrics(WrapperMetric):
    """Per-label AUROC, mean AUROC, macro F1 and mean average precision of a multi-label model.

    ``update(logits, targets)`` takes raw **logits** ``(B, L)`` and applies the sigmoid itself, so
    no batch is ever misread: torchmetrics' own "sigmoid only if some value lies outside [0, 1]"
    rule would treat a batch of small logits as probabilities.

    ``compute()`` returns ``auroc/<Name>`` for every label, ``auroc_mean``, ``f1_macro`` (F1 of the calls
    ``p >= threshold``, the rule of every operating point in the framework) and ``auprc_mean``.
    A label without positives or without
    negatives in the data seen has AUROC NaN and is left out of ``auroc_mean``; a label without
    positives is also left out of ``f1_macro`` and ``auprc_mean`` (recall is undefined there).
    :meth:`skipped_labels` names the labels left out of ``auroc_mean``.

    All state lives in torchmetrics metrics registered with ``dist_reduce_fx`` (scores and targets
    concatenated, confusion counts summed), so under DDP every rank computes the metrics of the
    whole split. ``compute()`` and ``skipped_labels()`` are therefore collective calls: call them
    on every rank. ``compute()`` without any ``update()`` since the last reset raises
    :class:`~cxr_lightning.errors.DataError` (an empty split is a data problem, not a NaN).

    Use ``update``/``compute``/``reset``; calling the metric like a function is not supported
    because a per-batch AUROC means nothing.
    """

    def __init__(self, label_names: Sequence[str], threshold: float = 0.5, **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        names = list(label_names)
        if not names:
            raise ConfigError("LabelMetrics: label_names is empty; pass the data module's label_names.")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(
                f"LabelMetrics: duplicated label names {duplicated}; every output label needs its own name."
            )
        if not 0.0 < threshold < 1.0:
            raise ConfigError(
                f"LabelMetrics: threshold must lie strictly between 0 and 1 (a probability), got {threshold}."
            )
        self.label_names = names
        self.threshold = float(threshold)
        n = len(names)
        # validate_args=False: update() checks shapes and target values once, with our own errors.
        # ignore_index: a target that does not count (NaN: uncertain under ignore, or a label the
        # image's source lacks) is left out of that label's scores and counts.
        common = {"num_labels": n, "average": None, "validate_args": False, "ignore_index": _IGNORED, **metric_kwargs}
        # auroc/auprc share the stored scores
        self.collection = MetricCollection(
            {"auroc": MultilabelAUROC(**common), "auprc": MultilabelAveragePrecision(**common)}, compute_groups=True
        )
        # f1/stats share confusion counts of calls made here with the framework's one rule, p >= t
        # (torchmetrics thresholds float predictions with p > t; integer calls pass through as they are)
        self.calls = MetricCollection(
            {
                "f1": MultilabelF1Score(**common),
                # tp/fp/tn/fn per label: the synced positive/negative counts that decide validity
                "stats": MultilabelStatScores(**common),
            },
            compute_groups=True,
        )
        self._n_updates = 0

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add a batch: ``logits`` ``(B, L)`` (before sigmoid), ``targets`` ``(B, L)`` of 0/1, NaN
        where a target does not count."""
        n = len(self.label_names)
        if logits.ndim != 2 or logits.shape[1] != n:
            raise DataError(
                f"LabelMetrics.update: expected logits of shape (batch, {n}) for labels {self.label_names}, "
                f"got {tuple(logits.shape)}."
            )
        if targets.shape != logits.shape:
            raise DataError(
                f"LabelMetrics.update: targets have shape {tuple(targets.shape)} but logits {tuple(logits.shape)}; "
                "both must be (batch, labels)."
            )
        targets = targets.detach().float()
        counted = ~torch.isnan(targets)
        invalid = counted & (targets != 0) & (targets != 1)
        if bool(invalid.any()):
            bad = targets[invalid].unique()[:5].tolist()
            raise DataError(
                f"LabelMetrics.update: targets must be 0 or 1, found {bad}; "
                "pass the hard labels, not smoothed or soft targets."
            )
        probs = torch.sigmoid(logits.detach().float())
        targets = torch.where(counted, targets, torch.full_like(targets, _IGNORED)).long()
        self.collection.update(probs, targets)
        self.calls.update((probs >= self.threshold).long(), targets)
        self._n_updates += 1

    def compute(self) -> dict[str, Tensor]:
        if self._n_updates == 0:
            raise DataError(
                "LabelMetrics.compute: no batch was added since the last reset, so there is nothing to score; "
                "the split (or limit_*_batches) fed to this metric is empty."
            )
        with warnings.catch_warnings():
            for message in _UNDEFINED_LABEL_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            raw = {**self.collection.compute(), **self.calls.compute()}
        has_pos, has_neg = _has_pos_neg(raw["stats"])
        nan = torch.tensor(float("nan"), device=raw["auroc"].device)
        auroc = torch.where(has_pos & has_neg, raw["auroc"].float(), nan)
        auprc = torch.where(has_pos, raw["auprc"].float(), nan)
        f1 = torch.where(has_pos, raw["f1"].float(), nan)
        out = {f"auroc/{name}": auroc[i] for i, name in enumerate(self.label_names)}
        out["auroc_mean"] = torch.nanmean(auroc)
        out["f1_macro"] = torch.nanmean(f1)
        out["auprc_mean"] = torch.nanmean(auprc)
        return out

    def skipped_labels(self) -> list[str]:
        """Labels left out of ``auroc_mean``: no positives or no negatives in the data seen.

        Reuses the counts cached by :meth:`compute` (or computes them, collectively, if needed).
        """
        if self._n_updates == 0:
            return list(self.label_names)
        with warnings.catch_warnings():
            for message in _UNDEFINED_LABEL_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            stats = self.calls.compute()["stats"]
        has_pos, has_neg = _has_pos_neg(stats)
        valid = (has_pos & has_neg).tolist()
        return [name for name, ok in zip(self.label_names, valid) if not ok]

    def reset(self) -> None:
        self.collection.reset()
        self.calls.reset()
        self._n_updates = 0
        super().reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "LabelMetrics is not callable per batch: call .update(logits, targets) in the step and "
            ".compute() / .reset() at epoch end."
        )


def _has_pos_neg(stats: Tensor) -> tuple[Tensor, Tensor]:
    # MultilabelStatScores(average=None) rows are [tp, fp, tn, fn, support] per label.
    tp, fp, tn, fn = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
    return (tp + fn) > 0, (fp + tn) > 0
