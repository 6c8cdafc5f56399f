"""Heads: shapes, the seed's layer stack, the fusion gate, and which inputs reach the logits."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr_lightning.errors import ConfigError
from cxr_lightning.models import HEADS, create_backbone, create_head

IN_FEATURES, META_DIM, NUM_LABELS, BATCH = 24, 5, 15, 4


def _head(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_head(name, in_features=IN_FEATURES, meta_dim=META_DIM, num_labels=NUM_LABELS, **kwargs).eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, IN_FEATURES, generator=g), torch.randn(BATCH, META_DIM, generator=g)


def test_registry_holds_the_four_heads():
    assert set(HEADS) == {"baseline", "metadata_only", "fusion", "fusion_residual"}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_logits_shape_and_finite(name):
    features, meta = _inputs()
    logits = _head(name)(features, meta)
    assert logits.shape == (BATCH, NUM_LABELS)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name, uses_image, uses_meta",
    [
        ("baseline", True, False),
        ("metadata_only", False, True),
        ("fusion", True, True),
        ("fusion_residual", True, True),
    ],
)
def test_declared_inputs_are_the_inputs_that_matter(name, uses_image, uses_meta):
    head = _head(name)
    assert (head.uses_image, head.uses_meta) == (uses_image, uses_meta)
    features, meta = _inputs(1)
    other_features, other_meta = _inputs(2)
    with torch.no_grad():
        base = head(features, meta)
        image_changed = not torch.allclose(base, head(other_features, meta))
        meta_changed = not torch.allclose(base, head(features, other_meta))
    assert (image_changed, meta_changed) == (uses_image, uses_meta)


def _linear_shapes(head: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]


def test_seed_layer_stacks():
    assert _linear_shapes(_head("baseline")) == [(IN_FEATURES, 256), (256, 256), (256, NUM_LABELS)]
    assert _linear_shapes(_head("metadata_only")) == [(META_DIM, 256), (256, 256), (256, NUM_LABELS)]
    fusion_stack = [(IN_FEATURES, 256), (META_DIM, 256), (512, 256), (256, 256), (256, NUM_LABELS)]
    assert _linear_shapes(_head("fusion")) == fusion_stack
    assert _linear_shapes(_head("fusion_residual")) == fusion_stack
    assert _linear_shapes(_head("baseline", hidden=32)) == [(IN_FEATURES, 32), (32, 32), (32, NUM_LABELS)]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_one_dropout_of_half_as_in_the_seed(name):
    assert [m.p for m in _head(name).modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert [m.p for m in _head(name, dropout=0.2).modules() if isinstance(m, nn.Dropout)] == [0.2]


def test_dropout_is_active_in_training_only():
    head = _head("baseline")
    features, meta = _inputs()
    head.train()
    torch.manual_seed(3)
    first = head(features, meta)
    second = head(features, meta)
    assert not torch.allclose(first, second)
    head.eval()
    torch.testing.assert_close(head(features, meta), head(features, meta))


@pytest.mark.parametrize("name", ["fusion", "fusion_residual"])
def test_gate_is_per_unit_in_open_unit_interval(name):
    head = _head(name)
    head(*_inputs())
    gate = head.last_gate
    assert gate.shape == (BATCH, 256) and not gate.requires_grad
    assert (gate > 0).all() and (gate < 1).all()
    assert gate.std() > 0  # learned per unit and sample, not a constant


def test_forced_metadata_gate_cuts_the_image_off_only_without_residual():
    features, meta = _inputs(1)
    other_features, _ = _inputs(2)
    plain, residual = _head("fusion"), _head("fusion_residual")
    for head in (plain, residual):
        head.force_gate = 0.0
    with torch.no_grad():
        torch.testing.assert_close(plain(features, meta), plain(other_features, meta))
        assert not torch.allclose(residual(features, meta), residual(other_features, meta))
    assert (plain.last_gate == 0).all()
    plain.force_gate = None
    with torch.no_grad():
        assert not torch.allclose(plain(features, meta), plain(other_features, meta))


def test_metadata_heads_need_metadata():
    for name in ("metadata_only", "fusion", "fusion_residual"):
        with pytest.raises(ConfigError, match=rf"head '{name}' needs patient metadata.*meta_dim=0"):
            create_head(name, in_features=IN_FEATURES, meta_dim=0, num_labels=NUM_LABELS)
    baseline = create_head("baseline", in_features=IN_FEATURES, meta_dim=0, num_labels=NUM_LABELS)
    assert baseline(torch.randn(2, IN_FEATURES), torch.zeros(2, 0)).shape == (2, NUM_LABELS)


def test_bad_head_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'fusoin' is unknown.*'fusion'"):
        create_head("fusoin", in_features=8, meta_dim=2, num_labels=3)
    with pytest.raises(ConfigError, match=r"dropout=1.5"):
        create_head("baseline", in_features=8, meta_dim=2, num_labels=3, dropout=1.5)


# --- gradient into the backbone (what Grad-CAM needs) -------------------------------------------------

CAM_LAYER = "layer4"  # conf/backbone/tiny.yaml


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return create_backbone("test_resnet").eval()


def _cam_layer_gradient(backbone: nn.Module, head: nn.Module) -> torch.Tensor | None:
    captured = []

    def keep_output(_module, _inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = backbone.get_layer(CAM_LAYER).register_forward_hook(keep_output)
    try:
        image = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
        meta = torch.randn(2, META_DIM, generator=torch.Generator().manual_seed(5))
        head(backbone(image), meta).sum().backward()
    finally:
        handle.remove()
        backbone.zero_grad(set_to_none=True)
    return captured[0].grad


def _head_for(backbone: nn.Module, name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_head(name, in_features=backbone.num_features, meta_dim=META_DIM, num_labels=NUM_LABELS).eval()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_gradient_reaches_the_cam_layer_for_image_heads(tiny_backbone, name):
    head = _head_for(tiny_backbone, name)
    grad = _cam_layer_gradient(tiny_backbone, head)
    if head.uses_image:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None  # metadata_only: the image is not part of the computation at all


def test_residual_keeps_gradient_when_the_gate_passes_only_metadata(tiny_backbone):
    """The seed's bug: a gate closed on the image leaves Grad-CAM nothing; the residual fixes it."""
    plain, residual = _head_for(tiny_backbone, "fusion"), _head_for(tiny_backbone, "fusion_residual")
    plain.force_gate = residual.force_gate = 0.0
    plain_grad = _cam_layer_gradient(tiny_backbone, plain)
    assert plain_grad is None or plain_grad.abs().sum() == 0
    residual_grad = _cam_layer_gradient(tiny_backbone, residual)
    assert residual_grad is not None and residual_grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# A new head: one registered class and one yaml
