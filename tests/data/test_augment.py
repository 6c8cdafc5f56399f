"""Batch normalisation and augmentation: shapes, eval identity, seeding, and the size of its effects."""
from __future__ import annotations

import pytest
import torch

from cxr_lightning.data.augment import BatchAugment
from cxr_lightning.models.preprocess import DEFAULT_MEAN, DEFAULT_STD, normalize

torch.set_num_threads(1)

NO_GEOMETRY = {"degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0)}
NO_COLOUR = {"brightness": 0.0, "contrast": 0.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 8, size: int = 32, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = _gen(seed)
    return low + (high - low) * torch.rand(n, 1, size, size, generator=g)


# -- normalize -----------------------------------------------------------------------------------
def test_normalize_uint8_and_unit_float_agree():
    u8 = torch.tensor([[[[0, 51, 128, 255]]]], dtype=torch.uint8)
    expected = (torch.tensor([0, 51, 128, 255], dtype=torch.float64) / 255 - 0.5) / 0.25
    out = normalize(u8, 0.5, 0.25)
    assert out.dtype == torch.float32 and out.shape == u8.shape
    torch.testing.assert_close(out.flatten().double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize(u8.double() / 255, 0.5, 0.25), out)


def test_default_statistics_are_imagenet_channel_averages():
    assert DEFAULT_MEAN == pytest.approx((0.485 + 0.456 + 0.406) / 3, abs=5e-4)
    assert DEFAULT_STD == pytest.approx((0.229 + 0.224 + 0.225) / 3, abs=5e-4)


def test_normalize_rejects_integer_non_uint8():
    with pytest.raises(TypeError, match="uint8 or float"):
        normalize(torch.zeros(1, 1, 2, 2, dtype=torch.int64), 0.5, 0.2)


# -- BatchAugment --------------------------------------------------------------------------------
def test_defaults_match_the_documented_config():
    aug = BatchAugment()
    assert (aug.degrees, aug.translate, aug.scale, aug.brightness, aug.contrast, aug.hflip, aug.p) == (
        5.0, 0.05, (0.95, 1.05), 0.1, 0.1, False, 1.0,
    )


def test_eval_mode_is_identity_and_train_mode_changes_images():
    x = _batch()
    aug = BatchAugment()
    assert aug.eval()(x) is x
    out = aug.train()(x, generator=_gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.allclose(out, x)


def test_same_seed_same_output_other_seed_other_output():
    x, aug = _batch(), BatchAugment().train()
    torch.testing.assert_close(aug(x, generator=_gen(7)), aug(x, generator=_gen(7)), rtol=0, atol=0)
    assert not torch.allclose(aug(x, generator=_gen(7)), aug(x, generator=_gen(8)))
    torch.manual_seed(3)
    first = aug(x)
    torch.manual_seed(3)
    torch.testing.assert_close(aug(x), first, rtol=0, atol=0)  # the global RNG when no generator


def test_null_parameters_give_the_identity():
    x = _batch()
    out = BatchAugment(**NO_GEOMETRY, **NO_COLOUR).train()(x, generator=_gen(0))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_p_zero_is_exact_identity_and_p_half_augments_some_samples():
    x = _batch(n=32)
    torch.testing.assert_close(BatchAugment(p=0.0).train()(x, generator=_gen(0)), x, rtol=0, atol=0)
    out = BatchAugment(p=0.5).train()(x, generator=_gen(0))
    unchanged = (out == x).flatten(1).all(dim=1)
    assert 4 <= int(unchanged.sum()) <= 28


def test_brightness_and_contrast_stay_within_their_bounds():
    b, c = 0.2, 0.3
    # Mid-gray images with texture: no clamping, so the factors show in the statistics exactly.
    x = _batch(n=64, low=0.35, high=0.65)
    out = BatchAugment(**NO_GEOMETRY, brightness=b, contrast=c).train()(x, generator=_gen(5))
    mean_ratio = out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    std_ratio = out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    eps = 1e-5
    assert ((1 - b - eps <= mean_ratio) & (mean_ratio <= 1 + b + eps)).all()
    assert ((std_ratio >= (1 - b) * (1 - c) - eps) & (std_ratio <= (1 + b) * (1 + c) + eps)).all()
    # ... and the factors do spread over most of the range.
    assert mean_ratio.max() > 1 + b / 2 and mean_ratio.min() < 1 - b / 2
    # Contrast alone keeps each image's mean and scales its spread.
    out_c = BatchAugment(**NO_GEOMETRY, brightness=0.0, contrast=c).train()(x, generator=_gen(5))
    torch.testing.assert_close(out_c.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=0, atol=1e-5)
    ratio_c = out_c.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ((ratio_c >= 1 - c - eps) & (ratio_c <= 1 + c + eps)).all() and ratio_c.max() > 1 + c / 2


def test_translation_moves_content_by_at_most_the_configured_fraction():
    size, t = 32, 0.125
    x = torch.zeros(16, 1, size, size)
    x[:, :, 14:18, 14:18] = 1.0  # a centred bright square
    out = BatchAugment(degrees=0.0, translate=t, scale=(1.0, 1.0), **NO_COLOUR).train()(x, generator=_gen(2))
    coords = torch.arange(size, dtype=torch.float32)
    mass = out.sum(dim=(1, 2, 3))
    cx = (out.sum(dim=(1, 2)) * coords).sum(dim=-1).squeeze(-1) / mass
    cy = (out.sum(dim=(1, 3)) * coords).sum(dim=-1).squeeze(-1) / mass
    shift = torch.stack([cx - 15.5, cy - 15.5], dim=1)
    assert (shift.abs() <= t * size + 1e-3).all()
    assert shift.abs().max() > t * size / 2  # it does move
    torch.testing.assert_close(mass, torch.full_like(mass, 16.0), rtol=0, atol=1e-3)  # nothing lost


def test_rotation_and_scale_keep_the_centre_fixed():
    size = 33
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (((yy - 16) ** 2 + (xx - 16) ** 2) <= 36).float()[None, None].repeat(8, 1, 1, 1)
    out = BatchAugment(degrees=30.0, translate=0.0, scale=(0.8, 1.2), **NO_COLOUR).train()(disk, generator=_gen(4))
    mass = out.sum(dim=(1, 2, 3))
    cx = (out * xx).sum(dim=(1, 2, 3)) / mass
    cy = (out * yy).sum(dim=(1, 2, 3)) / mass
    torch.testing.assert_close(cx, torch.full_like(cx, 16.0), rtol=0, atol=0.05)
    torch.testing.assert_close(cy, torch.full_like(cy, 16.0), rtol=0, atol=0.05)
    area_ratio = mass / disk[0].sum()  # area scales with the square of the zoom
    assert ((area_ratio > 0.8**2 - 0.1) & (area_ratio < 1.2**2 + 0.1)).all()
    assert area_ratio.max() - area_ratio.min() > 0.1


def test_hflip_only_mirrors_and_is_off_by_default():
    x = _batch(n=16)
    out = BatchAugment(**NO_GEOMETRY, **NO_COLOUR, hflip=True).train()(x, generator=_gen(3))
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(dim=1)
    mirrored = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(dim=1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    out_default = BatchAugment(**NO_GEOMETRY, **NO_COLOUR).train()(x, generator=_gen(3))
    torch.testing.assert_close(out_default, x, rtol=0, atol=1e-6)


def test_same_transform_for_a_sample_across_dtypes_and_batch_sizes():
    # The parameters are drawn on the CPU, in float64, row by row: sample i gets the same transform
    # in a batch of 4 or 8, in float32 or float64, and on any device.
    x = _batch(n=8, seed=11)
    aug = BatchAugment(degrees=10.0, translate=0.1, brightness=0.2, contrast=0.2).train()
    big = aug(x.double(), generator=_gen(9))
    small = aug(x[:4], generator=_gen(9))
    assert big.dtype == torch.float64 and small.dtype == torch.float32
    torch.testing.assert_close(small.double(), big[:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(small.mean(), big[:4].mean().float(), rtol=0, atol=1e-6)


def test_half_precision_batches_are_supported():
    x = _batch(n=4)
    out = BatchAugment().train()(x.bfloat16(), generator=_gen(0))
    ref = BatchAugment().train()(x, generator=_gen(0))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    x = _batch(n=8)
    aug = BatchAugment().train()
    torch.testing.assert_close(aug(x.cuda(), generator=_gen(0)).cpu(), aug(x, generator=_gen(0)), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{"scale": (1.1, 0.9)}, {"degrees": -1.0}, {"brightness": 1.0}, {"p": 1.5}]
)
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        BatchAugment(**kwargs)


def test_rejects_uint8_batches():
    with pytest.raises(ValueError, match="float"):
        BatchAugment().train()(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
