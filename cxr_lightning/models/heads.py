"""Classification heads: pooled image features and/or patient metadata -> one logit per label.

Labels are not mutually exclusive, so every head returns raw logits ``(B, num_labels)``; the loss
and the metrics apply the sigmoid. The four heads reproduce the seed study's variants:

- ``baseline``: an MLP on the image features alone;
- ``metadata_only``: the same MLP on the metadata alone (how much do age/sex/view explain?);
- ``fusion``: image and metadata embeddings mixed by a learned per-unit gate (the seed's "Sauce"
  layer), ``g * h_img + (1 - g) * h_meta``;
- ``fusion_residual``: ``fusion`` plus ``h_img`` carried around the gate. The seed added it after
  Grad-CAM found no gradient at the last convolution: a gate that learns to pass only metadata cuts
  the image branch off, the residual keeps it connected.

A head is one class registered with :func:`register_head` (as timm registers its models) plus one
``conf/head/<name>.yaml`` naming it; the yaml's other keys are the class's keyword arguments. The
class takes ``in_features``, ``meta_dim`` and ``num_labels`` and declares ``name``, ``uses_image``
and ``uses_meta``.
"""
from __future__ import annotations

import inspect
from typing import ClassVar, TypeVar

import torch
from torch import nn

from cxr_lightning.errors import ConfigError

HeadClass = TypeVar("HeadClass", bound=type)
# name -> head class, filled by @register_head as the classes are defined.
HEADS: dict[str, type[nn.Module]] = {}
# The arguments every head receives from the model, not from its yaml.
BUILT_ARGS = ("in_features", "meta_dim", "num_labels")


def register_head(cls: HeadClass) -> HeadClass:
    """Class decorator: make ``cls`` reachable as ``head.name=<cls.name>``."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs its own class attribute `name` to be registered as a head")
    for flag in ("uses_image", "uses_meta"):
        if not isinstance(getattr(cls, flag, None), bool):
            raise TypeError(f"head {name!r}: {cls.__qualname__}.{flag} must be a bool")
    if name in HEADS and HEADS[name] is not cls:
        raise TypeError(f"head {name!r} is registered twice ({HEADS[name].__qualname__}, {cls.__qualname__})")
    HEADS[name] = cls
    return cls


def _mlp(in_features: int, hidden: int, num_labels: int, dropout: float) -> nn.Sequential:
    """The seed's dense stack: Dense 256 -> ReLU -> Dropout -> Dense 256 -> ReLU -> Dense L."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_labels),
    )


def _require_meta(name: str, meta_dim: int) -> None:
    if meta_dim < 1:
        raise ConfigError(
            f"head {name!r} needs patient metadata but the data provide none (meta_dim=0); "
            "choose head=baseline or enable metadata columns in the data config."
        )


@register_head
class BaselineHead(nn.Module):
    """MLP on the image features; metadata is ignored."""

    name: ClassVar[str] = "baseline"
    uses_image: ClassVar[bool] = True
    uses_meta: ClassVar[bool] = False

    def __init__(self, in_features: int, meta_dim: int, num_labels: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.mlp = _mlp(in_features, hidden, num_labels, dropout)

    def forward(self, features: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


@register_head
class MetadataOnlyHead(nn.Module):
    """MLP on the metadata; image features are ignored (the backbone gets no gradient)."""

    name: ClassVar[str] = "metadata_only"
    uses_image: ClassVar[bool] = False
    uses_meta: ClassVar[bool] = True

    def __init__(self, in_features: int, meta_dim: int, num_labels: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        _require_meta(self.name, meta_dim)
        self.mlp = _mlp(meta_dim, hidden, num_labels, dropout)

    def forward(self, features: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.mlp(meta)


@register_head
class FusionHead(nn.Module):
    """Gated fusion of an image and a metadata embedding.

    ``last_gate`` holds the gate of the latest forward pass (detached), for inspection. Setting
    ``force_gate`` to a number in [0, 1] replaces the learned gate by that constant (0 passes only
    metadata, 1 only the image), which is how the tests probe the gradient paths.
    """

    name: ClassVar[str] = "fusion"
    uses_image: ClassVar[bool] = True
    uses_meta: ClassVar[bool] = True
    residual: ClassVar[bool] = False

    def __init__(self, in_features: int, meta_dim: int, num_labels: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        _require_meta(self.name, meta_dim)
        self.image_proj = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.meta_proj = nn.Sequential(nn.Linear(meta_dim, hidden), nn.ReLU())
        self.gate = nn.Linear(2 * hidden, hidden)
        self.classifier = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_labels),
        )
        self.force_gate: float | None = None
        self.last_gate: torch.Tensor | None = None

    def forward(self, features: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        h_img = self.image_proj(features)
        h_meta = self.meta_proj(meta)
        if self.force_gate is None:
            g = torch.sigmoid(self.gate(torch.cat([h_img, h_meta], dim=1)))
        else:
            g = torch.full_like(h_img, float(self.force_gate))
        self.last_gate = g.detach()
        fused = g * h_img + (1 - g) * h_meta
        if self.residual:
            fused = fused + h_img
        return self.classifier(fused)


@register_head
class FusionResidualHead(FusionHead):
    """Gated fusion with the image embedding added back after the gate."""

    name: ClassVar[str] = "fusion_residual"
    residual: ClassVar[bool] = True


def head_class(name: str) -> type[nn.Module]:
    """The head registered as ``name``: the one place head names are checked."""
    if name not in HEADS:
        raise ConfigError(f"head.name={name!r} is unknown; valid heads: {sorted(HEADS)} (head=<name>).")
    return HEADS[name]


def head_uses_image(name: str) -> bool:
    """Whether head ``name`` reads image features (``metadata_only`` needs no backbone)."""
    return bool(head_class(name).uses_image)


def create_head(name: str, in_features: int, meta_dim: int, num_labels: int, **options) -> nn.Module:
    """Build head ``name`` for ``in_features`` image features, ``meta_dim`` metadata values and
    ``num_labels`` logits; ``options`` are the other keys of its yaml (``hidden``, ``dropout``...)."""
    head = head_class(name)
    accepted = [p for p in inspect.signature(head.__init__).parameters if p not in ("self", *BUILT_ARGS)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"head {name!r} takes no option {unknown}; its options: {accepted}.")
    hidden, dropout = options.get("hidden", 1), options.get("dropout", 0.0)
    if num_labels < 1 or hidden < 1:
        raise ConfigError(f"head {name!r}: num_labels ({num_labels}) and hidden ({hidden}) must be positive.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"head {name!r}: dropout={dropout} must lie in [0, 1).")
    return head(in_features=in_features, meta_dim=meta_dim, num_labels=num_labels, **options)
