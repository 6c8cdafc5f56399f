"""Backbone weights in the layouts they are published in: torchxrayvision, MAE, timm / HF folders."""
from __future__ import annotations

import json
import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cxr_lightning.errors import CheckpointError
from cxr_lightning.models.backbones import create_backbone

TINY = "test_resnet"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def save_safetensors(state_dict, path):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def xrv_densenet():
    """A torchxrayvision DenseNet-121 with random weights and its op_threshs, as its own class builds it."""
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None, op_threshs=torch.rand(18)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a skipped buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_torchxrayvision_densenet_loads_and_computes_its_features(xrv_densenet, tmp_path):
    source = xrv_densenet.state_dict()
    assert "op_threshs" in source and source["classifier.weight"].shape == (18, 1024)
    path = save_safetensors(source, tmp_path / "densenet121-res224-all.safetensors")
    backbone = create_backbone("densenet121", weights=path, weights_source="torchxrayvision").eval()
    report = backbone.weights_report
    assert set(report.dropped) == {"classifier.weight", "classifier.bias", "op_threshs"}
    assert not report.unexpected and not report.fresh
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=0, msg=key)
    # Its own forward up to the classifier: features -> ReLU -> global average pool.
    x = torch.randn(2, 1, 64, 64) * 1024
    with torch.no_grad():
        expected = F.adaptive_avg_pool2d(F.relu(xrv_densenet.features(x)), 1).flatten(1)
        torch.testing.assert_close(backbone(x), expected, rtol=1e-4, atol=1e-4)


def test_key_mismatch_is_refused_with_the_keys_named(xrv_densenet, tmp_path, caplog):
    source = dict(xrv_densenet.state_dict())
    lacking = {k: v for k, v in source.items() if k != "features.norm5.weight"}
    path = save_safetensors(lacking, tmp_path / "lacking.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 of the tensors of densenet121: features\.norm5\.weight"):
        create_backbone("densenet121", weights=path, weights_source="torchxrayvision")

    extra = {**source, "features.denseblock5.conv.weight": torch.zeros(3)}
    path = save_safetensors(extra, tmp_path / "extra.safetensors")
    with pytest.raises(
        CheckpointError, match=r"1 tensors densenet121 has no place for: features\.denseblock5\.conv\.weight"
    ):
        create_backbone("densenet121", weights=path, weights_source="torchxrayvision")
    with caplog.at_level(logging.WARNING):
        backbone = create_backbone("densenet121", weights=path, weights_source="torchxrayvision", weights_strict=False)
    assert backbone.weights_report.unexpected == ["features.denseblock5.conv.weight"]
    assert "features.denseblock5.conv.weight" in caplog.text

    # The layout named wrong: a timm reading keeps the classifier and op_threshs, and says so.
    path = save_safetensors(source, tmp_path / "as-timm.safetensors")
    with pytest.raises(CheckpointError, match=r"op_threshs.*weights_source"):
        create_backbone("densenet121", weights=path, weights_source="timm")


def test_torchxrayvision_source_refuses_another_layout(tmp_path):
    path = save_safetensors(timm.create_model(TINY, in_chans=1).state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError, match="torchxrayvision's DenseNet layout"):
        create_backbone(TINY, weights=path, weights_source="torchxrayvision")


def test_pickled_whole_model_is_refused(tmp_path):
    # torchxrayvision and CheXNet publish whole pickled models; unpickling would run code.
    path = tmp_path / "whole-model.pth"
    torch.save(timm.create_model(TINY, in_chans=1), path)
    with pytest.raises(CheckpointError, match=r"cannot read .*pickled whole models are refused"):
        create_backbone(TINY, weights=path)


