"""Box-guided training: the attention term, its differentiable Grad-CAM, the masks that follow the
augmentation, and the training split as the only source of boxes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config, tiny_overrides

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
)
from cxr_lightning.models.module import CXRClassifier

LABELS = ["Atelectasis", "Mass", "No Finding"]


def quadrant_mask(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[0, : size // 2, : size // 2] = 1
    return mask


def test_attention_loss_is_zero_inside_and_grows_outside():
    mask = quadrant_mask()
    cam = torch.zeros(1, 4, 4)
    cam[0, :2, :2] = torch.tensor([[3.0, 1.0], [0.5, 2.0]])
    assert attention_loss(cam, mask).item() == 0.0
    previous = 0.0
    for outside in (0.1, 1.0, 5.0, 50.0):
        spread = cam.clone()
        spread[0, 3, 3] = outside
        loss = attention_loss(spread, mask).item()
        assert loss == pytest.approx(outside / (6.5 + outside))  # the share of mass outside the box
        assert loss > previous
        previous = loss
    assert attention_loss(torch.ones(1, 4, 4), mask).item() == pytest.approx(0.75)


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


def test_box_loss_pushes_a_tiny_models_cam_into_the_box():
    torch.manual_seed(0)
    model = tiny_model().train()
    image = torch.randn(4, 1, 64, 64)
    meta = torch.zeros(4, 2)
    pairs, masks = box_targets(*box_batch(4, 64), (64, 64))  # one of the 2 x 2 cells of the map
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step() -> float:
        with capture_output(model.cam_layer) as outputs:
            logits = model(image, meta)
        loss = box_attention_loss(outputs[-1], logits, pairs, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(10)]
    assert losses[0] > 0.5  # an untrained map spreads over the image: most of it outside the box
    assert losses[-1] < 0.25 * losses[0]


def test_box_loss_trains_the_backbone_of_a_real_timm_architecture():
    torch.manual_seed(0)
    model = tiny_model("mobilenetv2_100", "bn2", head="fusion_residual").train()
    image = torch.randn(2, 1, 96, 96)
    pairs, masks = box_targets(*box_batch(2, 96), (96, 96))
    with capture_output(model.cam_layer) as outputs:
        logits = model(image, torch.zeros(2, 2))
    loss = box_attention_loss(outputs[-1], logits, pairs, masks)
    loss.backward()
    assert 0 < loss.item() < 1
    first_conv = next(p for p in model.backbone.parameters())
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "vgg19", "resnet50", "inception_v3", "mobilenetv2_100", "efficientnet_b3"])
def test_every_studied_backbone_has_a_trainable_box_loss(name):
    from omegaconf import OmegaConf

    from conftest import CONF_DIR

    from cxr_lightning.models.backbones import cam_layer_of

    cfg = OmegaConf.load(f"{CONF_DIR}/backbone/{name}.yaml")
    model = tiny_model(name, cam_layer_of(cfg), head="fusion").train()
    size = 2 * max(int(cfg.min_input_size), 64)
    pairs, masks = box_targets(*box_batch(1, size), (size, size))
    with capture_output(model.cam_layer) as outputs:
        logits = model(torch.randn(1, 1, size, size), torch.zeros(1, 2))
    loss = box_attention_loss(outputs[-1], logits, pairs, masks)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


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
        "loss.box_weight=1.0", "data.sampler=undersample_no_finding", "data.no_finding_keep=0.5", "test_after_fit=false",
    ]
    metrics = train(compose_config(overrides))
    written = json.loads((tmp_path / "metrics.json").read_text())
    dm = CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0,
                       sampler="undersample_no_finding", no_finding_keep=0.5, sampler_seed=42)
    assert written["boxes_trained_on"] == dm.training_boxes().count > 0
    assert written["sampler"] == {"name": "undersample_no_finding", "seed": 42, "no_finding_keep": 0.5}
    hparams = checkpoint_hparams(metrics["best_checkpoint"])
    assert hparams["sampler"] == written["sampler"]
    np.testing.assert_allclose(hparams["pos_frac"], dm.label_stats["pos_frac"].to_numpy())
    np.testing.assert_allclose(written["pos_frac"], hparams["pos_frac"])
    assert hparams["loss"]["box_weight"] == 1.0
