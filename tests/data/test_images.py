"""Decoding every supported file flavour to the same uint8 pixels, DICOM included, and resizing."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dicom
from PIL import Image

from cxr_lightning.data import images
from cxr_lightning.errors import DataError


@pytest.fixture()
def gray() -> np.ndarray:
    """A radiograph-like 8-bit image: smooth gradients plus texture, covering 0..255."""
    yy, xx = np.mgrid[0:40, 0:48]
    img = 127.5 + 90 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + 37 * np.sin((xx + yy) / 3.0)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img[0, 0], img[-1, -1] = 0, 255
    return img


def _save(img: np.ndarray, path: Path, mode: str) -> Path:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        Image.fromarray(img.astype(np.uint16) * 257).save(path)  # 8-bit values stretched to 16 bits
    elif mode == "RGB":
        Image.fromarray(np.stack([img] * 3, axis=-1)).save(path)
    elif mode == "RGBA":  # NIH ships 519 of these; the alpha must not leak into the gray value
        alpha = rng.integers(0, 256, img.shape, dtype=np.uint8)
        Image.fromarray(np.dstack([img, img, img, alpha])).save(path)
    else:
        Image.fromarray(img).convert(mode).save(path)
    assert Image.open(path).mode == mode, "test setup: PIL wrote another mode than intended"
    return path


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "LA", "P"])
def test_png_flavours_decode_to_the_same_pixels(tmp_path, gray, mode):
    out = images.read_image(_save(gray, tmp_path / f"img_{mode.replace(';', '')}.png", mode))
    assert out.dtype == np.uint8 and out.shape == gray.shape
    np.testing.assert_array_equal(out, gray)


def test_jpeg_decodes_close_to_the_original(tmp_path, gray):
    path = tmp_path / "img.jpg"
    Image.fromarray(gray).save(path, quality=95)
    out = images.read_image(path)
    assert out.dtype == np.uint8 and out.shape == gray.shape
    diff = np.abs(out.astype(int) - gray.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 12


def test_sixteen_bit_values_are_scaled_by_the_bit_depth(tmp_path):
    values = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32768, 40000, 65000, 65534, 65535]], dtype=np.uint16)
    path = tmp_path / "raw16.png"
    Image.fromarray(values).save(path)
    expected = np.array([[round(int(v) * 255 / 65535) for v in row] for row in values], dtype=np.uint8)
    np.testing.assert_array_equal(images.read_image(path), expected)


def test_colour_becomes_luminance(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R 601-2
    assert np.abs(images.read_image(path).astype(float) - luma).max() <= 1.0


# -- DICOM ---------------------------------------------------------------------------------------
@pytest.fixture()
def raw12() -> np.ndarray:
    yy, xx = np.mgrid[0:24, 0:32]
    return ((xx * 128 + yy * 7) % 4096).astype(np.uint16)


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min()) * 255.0


def test_dicom_rescale_and_window(tmp_path, raw12):
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 2000.0
    path = write_dicom(
        tmp_path / "scan.dcm", raw12, "MONOCHROME2",
        RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=center, WindowWidth=width,
    )
    # DICOM PS3.3 C.11.2.1.2 linear window, then stretched to 0..255.
    hu = raw12.astype(float) * slope + intercept
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0
    out = images.read_image(path)
    assert out.dtype == np.uint8 and out.shape == raw12.shape
    assert np.abs(out.astype(float) - expected).max() <= 1.0
    assert (out == 0).any() and (out == 255).any()  # the window clips at both ends


def test_dicom_monochrome1_is_inverted(tmp_path, raw12):
    path = write_dicom(tmp_path / "inverted.dcm", raw12, "MONOCHROME1", RescaleSlope=1.0, RescaleIntercept=0.0)
    expected = 255.0 - _minmax(raw12.astype(float))
    assert np.abs(images.read_image(path).astype(float) - expected).max() <= 0.5


def test_dicom_recognised_by_magic_without_suffix(tmp_path, raw12):
    path = write_dicom(tmp_path / "IM0001", raw12, "MONOCHROME2")
    assert images.is_dicom(path)
    np.testing.assert_array_equal(images.read_image(path), np.rint(_minmax(raw12.astype(float))).astype(np.uint8))


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"PatientAge": "058Y", "PatientSex": "M", "ViewPosition": "PA"}, {"age": 58.0, "sex": "M", "view": "PA"}),
        ({"PatientAge": "011M", "PatientSex": "F", "ViewPosition": "AP"}, {"age": 11 / 12, "sex": "F", "view": "AP"}),
        (
            {"PatientAge": "005D", "PatientSex": "O", "ViewPosition": "LL"},
            {"age": 5 / 365.25, "sex": None, "view": "LL"},
        ),
        ({}, {"age": None, "sex": None, "view": None}),
    ],
)
def test_dicom_demographics(tmp_path, raw12, tags, expected):
    got = images.read_dicom_demographics(write_dicom(tmp_path / "d.dcm", raw12, "MONOCHROME2", **tags))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value)


# -- errors --------------------------------------------------------------------------------------
def _corrupt_files(tmp_path: Path, gray: np.ndarray, raw12: np.ndarray) -> dict[str, Path]:
    png = _save(gray, tmp_path / "good.png", "L").read_bytes()
    dcm = write_dicom(tmp_path / "good.dcm", raw12, "MONOCHROME2").read_bytes()
    files = {
        "truncated png": (tmp_path / "truncated.png", png[: len(png) // 2]),
        "empty": (tmp_path / "empty.png", b""),
        "not an image": (tmp_path / "notes.png", b"this is a text file, not a PNG\n" * 4),
        "truncated dicom": (tmp_path / "truncated.dcm", dcm[: len(dcm) - 500]),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {k: p for k, (p, _) in files.items()}


@pytest.mark.parametrize("kind", ["truncated png", "empty", "not an image", "truncated dicom"])
def test_unreadable_files_raise_data_error_naming_them(tmp_path, gray, raw12, kind):
    path = _corrupt_files(tmp_path, gray, raw12)[kind]
    with pytest.raises(DataError, match=re.escape(str(path))):
        images.read_image(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent.png")) + ".*does not exist"):
        images.read_image(tmp_path / "absent.png")


@pytest.mark.parametrize("kind", ["truncated png", "empty", "not an image"])
def test_check_readable_catches_without_decoding(tmp_path, gray, raw12, kind):
    path = _corrupt_files(tmp_path, gray, raw12)[kind]
    with pytest.raises(DataError, match=re.escape(str(path))):
        images.check_readable(path)
    images.check_readable(tmp_path / "good.png")
    images.check_readable(tmp_path / "good.dcm")


# -- resize --------------------------------------------------------------------------------------
def test_resize_antialiases_fine_detail():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    small = images.resize(checker, 16)
    assert small.shape == (16, 16) and small.dtype == np.uint8
    # Area-aware resampling averages the pattern to mid-gray; point sampling would give 0 or 255.
    assert np.abs(small.astype(int) - 127.5).max() <= 2


def test_resize_keeps_constant_images_and_same_size_is_identity(gray):
    assert (images.resize(np.full((50, 70), 77, np.uint8), 32) == 77).all()
    np.testing.assert_array_equal(images.resize(gray[:40, :40], 40), gray[:40, :40])


def test_resize_is_deterministic_and_load_resized_composes(tmp_path, gray):
    path = _save(gray, tmp_path / "g.png", "RGBA")
    a, b = images.load_resized(path, 24), images.load_resized(path, 24)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, images.resize(gray, 24))
    # 24x24 from 40x48: each output pixel is a local average, so it stays near the source block mean.
    block = gray.astype(float).reshape(40, 48)[:20, :24].mean()
    assert abs(a[:12, :12].astype(float).mean() - block) < 12


def test_resize_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        images.resize(np.zeros((8, 8), np.float32), 4)
