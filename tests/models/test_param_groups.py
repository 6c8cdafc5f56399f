"""Parameter groups: layer-wise learning-rate decay, no decay on norms and biases, the warm-up schedule."""
from __future__ import annotations

import logging
import math

import pytest
import timm
import torch
from torch import nn

from cxr_lightning.errors import ConfigError
from cxr_lightning.models.param_groups import param_groups
from cxr_lightning.models.schedules import warmup_cosine

LR, DECAY, WD = 1e-3, 0.75, 0.05


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_small_patch16_224", img_size=32, num_classes=0, in_chans=1)


def lr_of(groups, model, head=None):
    """Each named parameter's (lr, weight_decay) as the optimiser will see it."""
    names = {id(p): f"backbone:{n}" for n, p in model.named_parameters()}
    if head is not None:
        names.update({id(p): f"head:{n}" for n, p in head.named_parameters()})
    found = {}
    for g in groups:
        for p in g["params"]:
            found[names[id(p)]] = (g["lr"], g["weight_decay"])
    return found


def test_layer_decay_gives_the_documented_rate_per_block(vit):
    head = nn.Linear(384, 3)
    groups = param_groups(vit, head, {"lr": LR, "weight_decay": WD, "layer_decay": DECAY})
    got = lr_of(groups, vit, head)
    assert len(got) == len(list(vit.parameters())) + 2  # every parameter in exactly one group
    depth = len(vit.blocks)  # 12
    # timm's grouping (notes/backbones.md): embedding = layer 0, block i = layer i + 1, the final
    # norm with the last block; layer k trains at LR * DECAY ** (depth - k), so the last block and
    # the head at LR.
    for i in range(depth):
        lr, wd = got[f"backbone:blocks.{i}.attn.qkv.weight"]
        assert lr == pytest.approx(LR * DECAY ** (depth - 1 - i)) and wd == WD
        lr, wd = got[f"backbone:blocks.{i}.norm1.weight"]
        assert lr == pytest.approx(LR * DECAY ** (depth - 1 - i)) and wd == 0.0
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert got[f"backbone:{name}"][0] == pytest.approx(LR * DECAY ** depth), name
    # No decay on position embedding and class token (timm's no_weight_decay) and biases.
    assert got["backbone:pos_embed"][1] == 0.0 and got["backbone:cls_token"][1] == 0.0
    assert got["backbone:patch_embed.proj.weight"][1] == WD and got["backbone:patch_embed.proj.bias"][1] == 0.0
    assert got["backbone:norm.weight"] == (pytest.approx(LR), 0.0)
    assert got["head:weight"] == (pytest.approx(LR), WD) and got["head:bias"] == (pytest.approx(LR), 0.0)
    for g in groups:
        assert g["name"].startswith(("backbone.", "head.")) and g["lr"] == pytest.approx(LR * g["lr_scale"])


