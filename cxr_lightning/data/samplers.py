"""Which training images an epoch draws (``data.sampler``); validation and test are never resampled.

- ``random`` (default): every training image once per epoch in a shuffled order (the loader's
  ``shuffle=True``; no sampler of this module).
- ``undersample_no_finding``: every image with a finding, plus a share ``no_finding_keep`` of the
  images whose only label is "No Finding". The kept share rotates through a fixed seeded order of
  those images, so each of them is drawn once every ``ceil(1 / no_finding_keep)`` epochs; the
  epoch's order is reshuffled from ``seed + epoch``.
- ``balanced``: ``len(train)`` draws with replacement, image ``i`` drawn with probability
  proportional to ``sum_c y_ic / n_c`` (label ``c`` has ``n_c`` training positives; an image with no
  positive label at all, as under ``drop_no_finding``, counts as one more "label"), so every label
  gets about the same share of draws whatever its prevalence.

Both samplers are :class:`~torch.utils.data.DistributedSampler` subclasses built with the
trainer's world size and rank: Lightning inserts its own DistributedSampler only when the loader's
sampler is not one, and calls ``set_epoch`` at every epoch start (as for its own). Each epoch's
draw is made identically on every rank from ``seed + epoch`` and split by position, so the ranks'
shares are disjoint and of equal length; the draw is cut to a multiple of the world size (at most
``world_size - 1`` draws of a reshuffled epoch), never padded with repeats.

:func:`sampling_weights` is each image's expected number of draws per epoch; the data module turns
it into the label statistics the weighted BCE uses (:func:`weighted_label_statistics`), so the
class weights follow what the sampler actually feeds.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.labels import NO_FINDING

SAMPLERS = ("random", "undersample_no_finding", "balanced")


def check_sampler(name: str, no_finding_keep: float) -> None:
    """ConfigError unless ``name`` is a sampler and ``no_finding_keep`` a share in (0, 1]."""
    if name not in SAMPLERS:
        raise ConfigError(f"data.sampler={name!r}: expected one of {list(SAMPLERS)}.")
    if not 0.0 < float(no_finding_keep) <= 1.0:
        raise ConfigError(f"data.no_finding_keep={no_finding_keep}: the share of No-Finding-only images kept per "
                          "epoch must lie in (0, 1].")


def no_finding_only(labels: np.ndarray, label_names: Sequence[str]) -> np.ndarray:
    """``(N,)`` bool: rows positive for no finding (with or without a "No Finding" column)."""
    findings = [i for i, name in enumerate(label_names) if name != NO_FINDING]
    return ~(np.asarray(labels)[:, findings] > 0.5).any(axis=1)


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """``(N,)`` draw probabilities ``sum_c y_ic / n_c`` (rows without a positive label form one more
    group), normalised to sum 1."""
    positive = np.asarray(labels) > 0.5
    if positive.ndim != 2 or len(positive) == 0:
        raise DataError(f"balanced sampler: need an (N, L) label block with N > 0, got shape {positive.shape}.")
    groups = np.concatenate([positive, ~positive.any(axis=1, keepdims=True)], axis=1).astype(np.float64)
    counts = groups.sum(axis=0)
    weights = groups[:, counts > 0] @ (1.0 / counts[counts > 0])
    return weights / weights.sum()


def sampling_weights(
    name: str, labels: np.ndarray, label_names: Sequence[str], no_finding_keep: float = 1.0,
) -> np.ndarray:
    """Each training image's expected number of draws per epoch under sampler ``name``."""
    check_sampler(name, no_finding_keep)
    n = len(labels)
    if name == "random":
        return np.ones(n)
    if name == "balanced":
        return balanced_weights(labels) * n
    only = no_finding_only(labels, label_names)
    weights = np.ones(n)
    if only.any():
        weights[only] = _kept_count(int(only.sum()), no_finding_keep) / only.sum()
    return weights


