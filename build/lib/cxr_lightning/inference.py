"""The one loop that runs a model over batches: evaluate, explain, predict and the training-time
CAM grid all feed their loaders through it, so every image reaches the network through the
model's own preprocessing, on the same device, in the same way.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from cxr_lightning.models.module import CXRClassifier


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_batches(model: CXRClassifier, loader: Iterable[dict], device: str | torch.device) -> Iterator[dict]:
    """Each batch of ``loader`` on ``device``, with ``input``: its ``image`` (uint8 pixels) through
    ``model.preprocess``. The pixels stay in ``image`` for overlays."""
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["input"] = model.preprocess(batch["image"])
        yield batch


@torch.no_grad()
def probability_batches(
    model: CXRClassifier, loader: Iterable[dict], device: str | torch.device
) -> Iterator[tuple[dict, torch.Tensor]]:
    """``(batch, probabilities (B, L) on the CPU)`` for each batch of ``loader``, in eval mode.

    The consumer's own code between two batches runs with gradients enabled again (``no_grad``
    covers the generator only), so it may compute CAMs on the yielded batch.
    """
    model = model.to(device).eval()
    for batch in model_batches(model, loader, device):
        yield batch, torch.sigmoid(model(batch["input"], batch["meta"])).float().cpu()


def predict_probabilities(model: CXRClassifier, loader: Iterable[dict], device: str | torch.device) -> np.ndarray:
    """Probabilities ``(N, L)`` of every image of ``loader``, in its order."""
    probs = [p for _, p in probability_batches(model, loader, device)]
    return torch.cat(probs).numpy() if probs else np.zeros((0, len(model.label_names)), np.float32)