def test_optimizer_and_schedule_keep_the_per_block_ratios(vit):
    groups = param_groups(vit, nn.Linear(384, 3), {"lr": LR, "weight_decay": WD, "layer_decay": DECAY})
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WD)
    scheduler = warmup_cosine(optimizer, warmup_epochs=2, max_epochs=10, steps_per_epoch=5, warmup_start_factor=0.1)
    first = [g["lr"] for g in optimizer.param_groups]
    assert first == pytest.approx([LR * g["lr_scale"] * 0.1 for g in groups])
    seen, ratios = [], []
    for step in range(50):
        seen.append(optimizer.param_groups[-1]["lr"] / groups[-1]["lr_scale"])
        if step in (5, 30):
            ratios += [g["lr"] / (g["lr_scale"] * seen[-1]) for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    # 10 warm-up steps from 0.1 x up to 1 x, then cosine over the remaining 40 steps.
    assert seen[0] == pytest.approx(LR * 0.1) and seen[10] == pytest.approx(LR)
    assert seen[30] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert ratios == pytest.approx([1.0] * len(ratios), rel=1e-3)


def test_without_layer_decay_the_seed_recipe_is_one_group_per_module(vit):
    head = nn.Linear(384, 3)
    groups = param_groups(vit, head, {"lr": LR, "weight_decay": 1e-4})
    assert [g["name"] for g in groups] == ["backbone.all", "head.all"]
    assert all(g["lr"] == LR and g["weight_decay"] == 1e-4 and g["lr_scale"] == 1.0 for g in groups)
    vit.blocks[0].requires_grad_(False)
    try:  # frozen parameters stay out of the optimiser
        frozen = {id(p) for p in vit.blocks[0].parameters()}
        assert not frozen & {id(p) for g in param_groups(vit, head, {"lr": LR}) for p in g["params"]}
    finally:
        vit.blocks[0].requires_grad_(True)
    with pytest.raises(ConfigError, match="layer_decay=1.5"):
        param_groups(vit, head, {"lr": LR, "layer_decay": 1.5})


def test_drop_path_rate_reaches_timm():
    from cxr_lightning.models.backbones import create_backbone

    backbone = create_backbone("vit_small_patch16_224", img_size=32, drop_path_rate=0.1)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in backbone.model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)  # timm's linear stochastic-depth rule


def test_no_decay_names_the_group_without_weight_decay():
    """The group named no_decay holds the biases and norm weights at weight decay 0, the one named
    decay the weight matrices at the configured decay."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(None, model, {"lr": LR, "weight_decay": WD, "no_decay_norm_bias": True})
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"head.decay", "head.no_decay"}
    shapes = lambda g: sorted(tuple(p.shape) for p in g["params"])  # noqa: E731
    assert by_name["head.decay"]["weight_decay"] == WD
    assert shapes(by_name["head.decay"]) == [(2, 4), (4, 1, 3, 3)]
    assert by_name["head.no_decay"]["weight_decay"] == 0.0
    assert shapes(by_name["head.no_decay"]) == [(2,), (4,), (4,), (4,)]  # linear bias, conv bias, bn weight+bias
    # weight_decay=0: one group, named for what it is (timm drops the empty decay group).
    (only,) = param_groups(None, model, {"lr": LR, "weight_decay": 0.0, "no_decay_norm_bias": True})
    assert only["name"] == "head.no_decay" and len(only["params"]) == len(list(model.parameters()))


def test_layer_decay_on_a_cnn_decays_per_stage_and_logs_the_mapping(caplog):
    resnet = timm.create_model("resnet18", num_classes=0, in_chans=1)
    with caplog.at_level(logging.INFO, logger="cxr_lightning.models.param_groups"):
        groups = param_groups(resnet, head := nn.Linear(512, 3), {"lr": LR, "weight_decay": WD, "layer_decay": DECAY})
    got = lr_of(groups, resnet, head)
    # Five stages: the stem (conv1, bn1) and layer1-4; layer4 trains at the head's rate.
    assert got["backbone:conv1.weight"][0] == pytest.approx(LR * DECAY**4)
    for stage in range(1, 5):
        assert got[f"backbone:layer{stage}.0.conv1.weight"] == (pytest.approx(LR * DECAY ** (4 - stage)), WD)
        assert got[f"backbone:layer{stage}.0.bn1.weight"][1] == 0.0
    assert len({lr for lr, _ in got.values()}) == 5 and got["head:weight"][0] == pytest.approx(LR)
    (message,) = [r.getMessage() for r in caplog.records if "layer_decay" in r.getMessage()]
    assert "5 stages" in message and "bn1+conv1 x0.316" in message and "layer4.0+layer4.1 x1" in message


def test_layer_decay_is_refused_for_a_backbone_without_a_layer_order():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ConfigError, match="defines no layer order.*layer_decay=null"):
        param_groups(plain, nn.Linear(4, 3), {"lr": LR, "weight_decay": WD, "layer_decay": DECAY})
