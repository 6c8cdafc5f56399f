"""Grad-CAM wrapper, zero-gradient detector, localisation scores and overlays (cxr_lightning.explain)."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from helpers import REPO
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.explain import (
    ALL_FINDINGS_ROW,
    EMPTY_HEATMAP,
    NO_GRADIENT,
    CamResult,
    CamWarning,
    ImageOnly,
    bbox_targets,
    cam_grid,
    compute_cams,
    heatmap_to_box,
    iobb,
    iou,
    localization_scores,
    overlay_title,
    pointing_game_hit,
    random_heatmaps,
    render_overlay,
    save_overlay,
)

N_LABELS, META_DIM, SIZE = 4, 3, 64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyClassifier(nn.Module):
    """Stand-in for CXRClassifier: timm trunk, pooled features + metadata -> linear head.

    ``dead`` adds a side branch at ``self.side`` whose output reaches the logits multiplied by 0
    (``"zero"``) or detached (``"detach"``), so no gradient can reach it; ``"no_grad"`` runs the
    trunk under ``torch.no_grad()`` (a common way to freeze a backbone), so no gradient reaches any
    of its layers; ``"input"`` detaches the image, which Grad-CAM does not need.
    """

    def __init__(self, dead: str | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0, in_chans=1)
        features = self.backbone.num_features
        self.head = nn.Linear(features + META_DIM, N_LABELS)
        self.side = nn.Conv2d(features, 2, 1)
        self.dead = dead
        with torch.no_grad():
            # Positive image weights: every class has positive evidence, so no CAM is blank by chance.
            self.head.weight[:, :features].uniform_(0.5, 1.5)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.dead == "no_grad" else contextlib.nullcontext():
            fmap = self.backbone.forward_features(image.detach() if self.dead == "input" else image)
        logits = self.head(torch.cat([fmap.mean(dim=(2, 3)), meta], dim=1))
        if self.dead in ("zero", "detach"):
            side = self.side(fmap).mean(dim=(1, 2, 3))[:, None]
            logits = logits + (0 * side if self.dead == "zero" else side.detach())
        return logits


@pytest.fixture(scope="module")
def tiny() -> TinyClassifier:
    return TinyClassifier()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, SIZE, SIZE, generator=gen), torch.randn(2, META_DIM, generator=gen)


@contextlib.contextmanager
def _no_cam_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CamWarning)
        yield


# ---------------------------------------------------------------------------------------------
# ImageOnly and compute_cams
# ---------------------------------------------------------------------------------------------
def test_image_only_holds_meta_fixed(tiny, batch):
    images, meta = batch
    wrapper = ImageOnly(tiny.eval())
    with pytest.raises(RuntimeError, match="meta is not set"):
        wrapper(images)
    wrapper.meta = meta
    torch.testing.assert_close(wrapper(images), tiny(images, meta))
    wrapper.meta = meta[:1]  # one row broadcasts to every image (ScoreCAM's masked copies)
    torch.testing.assert_close(wrapper(images), tiny(images, meta[:1].expand(2, -1)))
    wrapper.meta = torch.zeros(3, META_DIM)
    with pytest.raises(ValueError, match="3 rows but the image batch has 2"):
        wrapper(images)


def test_top_k_pairs_probabilities_and_nonzero_heatmaps(tiny, batch):
    images, meta = batch
    with _no_cam_warnings():
        result = compute_cams(tiny, images, meta, tiny.backbone.layer3, top_k=2)
    with torch.no_grad():
        probs = torch.sigmoid(tiny.eval()(images, meta)).numpy()
    expected_pairs = [(i, int(c)) for i in range(2) for c in np.argsort(-probs[i])[:2]]
    assert [tuple(p) for p in result.pairs] == expected_pairs
    np.testing.assert_allclose(result.probabilities, probs, rtol=1e-5)
    np.testing.assert_allclose(result.pair_probabilities, [probs[i, c] for i, c in expected_pairs], rtol=1e-5)
    assert result.heatmaps.shape == (4, SIZE, SIZE) and result.heatmaps.dtype == np.float32
    assert result.heatmaps.min() >= 0 and np.allclose(result.heatmaps.max(axis=(1, 2)), 1, atol=1e-4)
    assert not result.zero_gradient.any() and not result.empty.any()
    assert result.n_zero_gradient == result.n_empty == 0


@pytest.mark.parametrize("targets", [[[2, 0], [1]], [[3], []]])
def test_probabilities_with_explicit_targets_match_a_plain_forward(tiny, batch, targets):
    # Taken from the CAM passes; an image without targets gets its own forward.
    images, meta = batch
    result = compute_cams(tiny, images, meta, tiny.backbone.layer3, targets=targets)
    with torch.no_grad():
        probs = torch.sigmoid(tiny.eval()(images, meta)).numpy()
    np.testing.assert_allclose(result.probabilities, probs, rtol=1e-5)
    assert [tuple(p) for p in result.pairs] == [(i, c) for i, cs in enumerate(targets) for c in cs]


def test_each_pair_matches_a_direct_gradcam_of_that_image_and_class(tiny, batch):
    images, meta = batch
    targets = [[3, 0], [1]]
    result = compute_cams(tiny, images, meta, tiny.backbone.layer3, targets=targets)
    assert [tuple(p) for p in result.pairs] == [(0, 3), (0, 0), (1, 1)]
    for k, (i, c) in enumerate(result.pairs):
        single = ImageOnly(tiny, meta[i : i + 1])
        direct = GradCAM(model=single, target_layers=[tiny.backbone.layer3])
        try:
            expected = direct(input_tensor=images[i : i + 1], targets=[ClassifierOutputTarget(int(c))])[0]
        finally:
            direct.activations_and_grads.release()
        np.testing.assert_allclose(result.heatmaps[k], expected, atol=1e-4)


def test_works_in_inference_mode_and_with_frozen_params(tiny, batch):
    images, meta = batch
    reference = compute_cams(tiny, images, meta, tiny.backbone.layer3, top_k=1)
    with torch.inference_mode():
        inf_images, inf_meta = images.clone(), meta.clone()  # inference tensors, as Lightning passes them
        inside = compute_cams(tiny, inf_images, inf_meta, tiny.backbone.layer3, top_k=1)
        assert torch.is_inference_mode_enabled()
    np.testing.assert_allclose(inside.heatmaps, reference.heatmaps, atol=1e-5)

    frozen = TinyClassifier()
    frozen.requires_grad_(False)
    result = compute_cams(frozen, images, meta, frozen.backbone.layer3, top_k=1)
    np.testing.assert_allclose(result.heatmaps, reference.heatmaps, atol=1e-5)
    assert not result.zero_gradient.any()
    assert not any(p.requires_grad for p in frozen.parameters())


def test_restores_modes_requires_grad_and_accumulated_grads(batch):
    images, meta = batch
    model = TinyClassifier().train()
    model.backbone.bn1.eval()  # a frozen-BN setup keeps some modules in eval while training
    model.head.bias.requires_grad_(False)
    saved_grad = torch.full_like(model.head.weight, 0.25)
    model.head.weight.grad = saved_grad.clone()
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    compute_cams(model, images, meta, model.backbone.layer3, top_k=1)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.backbone.bn1.training and model.backbone.layer3.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    torch.testing.assert_close(model.head.weight.grad, saved_grad)
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("dead, layer", [("zero", "side"), ("detach", "side"), ("no_grad", "backbone.layer3")])
def test_zero_gradient_detector_fires_when_no_gradient_reaches_the_layer(batch, dead, layer):
    images, meta = batch
    model = TinyClassifier(dead=dead)
    with pytest.warns(CamWarning, match=r"4 of 4 CAMs got NO GRADIENT .*\(0, \d\), \(0, \d\), \(1, \d\)"):
        result = compute_cams(model, images, meta, model.get_submodule(layer), top_k=2)
    assert result.zero_gradient.all() and result.empty.all()
    assert result.n_zero_gradient == 4
    assert not result.heatmaps.any()
    assert all(t.startswith(f"{NO_GRADIENT}: ") for t in result.titles(["A", "B", "C", "D"]))


def test_cams_need_no_gradient_below_the_target_layer(tiny, batch):
    # The graph starts at the target layer: a model that detaches its input explains as usual.
    images, meta = batch
    reference = compute_cams(tiny, images, meta, tiny.backbone.layer3, top_k=2)
    model = TinyClassifier(dead="input")
    with _no_cam_warnings():
        result = compute_cams(model, images, meta, model.backbone.layer3, top_k=2)
    np.testing.assert_allclose(result.heatmaps, reference.heatmaps, atol=1e-5)
    assert not result.zero_gradient.any()


def test_zero_gradient_detector_quiet_on_a_live_layer_of_the_same_model(batch):
    images, meta = batch
    model = TinyClassifier(dead="zero")
    with _no_cam_warnings():
        result = compute_cams(model, images, meta, model.backbone.layer3, top_k=2)
    assert not result.zero_gradient.any() and not result.empty.any()


def test_blank_but_gradient_carrying_cam_is_flagged_empty_not_zero_gradient(batch):
    images, meta = batch
    model = TinyClassifier()
    with torch.no_grad():
        model.head.weight[:, : model.backbone.num_features].mul_(-1)  # all evidence negative -> ReLU blank
    with pytest.warns(CamWarning, match="2 of 2 CAMs are blank"):
        result = compute_cams(model, images, meta, model.backbone.layer4, top_k=1)
    assert result.empty.all() and not result.zero_gradient.any()
    assert all(t.startswith(f"{EMPTY_HEATMAP}: ") for t in result.titles(["A", "B", "C", "D"]))


@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "scorecam"])
def test_other_cam_methods(tiny, batch, method):
    images, meta = batch
    with _no_cam_warnings():
        result = compute_cams(tiny, images[:1], meta[:1], tiny.backbone.layer3, top_k=1, method=method)
    assert result.method == method
    assert result.heatmaps.shape == (1, SIZE, SIZE)
    assert 0 <= result.heatmaps.min() and result.heatmaps.max() == pytest.approx(1, abs=1e-4)
    assert not result.zero_gradient.any() and not result.empty.any()


def test_bad_arguments_are_rejected(tiny, batch):
    images, meta = batch
    layer = tiny.backbone.layer3
    with pytest.raises(ConfigError, match="unknown CAM method 'gradcamm'"):
        compute_cams(tiny, images, meta, layer, method="gradcamm")
    with pytest.raises(ConfigError, match=r"out of range 0\.\.3 for \(image, class\) \[\(1, 7\)\]"):
        compute_cams(tiny, images, meta, layer, targets=[[0], [7]])
    with pytest.raises(ConfigError, match="targets has 1 entries but there are 2 images"):
        compute_cams(tiny, images, meta, layer, targets=[[0]])
    with pytest.raises(ValueError, match="same N"):
        compute_cams(tiny, images, meta[:1], layer)
    with pytest.raises(ValueError, match="normalised float"):
        compute_cams(tiny, images.to(torch.uint8), meta, layer)


# ---------------------------------------------------------------------------------------------
# The six real backbones (written by another module; skipped until it exists)
# ---------------------------------------------------------------------------------------------
# timm name -> (cam layer if conf/backbone/*.yaml has none, input size: the smallest giving a
# target layer of at least 2x2, since a 1x1 map upsamples to a constant, blank CAM)
BACKBONES = {
    "densenet121": ("features.norm5", 64),
    "vgg19": ("features.35", 64),
    "resnet50": ("layer4", 64),
    "inception_v3": ("Mixed_7c", 112),  # Mixed_7c is 1x1 (a constant CAM) below 107 px
    "mobilenetv2_100": ("conv_head", 64),
    "efficientnet_b3": ("conv_head", 64),
}


def _configured_backbones() -> dict[str, dict]:
    from omegaconf import OmegaConf

    configs = {}
    for path in sorted((REPO / "conf" / "backbone").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(cfg, dict) and "name" in cfg:
            configs[cfg["name"]] = cfg
    return configs


@pytest.mark.parametrize("name", list(BACKBONES))
def test_real_backbones_give_nonzero_heatmaps(name):
    backbones = pytest.importorskip("cxr_lightning.models.backbones")
    layer_path, size = BACKBONES[name]
    cfg = _configured_backbones().get(name, {})
    layer_path = backbones.cam_layer_of(cfg) if cfg else layer_path  # the layer explain hooks for this yaml
    size = max(size, int(cfg.get("min_input_size") or 0))

    torch.manual_seed(0)
    backbone = backbones.create_backbone(name, pretrained=False, in_chans=1)
    head = nn.Linear(backbone.num_features + META_DIM, N_LABELS)
    with torch.no_grad():
        head.weight.abs_()

    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, image, meta):
            return self.head(torch.cat([self.backbone(image), meta], dim=1))

    model = WithHead()
    result = compute_cams(
        model, torch.randn(1, 1, size, size), torch.randn(1, META_DIM), backbone.get_layer(layer_path), top_k=1
    )
    assert result.heatmaps.shape == (1, size, size)
    assert not result.zero_gradient.any(), f"{name}.{layer_path} got no gradient"
    assert result.heatmaps.max() > 0.99 and not result.empty.any()


# ---------------------------------------------------------------------------------------------
# Localisation primitives
# ---------------------------------------------------------------------------------------------
def test_pointing_game_hit():
    heatmap = np.zeros((16, 32), np.float32)
    heatmap[10, 20] = 1.0  # argmax pixel centre (20.5, 10.5)
    assert pointing_game_hit(heatmap, [(18, 8, 5, 5)])
    assert pointing_game_hit(heatmap, [(0, 0, 4, 4), (20, 10, 1, 1)])
    assert not pointing_game_hit(heatmap, [(0, 0, 20, 10)])  # covers [0, 20] x [0, 10]: centre outside
    assert not pointing_game_hit(heatmap, [])
    assert not pointing_game_hit(np.zeros((16, 32)), [(0, 0, 32, 16)])  # a blank map points nowhere


def test_heatmap_to_box_components():
    heatmap = np.zeros((16, 16), np.float32)
    heatmap[2:5, 5:9] = 1.0  # 3 rows x 4 cols
    heatmap[10:12, 1:3] = 0.6  # 2 x 2
    assert heatmap_to_box(heatmap, 0.5) == [(5.0, 2.0, 4.0, 3.0), (1.0, 10.0, 2.0, 2.0)]
    assert heatmap_to_box(heatmap, 0.7) == [(5.0, 2.0, 4.0, 3.0)]
    diagonal = np.zeros((4, 4), np.float32)
    diagonal[0, 0] = diagonal[1, 1] = 1.0  # 8-connected: one component
    assert heatmap_to_box(diagonal, 0.5) == [(0.0, 0.0, 2.0, 2.0)]
    shifted = heatmap + 3.0  # min-max normalised: an offset changes nothing
    assert heatmap_to_box(shifted, 0.5) == heatmap_to_box(heatmap, 0.5)
    assert heatmap_to_box(np.full((8, 8), 0.4), 0.5) == []
    with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\], got 1.5"):
        heatmap_to_box(heatmap, 1.5)


def test_iou_and_iobb_by_hand():
    assert iou((0, 0, 4, 4), (2, 2, 4, 4)) == pytest.approx(4 / 28)
    assert iou((0, 0, 4, 4), (0, 0, 4, 4)) == pytest.approx(1.0)
    assert iou((0, 0, 2, 2), (5, 5, 2, 2)) == 0.0
    assert iou((0, 0, 2, 2), (2, 0, 2, 2)) == 0.0  # touching edges
    # IoBB divides by the predicted box: a small prediction inside the truth scores 1.
    assert iobb((1, 1, 2, 2), (0, 0, 4, 4)) == pytest.approx(1.0)
    assert iobb((0, 0, 4, 4), (1, 1, 2, 2)) == pytest.approx(4 / 16)
    assert iou((1, 1, 2, 2), (0, 0, 4, 4)) == pytest.approx(4 / 16)
    assert iobb((0, 0, 0, 3), (0, 0, 4, 4)) == 0.0


def test_random_heatmaps_seeded_smooth_and_normalised():
    a, b, c = (
        random_heatmaps(3, (32, 48), seed=4),
        random_heatmaps(3, (32, 48), seed=4),
        random_heatmaps(3, (32, 48), seed=5),
    )
    assert a.shape == (3, 32, 48) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(a.min(axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(a.max(axis=(1, 2)), 1, atol=1e-6)
    raw = np.random.default_rng(0).random((32, 48))
    assert np.abs(np.diff(a[0], axis=1)).mean() < 0.2 * np.abs(np.diff(raw, axis=1)).mean()


# ---------------------------------------------------------------------------------------------
# localization_scores
# ---------------------------------------------------------------------------------------------
LABELS = ["Effusion", "Mass", "Nodule"]


def _bbox_table(per_image_size: bool) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "Image Index": ["a.png", "b.png", "b.png", "a.png", "c.png"],
            "Finding Label": ["Effusion", "Mass", "Effusion", "Nodule", "Mass"],
            # a: 1024 px -> /16;  b's Effusion is given on a 2048-px original -> /32
            "x": [256.0, 0.0, 512.0, 800.0, 0.0],
            "y": [256.0, 0.0, 512.0, 800.0, 0.0],
            "w": [256.0, 128.0, 512.0, 64.0, 100.0],
            "h": [256.0, 128.0, 512.0, 64.0, 100.0],
        }
    )
    if per_image_size:
        table["OriginalImage Width"] = [1024, np.nan, 2048, 1024, 1024]
        table["OriginalImage Height"] = [1024, np.nan, 2048, 1024, 1024]
    return table


def _scored_case() -> tuple[np.ndarray, np.ndarray]:
    # pairs: (a, Effusion), (a, Mass) [no box], (b, Mass), (b, Effusion); no CAM for (a, Nodule)
    pairs = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    heatmaps = np.zeros((4, SIZE, SIZE), np.float32)
    heatmaps[0, 16:32, 16:32] = 1.0  # exactly the (16, 16, 16, 16) box: IoU 1, IoBB 1
    heatmaps[1, 0:4, 0:4] = 1.0
    heatmaps[2, 40:56, 40:56] = 1.0  # far from the (0, 0, 8, 8) box: miss everywhere
    heatmaps[3, 16:20, 16:32] = 1.0  # top quarter of (16, 16, 16, 16): IoU 0.25, IoBB 1
    return heatmaps, pairs


def test_localization_scores_by_hand():
    heatmaps, pairs = _scored_case()
    with pytest.warns(CamWarning, match="1 boxes of the given images have no heatmap"):
        table = localization_scores(
            heatmaps, pairs, ["a.png", "b.png"], LABELS, _bbox_table(per_image_size=True), SIZE
        )
    assert list(table.index) == ["Effusion", "Mass", ALL_FINDINGS_ROW]
    expected = pd.DataFrame(
        {
            "n_images": [2, 1, 3],
            "n_boxes": [2, 1, 3],
            "pointing_game": [1.0, 0.0, 2 / 3],
            "iou@0.1": [1.0, 0.0, 2 / 3],
            "iou@0.3": [0.5, 0.0, 1 / 3],
            "iou@0.5": [0.5, 0.0, 1 / 3],
            "iobb@0.1": [1.0, 0.0, 2 / 3],
            "iobb@0.3": [1.0, 0.0, 2 / 3],
            "iobb@0.5": [1.0, 0.0, 2 / 3],
        },
        index=pd.Index(["Effusion", "Mass", ALL_FINDINGS_ROW], name="finding"),
    )
    pd.testing.assert_frame_equal(table[expected.columns], expected)
    random_cols = [c for c in table.columns if c.startswith("random_")]
    assert random_cols == [f"random_{c}" for c in expected.columns[2:]]
    assert ((table[random_cols] >= 0) & (table[random_cols] <= 1)).all().all()


def test_without_per_image_sizes_every_box_is_on_original_size_pixels():
    heatmaps, pairs = _scored_case()
    with pytest.warns(CamWarning):
        table = localization_scores(
            heatmaps, pairs, ["a.png", "b.png"], LABELS, _bbox_table(per_image_size=False), SIZE, original_size=2048
        )
    # On a 2048 original, a's Effusion box becomes (8, 8, 8, 8) and the exact-box heatmap of
    # (16, 16, 16, 16) now merely touches it: no overlap, and its maximum lies outside.
    assert table.loc["Effusion", "iou@0.1"] == 0.5
    assert table.loc["Effusion", "pointing_game"] == 0.5


def test_random_baseline_columns_score_the_seeded_random_heatmaps():
    _, pairs = _scored_case()
    evaluated = [0, 2, 3]  # pairs that have a box, in order
    heatmaps = np.zeros((4, SIZE, SIZE), np.float32)
    heatmaps[evaluated] = random_heatmaps(3, (SIZE, SIZE), seed=7)
    with pytest.warns(CamWarning):
        table = localization_scores(
            heatmaps, pairs, ["a.png", "b.png"], LABELS, _bbox_table(True), SIZE, seed=7, thresholds=(0.1, 0.2)
        )
    scores = [c for c in table.columns if c not in ("n_images", "n_boxes", "box_share") and not c.startswith("random_")]
    assert "iou@0.2" in scores
    np.testing.assert_array_equal(table[scores].to_numpy(), table[[f"random_{c}" for c in scores]].to_numpy())


def test_random_baseline_points_like_a_uniform_point_on_random_boxes_of_known_area():
    rng = np.random.default_rng(0)
    n, side, size = 3000, 16, 64  # 16 x 16 boxes on a 64-px heatmap: a uniform point hits 1/16
    names = [f"{i}.png" for i in range(n)]
    xy = rng.integers(0, size - side + 1, size=(n, 2)) * 16.0  # on the 1024-px original
    boxes = pd.DataFrame(
        {
            "Image Index": names,
            "Finding Label": "Mass",
            "x": xy[:, 0],
            "y": xy[:, 1],
            "w": side * 16.0,
            "h": side * 16.0,
        }
    )
    pairs = np.column_stack([np.arange(n), np.ones(n, dtype=int)])
    table = localization_scores(np.zeros((n, size, size), np.float32), pairs, names, LABELS, boxes, size, seed=3)
    share = (side / size) ** 2
    assert table.at[ALL_FINDINGS_ROW, "box_share"] == pytest.approx(share)
    noise = np.sqrt(share * (1 - share) / n)
    assert abs(table.at[ALL_FINDINGS_ROW, "random_pointing_game"] - share) < 3 * noise
    # the maxima themselves are uniformly placed: as many on the outer ring as its share of pixels
    maxima = random_heatmaps(4000, (size, size), seed=1).reshape(4000, -1).argmax(axis=1)
    r, c = np.divmod(maxima, size)
    ring = ((r == 0) | (c == 0) | (r == size - 1) | (c == size - 1)).mean()
    expected = 1 - ((size - 2) / size) ** 2
    assert abs(ring - expected) < 3 * np.sqrt(expected * (1 - expected) / 4000)


def test_bbox_targets_and_bad_tables():
    table = _bbox_table(per_image_size=False)
    table.loc[len(table)] = ["b.png", "Cardiomegaly", 1.0, 1.0, 5.0, 5.0]
    with pytest.warns(CamWarning, match=r"1 boxes are of findings the model does not predict \(\['Cardiomegaly'\]\)"):
        targets = bbox_targets(["a.png", "b.png", "z.png"], LABELS, table)
    assert targets == [[0, 2], [0, 1], []]

    heatmaps, pairs = _scored_case()
    broken = table.drop(columns=["w"])
    broken.attrs["source"] = "BBox_List_2017.csv"
    with pytest.raises(DataError, match=r"BBox_List_2017.csv: missing column\(s\) \['w'\]"):
        localization_scores(heatmaps, pairs, ["a.png", "b.png"], LABELS, broken, SIZE)
    negative = table.copy()
    negative.loc[2, "h"] = -3.0
    with pytest.raises(DataError, match=r"rows \[2\] have missing or non-positive"):
        localization_scores(heatmaps, pairs, ["a.png", "b.png"], LABELS, negative, SIZE)
    with pytest.raises(ValueError, match="must be"):
        localization_scores(heatmaps, pairs, ["a.png", "b.png"], LABELS, table, 32)
    with pytest.raises(ValueError, match="beyond the 1 image names"):
        localization_scores(heatmaps, pairs, ["a.png"], LABELS, table, SIZE)

    other_images = localization_scores(heatmaps, pairs, ["y.png", "z.png"], LABELS, table, SIZE)
    assert other_images.empty and list(other_images.columns[:3]) == ["n_images", "n_boxes", "pointing_game"]


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------
def _red_text_pixels(rendered: np.ndarray, banner_rows: int) -> int:
    banner = rendered[:banner_rows].astype(int)
    return int(((banner[..., 0] > 150) & (banner[..., 1] < 80) & (banner[..., 2] < 80)).sum())


def test_overlay_titles_mark_uninformative_heatmaps():
    live = np.random.default_rng(0).random((8, 8))
    assert overlay_title("Mass p=0.80", live) == "Mass p=0.80"
    assert overlay_title("Mass p=0.80", np.zeros((8, 8))) == f"{EMPTY_HEATMAP}: Mass p=0.80"
    assert overlay_title("Mass p=0.80", np.zeros((8, 8)), zero_gradient=True) == f"{NO_GRADIENT}: Mass p=0.80"
    assert overlay_title(f"{NO_GRADIENT}: Mass", np.zeros((8, 8))) == f"{NO_GRADIENT}: Mass"

    image = np.full((32, 32), 128, np.uint8)
    normal = render_overlay(image, live, "Mass p=0.80")
    blank = render_overlay(image, np.zeros((32, 32)), "Mass p=0.80", zero_gradient=True)
    assert normal.shape == blank.shape and normal.shape[1] == 256 and normal.shape[2] == 3
    banner_rows = normal.shape[0] - 256
    assert _red_text_pixels(normal, banner_rows) == 0 < _red_text_pixels(blank, banner_rows)


def test_save_overlay_writes_a_readable_png(tmp_path):
    image = (np.linspace(-2, 2, 48 * 40).reshape(48, 40)).astype(np.float32)  # normalised float image
    heatmap = np.zeros((12, 10), np.float32)  # CAM-resolution map: resized to the image
    heatmap[3:6, 4:7] = 1.0
    path = save_overlay(image, heatmap, tmp_path / "cams" / "a_Mass.png", "Mass p=0.91")
    assert path == tmp_path / "cams" / "a_Mass.png" and path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.width == 256
    assert [p.name for p in path.parent.iterdir()] == ["a_Mass.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="one grey image"):
        save_overlay(np.zeros((2, 8, 8)), heatmap, tmp_path / "x.png", "x")


def test_cam_grid_shape_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    heatmaps = random_heatmaps(3, (32, 32), seed=0)
    titles = ["Mass p=0.9", "Effusion p=0.5", "Nodule p=0.1"]
    grid = cam_grid(images, heatmaps, titles, nrow=2)
    tile_h, tile_w, _ = render_overlay(images[0], heatmaps[0], titles[0]).shape
    pad = 2
    assert grid.shape == (3, 2 * (tile_h + pad) + pad, 2 * (tile_w + pad) + pad)
    assert grid.dtype == torch.float32 and 0 <= grid.min() and grid.max() <= 1

    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_image("cams/val", grid, global_step=3)
    writer.close()
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["cams/val"]
    (logged,) = accumulator.Images("cams/val")
    assert (logged.step, logged.height, logged.width) == (3, grid.shape[1], grid.shape[2])
    with pytest.raises(ValueError, match="as many images, heatmaps and titles"):
        cam_grid(images, heatmaps[:2], titles)


def test_cam_result_titles_carry_finding_and_probability():
    result = CamResult(
        heatmaps=np.zeros((2, 4, 4), np.float32),
        pairs=np.array([[0, 1], [1, 0]]),
        probabilities=np.array([[0.1, 0.876], [0.33, 0.2]], np.float32),
        zero_gradient=np.array([False, True]),
        empty=np.array([False, True]),
        method="gradcam",
    )
    assert result.titles(["Effusion", "Mass"]) == ["Mass p=0.88", f"{NO_GRADIENT}: Effusion p=0.33"]
