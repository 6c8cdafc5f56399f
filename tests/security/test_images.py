"""Attacks 5-6, images: the pixel budget holds for every format before any decode (peak memory
measured), only PNG, JPEG and DICOM decoders are reached, a full decode catches truncated files at
setup, and a bad file is named (predict) or skipped and counted (training), never a traceback."""
from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import compose_config, tiny_overrides, write_dicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from cxr_lightning.data import images
from cxr_lightning.errors import DataError
from security.hostile import ROOT

MB = 1 << 20


def png(path: Path, side: int, depth: int = 8) -> Path:
    """A valid gray PNG of side x side zero pixels at ``depth`` bits, compressed to a few hundred kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (side * depth // 8 + 1)
    compress = zlib.compressobj(9)
    body = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def jpeg_dicom(path: Path, frame_side: int, header_side: int = 64, jpeg: Path | None = None) -> Path:
    """A JPEG-baseline DICOM whose header says ``header_side`` square but whose frame is ``frame_side``
    (the frame also written to ``jpeg`` when given)."""
    buffer = io.BytesIO()
    Image.new("L", (frame_side, frame_side), 0).save(buffer, format="JPEG", quality=50)
    if jpeg is not None:
        jpeg.write_bytes(buffer.getvalue())
    write_dicom(path, np.zeros((header_side, header_side), np.uint16), "MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


PROBE = """
import json, sys
from cxr_lightning.data import images
def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))
out = {}
for path in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    try:
        images.read_image(path)
        result = "decoded"
    except images.DataError as exc:
        result = str(exc)
    out[path] = [result, status("VmHWM") - before]
print(json.dumps(out))
"""


def peak_memory(*paths: Path) -> dict[str, tuple[str, int]]:
    """For each file, in one fresh process: the outcome and the peak resident memory its read added
    (Linux: the peak is reset before each file through /proc/self/clear_refs)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=True)
    return {Path(k).name: tuple(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_the_pixel_budget_holds_before_any_decode_for_every_format(tmp_path):
    files = [
        png(tmp_path / "bomb16.png", 10_000, depth=16),      # 100 MP of 16 bits: 200 MB decoded, over the budget
        jpeg_dicom(tmp_path / "frame_bomb.dcm", 11_000, jpeg=tmp_path / "bomb.jpg"),  # header 64 x 64, a 121 MP frame
        tmp_path / "bomb.jpg",                                # the same 121 MP JPEG as a file
        png(tmp_path / "bomb8.png", 11_000),                  # 121 MP
        png(tmp_path / "big16.png", 5_000, depth=16),         # 25 MP of 16 bits: decodes, in bounded memory
    ]
    assert all(f.stat().st_size < 2 * MB for f in files[:4])
    seen = peak_memory(*files)
    for name in ("bomb16.png", "bomb8.png", "bomb.jpg"):
        why, grown = seen[name]
        assert "more than the 100 MP limit" in why, why
        assert grown < 40 * MB, (name, grown / MB)
    why, grown = seen["frame_bomb.dcm"]
    assert "11000 x 11000" in why and ("limit" in why or "header says 64 x 64" in why), why
    assert grown < 40 * MB, grown / MB
    why, grown = seen["big16.png"]
    assert why == "decoded"
    # PIL's 16-bit image (50 MB), its array (50 MB) and the 8-bit result (25 MB); int64 arithmetic needed 700 MB.
    assert grown < 220 * MB, grown / MB


def test_a_frame_that_disagrees_with_its_header_is_refused_and_a_genuine_one_decodes(tmp_path):
    with pytest.raises(DataError, match=r"frame holds 200 x 200 pixels but its header says 64 x 64"):
        images.read_image(jpeg_dicom(tmp_path / "liar.dcm", 200))
    assert images.read_image(jpeg_dicom(tmp_path / "fine.dcm", 64)).shape == (64, 64)
    with pytest.raises(DataError, match=r"more than the 0 MP limit"):
        images.read_image(jpeg_dicom(tmp_path / "fine.dcm", 64), max_pixels=1000)


def test_only_png_jpeg_and_dicom_decoders_are_reached(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    reached = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: reached.append(1))
    eps = tmp_path / "scan.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    for read in (images.read_image, images.check_readable):
        with pytest.raises(DataError, match=r"scan\.png is not a PNG or JPEG"):
            read(eps)
    assert not reached
    tiff = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(DataError, match="not a PNG or JPEG"):
        images.read_image(tiff)


def test_verify_decodes_in_full_so_truncated_pixel_data_is_caught(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    dicom = write_dicom(tmp_path / "cut.dcm", rng.integers(0, 4095, (64, 64)), "MONOCHROME2")
    dicom.write_bytes(dicom.read_bytes()[:-2000])
    for path in (tmp_path / "cut.jpg", dicom):
        with pytest.raises(DataError, match=str(path.name)):
            images.check_readable(path)
    images.check_readable(tmp_path / "full.jpg")


def test_the_setup_check_lists_a_dicom_whose_window_cannot_be_applied(tmp_path):
    from cxr_lightning.data.dataset import find_unreadable

    gray = np.random.default_rng(2).integers(0, 4095, (32, 32))
    bad = write_dicom(tmp_path / "w0.dcm", gray, "MONOCHROME2", WindowCenter=100, WindowWidth=0)
    good = write_dicom(tmp_path / "ok.dcm", gray, "MONOCHROME2", WindowCenter=2000, WindowWidth=4000)
    assert find_unreadable([str(bad), str(good)]) == [str(bad)]


def test_an_unusable_window_is_a_named_error_and_predict_goes_on(tmp_path, trained_run, capsys):
    from cxr_lightning.tasks.predict import predict, report_failures

    folder = tmp_path / "in"
    folder.mkdir()
    gray = np.random.default_rng(1).integers(0, 4095, (64, 64))
    bad = write_dicom(folder / "window.dcm", gray, "MONOCHROME2", WindowCenter=100, WindowWidth=0)
    with pytest.raises(DataError, match=r"window\.dcm: its rescale, window or VOI LUT tags cannot be applied"):
        images.read_image(bad)
    Image.fromarray((gray // 16).astype(np.uint8)).save(folder / "good.png")
    png(folder / "bomb16.png", 8_000, depth=16)
    cfg = compose_config([f"ckpt_path={trained_run[1]}", f"input={folder}", f"output={tmp_path / 'p.csv'}"], "predict")
    run = predict(cfg)
    assert [Path(p).name for p in pd.read_csv(tmp_path / "p.csv")["file"]] == ["good.png"]
    assert sorted(Path(p).name for p in run.failures) == ["bomb16.png", "window.dcm"]
    with pytest.raises(SystemExit) as info:
        report_failures(run)
    assert info.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("failed: ")]) == 2


@pytest.mark.slow
def test_training_skips_an_image_truncated_after_setup_and_counts_it(tiny_demo, tmp_path):
    from cxr_lightning.data.datamodule import CXRDataModule
    from cxr_lightning.tasks.train import train

    root = tmp_path / "nih"
    shutil.copytree(tiny_demo, root)
    dm = CXRDataModule(source="nih", root=root, image_size=64, num_workers=0)
    victim = Path(dm.split_table("train")["path"].iloc[0])
    victim.write_bytes(victim.read_bytes()[:200])  # PadChest ships such files
    metrics = train(compose_config(tiny_overrides(root, tmp_path / "run")
                                   + ["data.on_missing=skip", "test_after_fit=false", "data.num_workers=0"]))
    assert metrics["images_skipped"] == 1
    assert metrics["images_skipped_files"] == [str(victim)]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["images_skipped"] == 1
