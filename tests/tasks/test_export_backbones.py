"""Every seed backbone, and every head, exports to ONNX and TorchScript and passes the parity check
on demo X-rays. The checkpoints are built, not trained: random weights with BatchNorm statistics
measured on demo images (as training leaves them), so activations have realistic scales."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_config, tiny_overrides

from cxr_lightning.models.backbones import BACKBONE_NAMES
from cxr_lightning.tasks.build import build_model
from cxr_lightning.tasks.export import export, parity_inputs, read_onnx_metadata, read_torchscript_metadata

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow
SIZE = {"inception_v3": 75}  # its minimum input size; 64 px for the others


def built_checkpoint(root: Path, out: Path, backbone: str, head: str) -> Path:
    """A checkpoint file as load_model reads it, of an untrained model with measured BN statistics."""
    size = SIZE.get(backbone, 64)
    cfg = compose_config(
        tiny_overrides(root, out) + [f"backbone={backbone}", f"head={head}", f"data.image_size={size}"]
    )
    model = build_model(cfg)
    model.hparams.pos_frac, model.hparams.age_fill = [0.1] * len(model.label_names), 50.0
    model._build_criterion(model.hparams.pos_frac)
    rows, _ = parity_inputs(model, "demo", 8, seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in rows[0].split(4):
            model.backbone(chunk) if model.backbone is not None else None
    path = out / f"{backbone}-{head}.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def check_both_formats(ckpt: Path, out: Path) -> None:
    for fmt, read in (("onnx", read_onnx_metadata), ("torchscript", read_torchscript_metadata)):
        output = out / f"{ckpt.stem}.{fmt}"
        result = export(
            compose_config([f"ckpt_path={ckpt}", f"format={fmt}", f"output={output}"], config_name="export")
        )
        parity = json.loads(read(output)["parity"])
        assert parity["passed"] and parity["n"] == 8 and "demo" in parity["inputs"], (fmt, parity)
        assert parity["max_abs_logit_diff"] == result.max_abs_diff
        assert parity["max_abs_logit_diff"] <= parity["atol"] + parity["rtol"] * parity["max_abs_logit"]


@pytest.mark.parametrize("backbone", sorted(set(BACKBONE_NAMES) - {"tiny"}))
def test_every_seed_backbone_exports_and_passes_parity(tiny_demo, tmp_path, backbone):
    check_both_formats(built_checkpoint(tiny_demo, tmp_path, backbone, "fusion_residual"), tmp_path)


@pytest.mark.parametrize("head", ["baseline", "fusion", "fusion_residual", "metadata_only"])
def test_every_head_exports_and_passes_parity(tiny_demo, tmp_path, head):
    check_both_formats(built_checkpoint(tiny_demo, tmp_path, "tiny", head), tmp_path)