@pytest.fixture
def linear_head():
    from cxr_lightning.models.heads import register_head

    @register_head
    class LinearFusionHead(nn.Module):
        name = "linear_fusion"
        uses_image = True
        uses_meta = True

        def __init__(self, in_features: int, meta_dim: int, num_labels: int, scale: float = 1.0):
            super().__init__()
            self.linear = nn.Linear(in_features + meta_dim, num_labels)
            self.scale = scale

        def forward(self, features: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
            return self.scale * self.linear(torch.cat([features, meta], dim=1))

    yield LinearFusionHead
    HEADS.pop(LinearFusionHead.name)


def test_a_registered_head_is_built_by_name_with_its_yaml_options(linear_head):
    from cxr_lightning.models.heads import register_head

    head = create_head("linear_fusion", in_features=IN_FEATURES, meta_dim=META_DIM, num_labels=NUM_LABELS, scale=2.0)
    assert isinstance(head, linear_head) and head.scale == 2.0
    features, meta = _inputs()
    expected = 2.0 * (torch.cat([features, meta], 1) @ head.linear.weight.T + head.linear.bias)
    torch.testing.assert_close(head(features, meta), expected)
    with pytest.raises(ConfigError, match=r"takes no option \['hidden'\]; its options: \['scale'\]"):
        create_head("linear_fusion", in_features=IN_FEATURES, meta_dim=META_DIM, num_labels=NUM_LABELS, hidden=8)

    class Again(nn.Module):
        name, uses_image, uses_meta = "linear_fusion", True, True

    with pytest.raises(TypeError, match="registered twice"):
        register_head(Again)
    with pytest.raises(TypeError, match="its own class attribute `name`"):
        register_head(type("Nameless", (nn.Module,), {"uses_image": True, "uses_meta": True}))


@pytest.mark.slow
def test_a_head_added_in_one_class_and_one_yaml_trains(linear_head, tiny_demo, tmp_path):
    from helpers import compose_config, tiny_overrides

    from cxr_lightning.checkpoints import load_model
    from cxr_lightning.tasks.train import train

    configs = tmp_path / "configs"
    (configs / "head").mkdir(parents=True)
    (configs / "head" / "linear_fusion.yaml").write_text("name: linear_fusion\nscale: 0.5\n")
    cfg = compose_config(tiny_overrides(tiny_demo, tmp_path / "run") + [
        f"hydra.searchpath=[file://{configs}]", "head=linear_fusion", "test_after_fit=false",
    ])
    metrics = train(cfg)
    assert metrics["head"] == "linear_fusion"
    model = load_model(metrics["best_checkpoint"])
    assert isinstance(model.head, linear_head) and model.head.scale == 0.5