def mae_checkpoint(grid: int, width: int = 384, depth: int = 12) -> dict:
    """An MAE pretraining checkpoint: encoder of a ViT-S/16 at ``grid x grid`` patches, RGB patch
    embedding, decoder and mask token, wrapped as MAE's main_pretrain.py saves it."""
    torch.manual_seed(5)
    encoder = timm.create_model("vit_small_patch16_224", img_size=16 * grid, num_classes=0, in_chans=3)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("fc_norm", "head"))}
    state["pos_embed"] = torch.randn_like(state["pos_embed"])  # MAE's are fixed sin-cos; any values do
    decoder = {
        "mask_token": torch.zeros(1, 1, 512),
        "decoder_embed.weight": torch.randn(512, width),
        "decoder_embed.bias": torch.zeros(512),
        "decoder_pos_embed": torch.zeros(1, 1 + grid * grid, 512),
        "decoder_blocks.0.norm1.weight": torch.ones(512),
        "decoder_norm.weight": torch.ones(512),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, 512),
    }
    return {"model": {**state, **decoder}, "epoch": 799, "args": {"model": "mae_vit_small_patch16"}}


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_mae_encoder_loads_with_position_embeddings_resized(tmp_path, pool):
    checkpoint = mae_checkpoint(grid=8)
    path = tmp_path / "mae_pretrain_vit_small.pth"
    torch.save(checkpoint, path)  # plain tensors, dicts, ints and str: weights_only=True reads it
    backbone = create_backbone("vit_small_patch16_224", weights=path, img_size=64, global_pool=pool)
    report, model, source = backbone.weights_report, backbone.model, checkpoint["model"]
    assert report.source == "mae"  # auto: the decoder gives it away
    assert {k for k in source if k.startswith(("decoder_", "mask_token"))} <= set(report.dropped)
    assert "pos_embed" in report.resized
    # 8x8 grid -> 4x4: the class token's embedding kept, the patch grid resampled bicubically.
    pos = source["pos_embed"]
    torch.testing.assert_close(model.pos_embed[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 16, -1))
    # RGB patch embedding folded to one channel; the blocks as they were.
    torch.testing.assert_close(model.patch_embed.proj.weight, source["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, source["blocks.11.mlp.fc2.weight"], rtol=0, atol=0)
    if pool == "avg":  # MAE fine-tuning: the encoder norm is replaced by a new fc_norm after the pool
        assert set(report.fresh) == {"fc_norm.weight", "fc_norm.bias"} and "norm.weight" in report.dropped
    else:
        assert not report.fresh
        torch.testing.assert_close(model.norm.weight, source["norm.weight"], rtol=0, atol=0)
    with torch.no_grad():
        assert backbone(torch.randn(1, 1, 64, 64)).shape == (1, 384)


def test_mae_encoder_missing_a_block_is_refused(tmp_path):
    checkpoint = mae_checkpoint(grid=4)
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.startswith("blocks.11.")}
    path = tmp_path / "mae.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"lacks \d+ of the tensors of vit_small_patch16_224: blocks\.11\."):
        create_backbone("vit_small_patch16_224", weights=path, img_size=64)


def write_timm_folder(folder, architecture: str, state_dict, weights_name: str = "model.safetensors"):
    folder.mkdir(parents=True)
    # As timm's save_for_hf writes it: the architecture, its head size and its pretrained_cfg.
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 1000,
                                                    "pretrained_cfg": {"input_size": [3, 160, 160]}}))
    if weights_name.endswith(".safetensors"):
        save_safetensors(state_dict, folder / weights_name)
    else:
        torch.save(state_dict, folder / weights_name)
    return folder


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_timm_folder_and_hub_cache_load(tmp_path, weights_name):
    torch.manual_seed(7)
    source = timm.create_model(TINY, in_chans=3).state_dict()
    folder = write_timm_folder(tmp_path / "test_resnet", f"{TINY}.r160_in1k", source, weights_name)
    cache = write_timm_folder(tmp_path / "hub" / f"models--timm--{TINY}.r160_in1k" / "snapshots" / "0a1b2c",
                              TINY, source, weights_name)
    for where in (folder, cache.parents[1]):
        backbone = create_backbone(TINY, weights=where)
        assert backbone.weights_report.path.endswith(weights_name)
        assert sorted(backbone.weights_report.dropped) == ["fc.bias", "fc.weight"]
        torch.testing.assert_close(backbone.model.conv1[0].weight, source["conv1.0.weight"].sum(1, keepdim=True))
        torch.testing.assert_close(
            backbone.model.layer4[0].conv1.weight, source["layer4.0.conv1.weight"], rtol=0, atol=0
        )


def test_folders_of_another_model_or_layout_are_refused(tmp_path):
    source = timm.create_model(TINY, in_chans=1).state_dict()
    other = write_timm_folder(tmp_path / "other", "resnet18.a1_in1k", source)
    with pytest.raises(CheckpointError, match=r"holds 'resnet18\.a1_in1k'.*set backbone\.name=resnet18"):
        create_backbone(TINY, weights=other)
    transformers = tmp_path / "hf-vit"
    transformers.mkdir()
    (transformers / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(CheckpointError, match=r"transformers folder \(model_type='vit'\)"):
        create_backbone(TINY, weights=transformers)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{empty} has no config.json")):
        create_backbone(TINY, weights=empty)


@pytest.mark.slow
def test_backbone_preprocessing_travels_through_the_checkpoint_to_predict_and_export(tiny_demo, tmp_path):
    import numpy as np
    from helpers import compose_config, tiny_overrides
    from PIL import Image

    from cxr_lightning.checkpoints import load_model
    from cxr_lightning.models.preprocess import Preprocess
    from cxr_lightning.tasks.export import export_metadata
    from cxr_lightning.tasks.predict import predict
    from cxr_lightning.tasks.train import train

    # torchxrayvision's scaling declared the way conf/backbone/densenet121_xrv.yaml declares it.
    xrv_scaling = ["+backbone.input_range=[-1024.0,1024.0]", "+backbone.mean=0.0", "+backbone.std=1.0"]
    overrides = tiny_overrides(tiny_demo, tmp_path / "run") + ["head=baseline", "test_after_fit=false", *xrv_scaling]
    ckpt = train(compose_config(overrides))["best_checkpoint"]
    model = load_model(ckpt).eval()
    assert model.preprocess.input_range == (-1024.0, 1024.0)
    assert (model.preprocess.mean, model.preprocess.std) == (0.0, 1.0)

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels).save(tmp_path / "in" / "a.png")
    cfg = compose_config([f"ckpt_path={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'p.csv'}"], "predict")
    got = predict(cfg).predictions[list(model.label_names)].to_numpy()[0]
    # By hand: [0, 255] -> [-1024, 1024], no further normalisation; head=baseline ignores metadata.
    image = torch.from_numpy(pixels).float()[None, None] / 255 * 2048 - 1024
    meta = torch.zeros(1, len(model.meta_names))
    with torch.no_grad():
        expected = torch.sigmoid(model(image, meta))[0].numpy()
        model.preprocess = Preprocess()  # the default scaling gives other probabilities: the check can fail
        default = torch.sigmoid(model(model.preprocess(torch.from_numpy(pixels)[None, None]), meta))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(default - expected).max() > 1e-4

    described = json.loads(export_metadata(load_model(ckpt), ckpt)["preprocessing"])
    assert described["input_range"] == [-1024.0, 1024.0] and described["mean"] == 0.0 and described["std"] == 1.0
