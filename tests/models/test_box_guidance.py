"""Box-guided training: the attention term, its differentiable Grad-CAM, the masks that follow the
augmentation, and the training split as the only source of boxes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import compose_config, tiny_overrides

from cxr_lightning.checkpoints import checkpoint_hparams
from cxr_lightning.data import nih
from cxr_lightning.data.augment import BatchAugment
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import ConfigError
from cxr_lightning.models.box_guidance import (
    attention_loss,
    box_attention_loss,
    box_targets,
    capture_output,
    gradcam_maps,
    warmup_factor,
)
from cxr_lightning.models.module import CXRClassifier

LABELS = ["Atelectasis", "Mass", "No Finding"]


def quadrant_mask(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[0, : size // 2, : size // 2] = 1
    return mask


def box_cost(z: np.ndarray, cover: np.ndarray) -> float:
    """The term recomputed by hand: -log of the softmax mass inside, with one null cell of logit 0."""
    e = np.exp(z.astype(np.float64))
    return float(-np.log((cover * e).sum() / (1.0 + e.sum())))


def constructed_maps() -> dict[str, torch.Tensor]:
    """Pre-ReLU 4 x 4 maps against the top-left 2 x 2 box (a quarter of the image)."""
    low = -10.0
    empty = torch.full((4, 4), low)  # Grad-CAM (its ReLU) is blank
    constant = torch.full((4, 4), 3.0)
    half = torch.full((4, 4), low)
    half[0, 0], half[3, 3] = 5.0, 5.0  # half of the mass inside, half outside
    inside = torch.full((4, 4), low)
    inside[:2, :2] = 5.0
    return {"empty": empty, "constant": constant, "half inside": half, "inside": inside}


def test_box_term_orders_constructed_maps_and_has_no_degenerate_minimum():
    mask = quadrant_mask()
    cover = np.zeros((4, 4))
    cover[:2, :2] = 1.0
    costs = {}
    for name, z in constructed_maps().items():
        costs[name] = attention_loss(z[None], mask).item()
        assert costs[name] == pytest.approx(box_cost(z.numpy(), cover), rel=1e-5, abs=1e-6), name
    assert costs["empty"] > costs["constant"] > costs["half inside"] > costs["inside"]
    assert costs["half inside"] == pytest.approx(np.log(2), abs=0.01)  # the null cell holds e^-5 of it
    assert costs["inside"] < 0.01
    # A constant map costs at least -log(the box's share of the image), whatever its height, and a map
    # switched further off costs more: the empty map is the worst, not the best, answer.
    for height in (-20.0, -5.0, 0.0, 5.0, 50.0):
        assert attention_loss(torch.full((1, 4, 4), height), mask).item() >= np.log(4) - 1e-6
    assert attention_loss(torch.full((1, 4, 4), -20.0), mask) > attention_loss(torch.full((1, 4, 4), -5.0), mask)
    # The mean over pairs; a pair whose box left the image (no cell covered) is not scored.
    both = torch.stack([constructed_maps()["half inside"], constructed_maps()["inside"]])
    mean = (costs["half inside"] + costs["inside"]) / 2
    assert attention_loss(both, mask.repeat(2, 1, 1)).item() == pytest.approx(mean)
    off = torch.cat([mask, torch.zeros(1, 8, 8)])
    assert attention_loss(both, off).item() == pytest.approx(costs["half inside"])
    assert np.isfinite(attention_loss(torch.full((1, 4, 4), 500.0), mask).item())  # large logits: log space


def test_box_term_pulls_a_blank_map_back_up_inside_the_box():
    z = torch.full((1, 4, 4), -5.0, requires_grad=True)  # Grad-CAM of this map is blank
    attention_loss(z, quadrant_mask()).backward()
    grad = z.grad[0]
    assert (grad[:2, :2] < 0).all()  # descent raises the inside cells
    assert (grad[:2, 2:] >= 0).all() and (grad[2:] >= 0).all()  # and never the outside ones


def test_box_targets_draw_the_union_of_a_pairs_boxes():
    boxes = torch.tensor([[[0, 0, 4, 2], [0, 0, 2, 4], [4, 4, 8, 8]], [[0, 0, 0, 0]] * 3], dtype=torch.float32)
    labels = torch.tensor([[0, 0, 1], [-1, -1, -1]])
    pairs, masks = box_targets(boxes, labels, (8, 8))
    assert pairs.tolist() == [[0, 0], [0, 1]]
    expected = torch.zeros(8, 8)
    expected[:2, :4] = 1
    expected[:4, :2] = 1
    assert torch.equal(masks[0], expected)
    assert masks[1].sum() == 16 and masks[1, 4:, 4:].all()


def test_box_fusion_of_three_readers():
    """Image 0, finding 0: three readers; image 0, finding 1: one reader; image 1, finding 0: two
    readers whose boxes do not meet."""
    boxes = torch.tensor([
        [[0, 0, 4, 4], [2, 2, 6, 6], [3, 0, 8, 3], [4, 4, 8, 8]],
        [[0, 0, 2, 2], [6, 6, 8, 8], [0, 0, 0, 0], [0, 0, 0, 0]],
    ], dtype=torch.float32)
    labels = torch.tensor([[0, 0, 0, 1], [0, 0, -1, -1]])
    readers = torch.tensor([[0, 1, 2, -1], [0, 1, -1, -1]])
    a, b, c = (torch.zeros(8, 8) for _ in range(3))
    a[:4, :4], b[2:6, 2:6], c[:3, 3:8] = 1, 1, 1  # the three readers' boxes of image 0, finding 0
    pairs, union = box_targets(boxes, labels, (8, 8), box_readers=readers)
    assert pairs.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert torch.equal(union[0], ((a + b + c) >= 1).float())
    pairs, majority = box_targets(boxes, labels, (8, 8), box_readers=readers, fusion="majority")
    assert pairs.tolist() == [[0, 0], [0, 1]]  # image 1's readers agree nowhere: no target
    assert torch.equal(majority[0], ((a + b + c) >= 2).float())
    # By hand: a and b share rows 2-3 x cols 2-3, a and c col 3 of rows 0-2, b and c row 2 x cols 3-5.
    by_hand = torch.zeros(8, 8)
    for r, col in [(2, 2), (2, 3), (3, 2), (3, 3), (0, 3), (1, 3), (2, 4), (2, 5)]:
        by_hand[r, col] = 1
    assert torch.equal(majority[0], by_hand)
    assert torch.equal(majority[1], union[1])  # one reader: its own box
    with pytest.raises(ValueError, match="fusion"):
        box_targets(boxes, labels, (8, 8), fusion="vote")


def test_box_masks_move_with_the_augmented_image():
    torch.manual_seed(0)
    boxes = torch.tensor([[[20.0, 12.0, 44.0, 30.0]]]).repeat(4, 1, 1)
    labels = torch.zeros(4, 1, dtype=torch.long)
    image = torch.zeros(4, 1, 64, 64)
    image[:, :, 12:30, 20:44] = 1.0
    augment = BatchAugment(degrees=25, translate=0.15, scale=(0.8, 1.2), brightness=0, contrast=0).train()
    moved = augment(image)
    pairs, masks = box_targets(boxes, labels, (64, 64), augment)
    assert not torch.allclose(moved, image)
    torch.testing.assert_close(masks, moved[pairs[:, 0], 0], atol=1e-5, rtol=0)


def test_gradcam_maps_match_pytorch_grad_cam():
    """The differentiable map is the library's Grad-CAM (which explain scores) before its scaling."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxr_lightning.explain.cams import ImageOnly

    torch.manual_seed(0)
    model = tiny_model().eval()
    image = torch.randn(2, 1, 128, 128)
    meta = torch.zeros(2, len(model.meta_names))
    pairs = torch.tensor([[0, 1], [1, 0], [1, 1]])
    with capture_output(model.cam_layer) as outputs:
        logits = model(image, meta)
    mine = gradcam_maps(outputs[-1], logits, pairs).detach().numpy()
    assert mine.shape == (3, 4, 4) and (mine.max(axis=(1, 2)) > 1.1 * mine.min(axis=(1, 2))).all()
    wrapped = ImageOnly(model)
    with GradCAM(model=wrapped, target_layers=[model.cam_layer]) as cam:
        for p, (i, c) in enumerate(pairs.tolist()):
            wrapped.meta = meta[i : i + 1]
            theirs = cam(image[i : i + 1], targets=[ClassifierOutputTarget(c)])
            # The library scales each layer's map to [0, 1] at the input size, then the layers' mean again.
            np.testing.assert_allclose(scale_cam_image(scale_cam_image(mine[p : p + 1], (128, 128))), theirs, atol=1e-4)


