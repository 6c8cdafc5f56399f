"""Hostile or odd images: a decompression bomb or a DICOM header promising gigapixels is refused from
its header, quickly and with a named error; predict warns about inputs that look wrongly scaled."""
from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dicom

from cxr_lightning.data import images
from cxr_lightning.errors import DataError


def bomb_png(path: Path, side: int) -> Path:
    """A valid gray PNG of side x side zero pixels: a few hundred kB that decode to side**2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (side + 1)  # filter byte + pixels
    compress = zlib.compressobj(9)
    body = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "side, size", [(11_000, r"11000 x 11000 pixels \(121 MP\)"), (20_000, r"Image size \(400000000 pixels\)")]
)
def test_a_decompression_bomb_png_is_refused_before_decoding(tmp_path, side, size):
    # 121 MP passes PIL's own guard (it warns only); 400 MP is past it (PIL's error, renamed).
    bomb = bomb_png(tmp_path / "bomb.png", side)
    assert bomb.stat().st_size < 1_000_000
    for read in (images.read_image, images.check_readable, lambda p: images.load_resized(p, 64)):
        started = time.perf_counter()
        with pytest.raises(DataError, match=rf"bomb\.png declares {size}.*more than the 100 MP limit"):
            read(bomb)
        assert time.perf_counter() - started < 2.0  # header only: decoding would take seconds and the memory


def test_an_image_below_the_limit_still_decodes(tmp_path):
    path = bomb_png(tmp_path / "ok.png", 300)
    assert images.read_image(path).shape == (300, 300)


def test_a_dicom_header_promising_gigapixels_is_refused_before_its_pixel_data(tmp_path):
    raw = np.zeros((4, 4), np.uint16)
    huge = write_dicom(tmp_path / "huge.dcm", raw, "MONOCHROME2")
    import pydicom

    ds = pydicom.dcmread(huge)
    ds.Rows, ds.Columns = 60_000, 60_000  # the header lies; the file holds 32 bytes of pixels
    ds.save_as(huge)
    frames = write_dicom(tmp_path / "frames.dcm", raw, "MONOCHROME2", NumberOfFrames=10_000_000)
    for path, size in ((huge, r"60000 x 60000 pixels \(3600 MP\)"), (frames, r"4 x 4 x 10000000 frames")):
        for read in (images.read_image, images.check_readable):
            started = time.perf_counter()
            with pytest.raises(DataError, match=rf"{path.name} declares {size}.*100 MP limit"):
                read(path)
            assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "name, pixels, why",
    [
        ("constant", np.full((64, 64), 128, np.uint8), r"constant \(every pixel is 128\)"),
        ("binary", np.where(np.arange(64 * 64).reshape(64, 64) % 7 < 3, 0, 255).astype(np.uint8), "nearly binary"),
        (
            "narrow",
            (100 + np.arange(64 * 64).reshape(64, 64) % 20).astype(np.uint8),
            r"gray levels 100\.\.119.*wrong window",
        ),
        (
            "clipped",
            np.concatenate(
                [np.zeros((20, 64)), np.full((20, 64), 255), np.tile(np.linspace(0, 255, 64), (24, 1))]
            ).astype(np.uint8),
            "clipped at 0 or 255",
        ),
    ],
)
def test_wrongly_scaled_inputs_are_named(name, pixels, why):
    assert images.scaling_problem(pixels) is not None
    assert __import__("re").search(why, images.scaling_problem(pixels)), images.scaling_problem(pixels)


def test_a_radiograph_is_not_flagged(tiny_demo):
    for path in sorted((tiny_demo / "images_001" / "images").glob("*.png"))[:10]:
        assert images.scaling_problem(images.read_image(path)) is None, path
