"""Multi-label losses on logits ``(B, L)`` against 0/1 targets ``(B, L)``, NaN where a target does
not count: an uncertain label under ``data.uncertain=ignore``, or a label the image's source does
not give. A NaN target adds nothing to the loss nor to its gradient; every mean below is over the
targets that count (a batch where none counts gives a zero loss).

- ``weighted_bce`` (default): the seed's class-balanced binary cross-entropy. For label ``c`` the
  positive term is weighted by the fraction of training images negative for ``c`` and the negative
  term by the fraction positive, so rare findings are not drowned by their negatives. Averaged over
  the batch per label (over the images that count for it), then summed over labels (the seed's
  reduction).
- ``bce``: plain binary cross-entropy, mean over the elements that count.
- ``focal``: focal loss (Lin et al. 2017), torchvision's ``sigmoid_focal_loss``, mean.
- ``asl``: asymmetric loss (Ridnik et al. 2021), timm's ``AsymmetricLossMultiLabel``, mean.

The per-element losses come from torch, torchvision and timm (``reduction="none"``); only the
masked reduction is written here, since none of them takes a mask.

Only ``weighted_bce`` uses ``pos_weight``/``neg_weight``; the others ignore them, so the caller
can always pass the training split's statistics.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from cxr_lightning.errors import ConfigError

WeightLike = torch.Tensor | Sequence[float] | None


def split_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(filled, counts)``: the targets with NaN replaced by 0 (any value: it is masked out) and
    the float mask of the targets that count."""
    targets = targets.float()
    counts = ~torch.isnan(targets)
    return torch.where(counts, targets, torch.zeros_like(targets)), counts.float()


def masked_mean(per_element: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_element`` over the elements that count; 0 (with a zero gradient) when none does."""
    # torch.where, not a product: a masked element's loss may be inf or NaN, and 0 * inf is NaN.
    kept = torch.where(counts > 0, per_element, torch.zeros_like(per_element))
    return kept.sum() / counts.sum().clamp(min=1.0)


class WeightedBCELoss(nn.Module):
    """``sum_c mean_b -(pos_weight[c] y log s(x) + neg_weight[c] (1 - y) log(1 - s(x)))``.

    The weights are buffers, so they travel with the checkpoint and the device.
    """

    def __init__(self, pos_weight: WeightLike = None, neg_weight: WeightLike = None) -> None:
        super().__init__()
        if pos_weight is None or neg_weight is None:
            raise ConfigError(
                "loss weighted_bce needs per-label pos_weight and neg_weight (the training split's "
                "negative and positive fractions); choose loss=bce to train unweighted."
            )
        pos = _as_weight_vector(pos_weight, "pos_weight")
        neg = _as_weight_vector(neg_weight, "neg_weight")
        if pos.shape != neg.shape:
            raise ConfigError(f"loss weighted_bce: pos_weight has {pos.numel()} labels but neg_weight {neg.numel()}.")
        self.register_buffer("pos_weight", pos)
        self.register_buffer("neg_weight", neg)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.pos_weight.numel():
            raise ConfigError(
                f"loss weighted_bce has weights for {self.pos_weight.numel()} labels but the model "
                f"outputs {logits.shape[-1]}; the weights must come from the same label list."
            )
        logits = logits.float()
        targets, counts = split_targets(targets)
        # log(1 - sigmoid(x)) == logsigmoid(-x), stable for large |x|.
        per_element = -(
            self.pos_weight * targets * F.logsigmoid(logits)
            + self.neg_weight * (1 - targets) * F.logsigmoid(-logits)
        )
        kept = torch.where(counts > 0, per_element, torch.zeros_like(per_element))
        return (kept.sum(dim=0) / counts.sum(dim=0).clamp(min=1.0)).sum()


class BCELoss(nn.BCEWithLogitsLoss):
    """Unweighted binary cross-entropy on logits, mean over the targets that count."""

    def __init__(self) -> None:
        super().__init__(reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        filled, counts = split_targets(targets)
        return masked_mean(super().forward(logits.float(), filled), counts)


class FocalLoss(nn.Module):
    """Sigmoid focal loss: ``-alpha_t (1 - p_t)^gamma log p_t``, mean over batch and labels."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        if gamma < 0 or alpha > 1:  # torchvision reads alpha < 0 as "no class balancing"
            raise ConfigError(f"loss focal: need gamma >= 0 and alpha <= 1 (< 0 disables it); got {gamma}, {alpha}.")
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        filled, counts = split_targets(targets)
        per_element = sigmoid_focal_loss(logits.float(), filled, alpha=self.alpha, gamma=self.gamma, reduction="none")
        return masked_mean(per_element, counts)


class AsymmetricLoss(AsymmetricLossMultiLabel):
    """ASL with the paper's multi-label defaults; mean over the targets that count."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> None:
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
            raise ConfigError(
                f"loss asl: need gamma_neg, gamma_pos >= 0 and clip in [0, 1); got {gamma_neg}, {gamma_pos}, {clip}."
            )
        super().__init__(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        filled, counts = split_targets(targets)
        return masked_mean(super().forward(logits, filled), counts)


LOSSES: dict[str, type[nn.Module]] = {
    "weighted_bce": WeightedBCELoss,
    "bce": BCELoss,
    "focal": FocalLoss,
    "asl": AsymmetricLoss,
}


def create_loss(name: str, pos_weight: WeightLike = None, neg_weight: WeightLike = None, **kwargs: Any) -> nn.Module:
    """Build loss ``name`` with its hyperparameters ``kwargs`` (the conf/loss/<name>.yaml keys)."""
    if name not in LOSSES:
        raise ConfigError(f"loss.name={name!r} is unknown; choose one of {sorted(LOSSES)}.")
    cls = LOSSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "pos_weight", "neg_weight"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"loss {name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted) or 'none'}.")
    if cls is WeightedBCELoss:
        return cls(pos_weight=pos_weight, neg_weight=neg_weight, **kwargs)
    return cls(**kwargs)


def _as_weight_vector(values: Any, what: str) -> torch.Tensor:
    try:
        if isinstance(values, torch.Tensor):
            vector = values.detach().to(dtype=torch.float32, device="cpu").clone()
        else:  # lists, numpy arrays and pandas Series alike
            vector = torch.from_numpy(np.asarray(values, dtype=np.float32).copy())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss weighted_bce: {what} must be a list of numbers, one per label ({err}).") from None
    if vector.ndim != 1 or vector.numel() == 0:
        raise ConfigError(f"loss weighted_bce: {what} must be a non-empty 1-D vector; got shape {tuple(vector.shape)}.")
    if not torch.isfinite(vector).all() or (vector < 0).any():
        raise ConfigError(f"loss weighted_bce: {what} must be finite and non-negative; got {vector.tolist()}.")
    return vector