def tiny_model(name: str = "test_resnet", cam_layer: str = "layer4", head: str = "baseline", box_weight: float = 1.0):
    return CXRClassifier(
        backbone={"name": name, "cam_layer": cam_layer},
        head={"name": head, "dropout": 0.0},
        loss={"name": "bce", "box_weight": box_weight},
        optimizer={},
        label_names=LABELS,
        meta_names=["age", "sex"],
        image_size=64,
        pos_frac=[0.3, 0.3, 0.4],
    )


def box_batch(n: int = 8, size: int = 128):
    """Images with one boxed finding (label 0) in the top-left quadrant of every image."""
    boxes = torch.tensor([[[0.0, 0.0, size / 2, size / 2]]]).repeat(n, 1, 1)
    return boxes, torch.zeros(n, 1, dtype=torch.long)


def inside_share_and_mass(model, image, meta, pairs, masks) -> tuple[float, float]:
    """Grad-CAM's (what explain scores) share of mass inside the box, and its total mass."""
    with capture_output(model.cam_layer) as outputs:
        logits = model(image, meta)
    cams = gradcam_maps(outputs[-1], logits, pairs).detach()
    cover = torch.nn.functional.adaptive_avg_pool2d(masks[:, None], cams.shape[-2:])[:, 0]
    return float((cams * cover).sum() / cams.sum()), float(cams.sum())


