"""Grad-CAM heatmaps of a multi-label ``model(image, meta) -> logits``, via ``pytorch_grad_cam``.

What the library does not do for us:

* :class:`ImageOnly` holds the metadata input fixed, so the library sees ``f(image) -> logits``;
* :func:`compute_cams` makes one CAM per (image, class) pair, works inside
  ``torch.inference_mode()`` (Lightning's test/predict loops) and with a frozen backbone, leaves
  the model's modes, ``requires_grad`` flags and ``.grad`` as it found them, and flags every CAM
  that got no gradient at the target layer or came out blank -- the seed project's silent failure
  was all-zero heatmaps because no gradient reached the last convolution.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxr_lightning.errors import ConfigError


def _with_gradient_guard(cam_class: type[BaseCAM]) -> type[BaseCAM]:
    """``cam_class`` that survives a target layer no gradient reaches.

    When the layer's output is detached downstream its gradient hook never fires and the library
    would crash on a missing gradient; weighting the layer by a zero gradient instead yields a
    blank CAM that the zero-gradient detector then reports.
    """

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):  # noqa: ANN001
        store = self.activations_and_grads
        if self.uses_gradients and store.activations and not store.gradients:
            store.gradients = [torch.zeros_like(a) for a in store.activations]
        return cam_class.compute_cam_per_layer(self, input_tensor, targets, eigen_smooth)

    return type(cam_class.__name__, (cam_class,), {"compute_cam_per_layer": compute_cam_per_layer})


CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": _with_gradient_guard(GradCAM),
    "gradcam++": _with_gradient_guard(GradCAMPlusPlus),
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
}
NO_GRADIENT = "NO GRADIENT"
EMPTY_HEATMAP = "EMPTY HEATMAP"
# A heatmap whose range is below this is treated as blank (the library maps a constant CAM to 0).
_BLANK_RANGE = 1e-6


class CamWarning(UserWarning):
    """A CAM that carries no information: no gradient reached the target layer, or it is blank."""


# --------------------------------------------------------------------------------------------
# CAM computation
# --------------------------------------------------------------------------------------------
class ImageOnly(nn.Module):
    """``f(image) -> logits`` view of a ``forward(image, meta)`` model, with ``meta`` held fixed.

    Set :attr:`meta` (``(B, M)``, one row per image of the next call, or one row broadcast to the
    whole batch -- ScoreCAM feeds many masked copies of one image) before calling.
    """

    def __init__(self, model: nn.Module, meta: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.meta = meta

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.meta is None:
            raise RuntimeError("ImageOnly.meta is not set; assign the batch's (B, M) metadata first")
        meta = self.meta.to(image.device)
        if meta.shape[0] == 1 and image.shape[0] != 1:
            meta = meta.expand(image.shape[0], -1)
        elif meta.shape[0] != image.shape[0]:
            raise ValueError(
                f"ImageOnly: metadata has {meta.shape[0]} rows but the image batch has "
                f"{image.shape[0]}; set .meta to one row per image (or a single row)"
            )
        return self.model(image, meta)


@dataclass
class CamResult:
    """CAMs of ``N`` images, one per (image, class) pair.

    ``heatmaps``: ``(P, H, W)`` float32 in [0, 1] at the input size; ``pairs``: ``(P, 2)`` int64
    ``(image_idx, class_idx)``; ``probabilities``: ``(N, L)`` sigmoid outputs of every image;
    ``zero_gradient``: ``(P,)`` no gradient reached the target layer (always False for the
    gradient-free ``scorecam``/``eigencam``); ``empty``: ``(P,)`` the heatmap is blank.
    """

    heatmaps: np.ndarray
    pairs: np.ndarray
    probabilities: np.ndarray
    zero_gradient: np.ndarray
    empty: np.ndarray
    method: str

    @classmethod
    def concat(cls, parts: Sequence[CamResult]) -> CamResult:
        """One result for the images of ``parts`` in order (image indices shifted to match)."""
        if not parts:
            raise ValueError("CamResult.concat needs at least one part")
        offsets = np.cumsum([0] + [len(p.probabilities) for p in parts[:-1]])
        return cls(
            heatmaps=np.concatenate([p.heatmaps for p in parts]),
            pairs=np.concatenate([p.pairs + [offset, 0] for p, offset in zip(parts, offsets)]),
            probabilities=np.concatenate([p.probabilities for p in parts]),
            zero_gradient=np.concatenate([p.zero_gradient for p in parts]),
            empty=np.concatenate([p.empty for p in parts]),
            method=parts[0].method,
        )

    @property
    def pair_probabilities(self) -> np.ndarray:
        """``(P,)`` probability of each pair's class for its image."""
        return self.probabilities[self.pairs[:, 0], self.pairs[:, 1]]

    @property
    def n_zero_gradient(self) -> int:
        return int(self.zero_gradient.sum())

    @property
    def n_empty(self) -> int:
        return int(self.empty.sum())

    def titles(self, label_names: Sequence[str]) -> list[str]:
        """One overlay title per pair: finding, probability, and a marker on uninformative CAMs."""
        titles = []
        for (_, cls), prob, no_grad, empty in zip(
            self.pairs, self.pair_probabilities, self.zero_gradient, self.empty
        ):
            marker = NO_GRADIENT if no_grad else EMPTY_HEATMAP if empty else None
            text = f"{label_names[cls]} p={prob:.2f}"
            titles.append(f"{marker}: {text}" if marker else text)
        return titles