def weighted_label_statistics(labels: np.ndarray, weights: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """The columns of :func:`cxr_lightning.data.cohort.label_statistics` for the images an epoch
    draws when image ``i`` is drawn ``weights[i]`` times on average: expected counts per epoch."""
    positive = (np.asarray(labels) > 0.5).astype(np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    n_pos = weights @ positive
    return pd.DataFrame(
        {"n_pos": n_pos, "n_neg": total - n_pos, "pos_frac": n_pos / total, "neg_frac": 1.0 - n_pos / total},
        index=pd.Index(list(names), name="label"),
    )


def _kept_count(n_no_finding: int, keep: float) -> int:
    return max(1, math.ceil(keep * n_no_finding))


class _EpochDraw(DistributedSampler):
    """A per-epoch draw of ``epoch_draw()`` (identical on every rank), split by position."""

    def __init__(self, n_images: int, draws: int, seed: int, num_replicas: int, rank: int) -> None:
        super().__init__(range(n_images), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if draws < num_replicas:
            raise DataError(f"data.sampler: {draws} training draws per epoch cannot be shared by {num_replicas} ranks.")
        self.num_samples = draws // num_replicas
        self.total_size = self.num_samples * num_replicas

    def epoch_draw(self) -> np.ndarray:  # pragma: no cover - each sampler defines it
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        draw = self.epoch_draw()[: self.total_size]
        return iter(draw[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class NoFindingUndersampler(_EpochDraw):
    """``data.sampler=undersample_no_finding``; see the module docstring."""

    def __init__(
        self, labels: np.ndarray, label_names: Sequence[str], keep: float, seed: int = 0,
        num_replicas: int = 1, rank: int = 0,
    ) -> None:
        check_sampler("undersample_no_finding", keep)
        only = no_finding_only(labels, label_names)
        self.findings = np.flatnonzero(~only)
        # One fixed order of the No-Finding-only images; epoch e keeps the next window of it.
        self.rotation = np.random.default_rng(seed).permutation(np.flatnonzero(only))
        self.n_keep = _kept_count(len(self.rotation), keep) if len(self.rotation) else 0
        super().__init__(len(labels), len(self.findings) + self.n_keep, seed, num_replicas, rank)

    def kept_no_finding(self, epoch: int | None = None) -> np.ndarray:
        """The No-Finding-only images that epoch ``epoch`` (default: the current one) draws."""
        if not self.n_keep:
            return self.rotation
        start = (self.epoch if epoch is None else epoch) * self.n_keep
        return self.rotation[(start + np.arange(self.n_keep)) % len(self.rotation)]

    def epoch_draw(self) -> np.ndarray:
        chosen = np.concatenate([self.findings, self.kept_no_finding()])
        return np.random.default_rng([self.seed, self.epoch]).permutation(chosen)


class WeightedDraw(_EpochDraw):
    """``len(weights)`` draws per epoch with replacement, image ``i`` with probability proportional
    to ``weights[i]``.

    torch's WeightedRandomSampler makes the draw; this class adds what it lacks: the reseeding
    per epoch (``set_epoch``) and the split into disjoint per-rank shares of one draw.
    """

    def __init__(self, weights: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0 or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise DataError(
                f"data.sampler: need one finite, non-negative weight per training image, got {weights.shape}."
            )
        self.weights = torch.from_numpy(weights / weights.sum())
        super().__init__(len(weights), len(weights), seed, num_replicas, rank)

    def epoch_draw(self) -> np.ndarray:
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.epoch]).integers(2**62)))
        draw = WeightedRandomSampler(self.weights, self.total_size, replacement=True, generator=generator)
        return np.fromiter(draw, dtype=np.int64, count=self.total_size)


class BalancedSampler(WeightedDraw):
    """``data.sampler=balanced``; see the module docstring."""

    def __init__(self, labels: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(balanced_weights(labels), seed, num_replicas, rank)


def source_weights(
    sources: np.ndarray, shares: dict[str, float], name: str, labels: np.ndarray, label_names: Sequence[str],
    no_finding_keep: float = 1.0,
) -> np.ndarray:
    """Pooled training: each image's expected draws per epoch when source ``s`` gets the share
    ``shares[s] / sum(shares)`` of the ``len(labels)`` draws (of the sources with training
    images) and, within its source, sampler ``name`` decides (its weights rescaled to the share)."""
    sources = np.asarray(sources).astype(str)
    present = [s for s in shares if (sources == s).any()]
    total = sum(shares[s] for s in present)
    out = np.zeros(len(labels))
    for s in present:
        rows = sources == s
        inner = sampling_weights(name, labels[rows], label_names, no_finding_keep)
        out[rows] = len(labels) * shares[s] / total * inner / inner.sum()
    return out


def build_sampler(
    name: str, labels: np.ndarray, label_names: Sequence[str], no_finding_keep: float, seed: int,
    num_replicas: int = 1, rank: int = 0,
) -> DistributedSampler | None:
    """The training sampler ``data.sampler=name`` (None for ``random``: the loader shuffles)."""
    check_sampler(name, no_finding_keep)
    if name == "undersample_no_finding":
        return NoFindingUndersampler(labels, label_names, no_finding_keep, seed, num_replicas, rank)
    if name == "balanced":
        return BalancedSampler(labels, seed, num_replicas, rank)
    return None