def test_box_loss_moves_a_tiny_models_cam_into_the_box_without_emptying_it():
    torch.manual_seed(0)
    model = tiny_model().train()
    image = torch.randn(4, 1, 128, 128)
    meta = torch.zeros(4, 2)
    pairs, masks = box_targets(*box_batch(4, 128), (128, 128))  # 4 of the 4 x 4 cells of the map
    share0, mass0 = inside_share_and_mass(model, image, meta, pairs, masks)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step() -> float:
        with capture_output(model.cam_layer) as outputs:
            logits = model(image, meta)
        loss = box_attention_loss(outputs[-1], logits, pairs, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(8)]
    share, mass = inside_share_and_mass(model, image, meta, pairs, masks)
    assert losses[-1] < 0.5 * losses[0]
    assert share0 < 0.5 and share > 0.8  # the mass moved into the box
    assert mass > 0.5 * mass0  # and the map was not switched off


def test_box_loss_trains_the_backbone_of_a_real_timm_architecture():
    torch.manual_seed(0)
    model = tiny_model("mobilenetv2_100", "bn2", head="fusion_residual").train()
    image = torch.randn(2, 1, 96, 96)
    pairs, masks = box_targets(*box_batch(2, 96), (96, 96))
    with capture_output(model.cam_layer) as outputs:
        logits = model(image, torch.zeros(2, 2))
    loss = box_attention_loss(outputs[-1], logits, pairs, masks)
    loss.backward()
    assert loss.item() > 0
    first_conv = next(p for p in model.backbone.parameters())
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["densenet121", "vgg19", "resnet50", "inception_v3", "mobilenetv2_100", "efficientnet_b3"]
)
def test_every_studied_backbone_has_a_trainable_box_loss(name):
    from helpers import CONF_DIR
    from omegaconf import OmegaConf

    from cxr_lightning.models.backbones import cam_layer_of

    cfg = OmegaConf.load(f"{CONF_DIR}/backbone/{name}.yaml")
    model = tiny_model(name, cam_layer_of(cfg), head="fusion").train()
    size = 2 * max(int(cfg.min_input_size), 64)
    pairs, masks = box_targets(*box_batch(1, size), (size, size))
    with capture_output(model.cam_layer) as outputs:
        logits = model(torch.randn(1, 1, size, size), torch.zeros(1, 2))
    loss = box_attention_loss(outputs[-1], logits, pairs, masks)
    loss.backward()
    assert torch.isfinite(loss) and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters()
    )