def compute_cams(
    model: nn.Module,
    images: torch.Tensor,
    meta: torch.Tensor,
    target_layer: nn.Module,
    targets: Sequence[Sequence[int]] | None = None,
    top_k: int = 3,
    method: str = "gradcam",
    batch_size: int = 16,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CamResult:
    """One CAM per (image, class) pair of a multi-label ``model(image, meta) -> logits``.

    ``images``: ``(N, C, H, W)`` float, already normalised as the model expects; ``meta``:
    ``(N, M)``. ``targets[i]`` lists the class indices to explain for image ``i``; when None, the
    ``top_k`` most probable classes of each image, most probable first. Pairs are run through the
    library ``batch_size`` at a time (ScoreCAM: one at a time, it batches masked copies itself).

    Safe to call from Lightning hooks: it leaves inference mode, enables grad, runs the model in
    eval mode and restores every module's mode, every parameter's ``requires_grad`` and ``.grad``
    afterwards. Neither parameters nor the input are differentiated: the autograd graph starts at
    the target layer's output (:func:`_graph_from`), which is all Grad-CAM needs, so a frozen
    backbone still gets its CAMs and the backward pass stops at the target layer instead of
    running through the whole backbone. Heatmaps that got no gradient or came out blank are
    flagged in the result and reported with a :class:`CamWarning`.

    With explicit ``targets`` the probabilities come from the CAM forward passes themselves (an
    extra forward only for images without targets).

    ``reshape_transform`` turns a token output of ``target_layer`` (ViT, Swin) into a ``(B, C, h, w)``
    map, as pytorch_grad_cam's argument of that name (``CXRClassifier.cam_reshape`` gives the one
    a backbone needs); gradients are reshaped with it, so the zero-gradient flags hold for tokens too.
    """
    cam_class = _checked_method(method, images, meta, batch_size)
    with torch.inference_mode(False), torch.enable_grad(), _cam_mode(model):
        device = next(model.parameters()).device
        # clone(): tensors made under inference mode cannot enter autograd.
        images = images.detach().clone().to(device)
        meta = meta.detach().clone().to(device)
        probabilities = _initial_probabilities(model, images, meta, explicit=targets is not None)
        pairs = _select_pairs(probabilities, targets, top_k)
        heatmaps, zero_gradient = _run_pairs(
            cam_class, model, target_layer, reshape_transform, images, meta, pairs, probabilities, batch_size,
            record_probabilities=targets is not None,
        )
        missing = torch.isnan(probabilities).any(dim=1)
        if missing.any():
            with torch.no_grad():
                probabilities[missing] = _probabilities(model, images[missing.to(device)], meta[missing.to(device)])
    result = _result(heatmaps, zero_gradient, pairs, probabilities, method, images.shape[-2:])
    _warn_uninformative(result, target_layer)
    return result


def _checked_method(method: str, images: torch.Tensor, meta: torch.Tensor, batch_size: int) -> type[BaseCAM]:
    """The CAM class of ``method``, after checking the inputs' shapes and the batch size."""
    cam_class = CAM_METHODS.get(method)
    if cam_class is None:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    if images.ndim != 4 or meta.ndim != 2 or meta.shape[0] != images.shape[0]:
        raise ValueError(
            f"compute_cams needs images (N, C, H, W) and meta (N, M) with the same N; "
            f"got {tuple(images.shape)} and {tuple(meta.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"compute_cams needs normalised float images, got dtype {images.dtype}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return cam_class


def _initial_probabilities(model: nn.Module, images: torch.Tensor, meta: torch.Tensor, explicit: bool) -> torch.Tensor:
    """Every image's probabilities, or with explicit targets a NaN table the CAM passes fill in
    (one forward of a single image finds the number of labels)."""
    with torch.no_grad():
        if not explicit:
            return _probabilities(model, images, meta)
        n_labels = _probabilities(model, images[:1], meta[:1]).shape[1]
        return torch.full((len(images), n_labels), float("nan"))


def _run_pairs(
    cam_class: type[BaseCAM],
    model: nn.Module,
    target_layer: nn.Module,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None,
    images: torch.Tensor,
    meta: torch.Tensor,
    pairs: np.ndarray,
    probabilities: torch.Tensor,
    batch_size: int,
    record_probabilities: bool,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Heatmaps and zero-gradient flags of ``pairs``, chunk by chunk; with ``record_probabilities``
    the CAM forward passes' probabilities are written into ``probabilities``."""
    wrapper = ImageOnly(model)
    cam = cam_class(model=wrapper, target_layers=[target_layer], reshape_transform=reshape_transform)
    # Prepended to the library's own hooks, which must see the grad-carrying output.
    graph_hook = _graph_from(target_layer) if cam.uses_gradients else None
    chunk = 1 if issubclass(cam_class, ScoreCAM) else batch_size
    cam.batch_size = batch_size  # ScoreCAM's masked-copy batch
    heatmaps, zero_gradient = [], []
    try:
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            maps, no_grad, pair_probs = _run_cam(cam, wrapper, images, meta, part)
            heatmaps.append(maps)
            zero_gradient.append(no_grad)
            if record_probabilities and pair_probs is not None:
                probabilities[torch.as_tensor(part[:, 0])] = pair_probs
    finally:
        cam.activations_and_grads.release()
        if graph_hook is not None:
            graph_hook.remove()
    return heatmaps, zero_gradient


def _result(
    heatmaps: list[np.ndarray],
    zero_gradient: list[np.ndarray],
    pairs: np.ndarray,
    probabilities: torch.Tensor,
    method: str,
    size: Sequence[int],
) -> CamResult:
    height, width = size
    heatmaps_np = np.concatenate(heatmaps) if heatmaps else np.zeros((0, height, width), np.float32)
    return CamResult(
        heatmaps=heatmaps_np.astype(np.float32),
        pairs=pairs,
        probabilities=probabilities.numpy(),
        zero_gradient=np.concatenate(zero_gradient) if zero_gradient else np.zeros(0, bool),
        empty=np.array([is_blank(h) for h in heatmaps_np], dtype=bool),
        method=method,
    )


def _probabilities(model: nn.Module, images: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model(images, meta).float()).cpu()


def _graph_from(layer: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make ``layer``'s output the root of the autograd graph.

    Nothing upstream requires grad (parameters are frozen for the call, the input never requires
    grad), so the forward up to the layer records no graph and the backward ends at the layer.
    The ``* 1.0`` makes the output a non-leaf, so in-place ops after the layer (a ``ReLU(inplace)``)
    stay legal. A model that runs the layer under ``no_grad`` or detaches it downstream still
    sends no gradient back: that is what the zero-gradient detector reports.
    """

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        if not isinstance(output, torch.Tensor):
            return None
        return output.detach().requires_grad_() * 1.0

    return layer.register_forward_hook(hook, prepend=True)


def _run_cam(
    cam: BaseCAM, wrapper: ImageOnly, images: torch.Tensor, meta: torch.Tensor, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """Heatmaps ``(p, H, W)``, zero-gradient flags ``(p,)`` and the ``(p, L)`` probabilities of
    the forward pass (None when it failed) for one chunk of pairs."""
    rows = torch.as_tensor(pairs[:, 0], device=images.device)
    x = images[rows]
    wrapper.meta = meta[rows]
    cam_targets = [ClassifierOutputTarget(int(c)) for c in pairs[:, 1]]
    try:
        maps = cam(input_tensor=x, targets=cam_targets)
    except RuntimeError as err:
        # The logits do not depend differentiably on the target layer at all: nothing to explain.
        if "does not require grad" not in str(err):
            raise
        return np.zeros((len(pairs), *x.shape[-2:]), np.float32), np.ones(len(pairs), bool), None
    probabilities = torch.sigmoid(cam.outputs.detach().float()).cpu()
    if not cam.uses_gradients:
        return maps, np.zeros(len(pairs), bool), probabilities
    grads = cam.activations_and_grads.gradients
    reached = torch.stack([g.reshape(len(pairs), -1).ne(0).any(dim=1) for g in grads]).any(dim=0)
    return maps, ~reached.numpy(), probabilities


def _select_pairs(
    probabilities: torch.Tensor, targets: Sequence[Sequence[int]] | None, top_k: int
) -> np.ndarray:
    n_images, n_labels = probabilities.shape
    if targets is None:
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        classes = probabilities.topk(min(top_k, n_labels), dim=1).indices.numpy()
        image_idx = np.repeat(np.arange(n_images), classes.shape[1])
        return np.stack([image_idx, classes.reshape(-1)], axis=1).astype(np.int64)
    if len(targets) != n_images:
        raise ConfigError(f"targets has {len(targets)} entries but there are {n_images} images")
    pairs = [(i, int(c)) for i, classes in enumerate(targets) for c in classes]
    bad = [p for p in pairs if not 0 <= p[1] < n_labels]
    if bad:
        raise ConfigError(
            f"target class index out of range 0..{n_labels - 1} for (image, class) {bad[:5]}"
        )
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@contextlib.contextmanager
def _cam_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients; afterwards everything exactly as before.

    Flags are restored module by module (``model.train(mode)`` would overwrite submodules that a
    frozen-backbone setup keeps in eval), and ``.grad`` is restored because the library calls
    ``model.zero_grad()``, which would otherwise wipe gradients being accumulated in training.
    """
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad


def is_blank(heatmap: np.ndarray) -> bool:
    """Whether ``heatmap`` carries nothing: non-finite values or (almost) no range."""
    return not np.isfinite(heatmap).all() or float(np.ptp(heatmap)) <= _BLANK_RANGE


def _warn_uninformative(result: CamResult, target_layer: nn.Module) -> None:
    layer = type(target_layer).__name__
    n = len(result.pairs)
    if result.n_zero_gradient:
        which = [tuple(map(int, p)) for p in result.pairs[result.zero_gradient][:10]]
        warnings.warn(
            f"{result.method}: {result.n_zero_gradient} of {n} CAMs got NO GRADIENT at the "
            f"target layer ({layer}); (image, class) pairs {which}"
            f"{' ...' if result.n_zero_gradient > 10 else ''}. The logits do not depend on that "
            "layer's output: check cam_layer names a layer that feeds the head and is not detached.",
            CamWarning,
            stacklevel=3,
        )
    blank_only = result.empty & ~result.zero_gradient
    if blank_only.any():
        which = [tuple(map(int, p)) for p in result.pairs[blank_only][:10]]
        warnings.warn(
            f"{result.method}: {int(blank_only.sum())} of {n} CAMs are blank (no positive "
            f"evidence at {layer} after ReLU); (image, class) pairs {which}"
            f"{' ...' if blank_only.sum() > 10 else ''}",
            CamWarning,
            stacklevel=3,
        )