def test_box_weight_warms_up_linearly_over_the_configured_epochs():
    assert [warmup_factor(step, 10, 2.0) for step in (0, 5, 10, 15, 20, 35)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 10, 0.0) == 1.0  # no warm-up: full weight from the first step
    with pytest.raises(ConfigError, match="box_warmup_epochs"):
        CXRClassifier(
            backbone={"name": "test_resnet", "cam_layer": "layer4"},
            head={"name": "baseline"},
            loss={"name": "bce", "box_weight": 1.0, "box_warmup_epochs": -1},
            optimizer={},
            label_names=LABELS,
            meta_names=[],
            image_size=64,
        )
    with pytest.raises(ConfigError, match="box_fusion"):
        CXRClassifier(
            backbone={"name": "test_resnet", "cam_layer": "layer4"},
            head={"name": "baseline"},
            loss={"name": "bce", "box_weight": 1.0, "box_fusion": "vote"},
            optimizer={},
            label_names=LABELS,
            meta_names=[],
            image_size=64,
        )


def test_box_weight_needs_an_image_head():
    with pytest.raises(ConfigError, match="box_weight"):
        tiny_model(head="metadata_only")
    with pytest.raises(ConfigError, match="box_weight"):
        tiny_model(box_weight=-1)


def test_only_training_patients_boxes_are_used(tiny_demo):
    dm = CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0, train_boxes=True)
    bbox = nih.read_bbox_table(tiny_demo / nih.BBOX_TABLE)
    split_of = {name: s for s in ("train", "val", "test") for name in dm.split_table(s)["Image Index"]}
    held_out = bbox[bbox["Image Index"].map(split_of).isin(["val", "test"])]
    in_train = bbox[bbox["Image Index"].map(split_of) == "train"]
    assert len(held_out) > 0 and len(in_train) > 0  # the fixture can tell the two apart

    train = dm.dataset("train")
    assert train.boxes.count == len(in_train)
    names = np.asarray(train.names)
    boxed = names[(train.boxes.labels >= 0).any(axis=1)]
    assert set(boxed) == set(in_train["Image Index"])
    assert not set(boxed) & set(held_out["Image Index"])
    # Every box comes back scaled from the 1024-px originals, on the image and finding it belongs to.
    got = sorted(
        (names[i], dm.label_names[int(train.boxes.labels[i, k])], *np.round(train.boxes.boxes[i, k], 3).tolist())
        for i, k in zip(*np.nonzero(train.boxes.labels >= 0))
    )
    scale = 64 / nih.ORIGINAL_SIZE
    want = sorted(
        (r.image, r.finding, *np.round(np.array([r.x, r.y, r.x + r.w, r.y + r.h]) * scale, 3).tolist())
        for r in in_train.rename(columns={"Image Index": "image", "Finding Label": "finding"}).itertuples(index=False)
    )
    assert [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2:] for g in got], [w[2:] for w in want], atol=1e-3)
    for split in ("val", "test"):
        assert "boxes" not in dm.dataset(split)[0] and "box_labels" not in dm.dataset(split)[0]
    assert "boxes" not in CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0).dataset("train")[0]


@pytest.mark.slow
def test_box_guided_fit_records_boxes_sampler_and_weights(tiny_demo, tmp_path):
    from cxr_lightning.tasks.train import train

    overrides = tiny_overrides(tiny_demo, tmp_path) + [
        "loss.box_weight=1.0",
        "data.sampler=undersample_no_finding",
        "data.no_finding_keep=0.5",
        "test_after_fit=false",
    ]
    metrics = train(compose_config(overrides))
    written = json.loads((tmp_path / "metrics.json").read_text())
    dm = CXRDataModule(
        source="nih",
        root=tiny_demo,
        image_size=64,
        num_workers=0,
        sampler="undersample_no_finding",
        no_finding_keep=0.5,
        sampler_seed=42,
    )
    assert written["boxes_trained_on"] == dm.training_boxes().count > 0
    assert written["sampler"] == {"name": "undersample_no_finding", "seed": 42, "no_finding_keep": 0.5}
    hparams = checkpoint_hparams(metrics["best_checkpoint"])
    assert hparams["sampler"] == written["sampler"]
    np.testing.assert_allclose(hparams["pos_frac"], dm.label_stats["pos_frac"].to_numpy())
    np.testing.assert_allclose(written["pos_frac"], hparams["pos_frac"])
    assert hparams["loss"]["box_weight"] == 1.0
