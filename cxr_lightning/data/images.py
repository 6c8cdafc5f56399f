"""Decode any chest X-ray file (PNG, JPEG, DICOM) to one uint8 channel, and resize it.

Every pixel path in the framework goes through :func:`load_resized`: the dataset when it decodes
on the fly, the cache when it is built, ``predict`` on a new file. So the model always sees the
same pixels for the same file, whichever path produced them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cxr_lightning.data.nih import parse_ages
from cxr_lightning.errors import DataError

# Recorded in the cache fingerprint: changing the resampling must invalidate every cache.
RESIZE_METHOD = "PIL-bilinear-antialias"

# The pixel budget: the largest image decoded, 100 megapixels (10000 x 10000) of 8-bit gray, five
# times the largest radiography detectors (about 4300 x 4300 for chest, 4096 x 5120 for
# mammography); ``data.max_pixels`` (and predict's ``max_pixels``) set another. An image counts at
# its decoded size: a 16-bit pixel counts twice, an RGB one three times. It is checked from the
# header (for a compressed DICOM, from its frame's own codestream header too), before any pixel is
# decoded, so a decompression bomb (a small file that decodes to gigapixels) or a header promising
# more is refused in milliseconds instead of exhausting memory. PIL's own guard
# (Image.MAX_IMAGE_PIXELS) only warns below twice its 89 MP limit.
MAX_PIXELS = 100_000_000
# The decoders a file may reach: PIL has plugins for dozens of formats (EPS runs Ghostscript),
# and an X-ray is PNG, JPEG or DICOM.
PIL_FORMATS = ("PNG", "JPEG")
# Bytes per pixel once decoded, by PIL mode (what the budget counts).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "RGBa": 4,
               "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}

_DICOM_MAGIC_OFFSET = 128
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``path`` to a ``uint8`` array of shape ``(H, W)``.

    PNG/JPEG/other PIL formats: gray stays gray, 16-bit gray is scaled by its bit depth
    (``round(v * 255 / 65535)``), colour becomes luminance exactly as ``PIL.Image.convert("L")``
    does and alpha is dropped. DICOM (``.dcm`` or the ``DICM`` magic): modality LUT (rescale
    slope/intercept), VOI LUT or window, MONOCHROME1 inverted, then min-max scaled to 0..255.

    Raises :class:`DataError` naming the file for anything missing, empty, truncated, undecodable, of
    another format, or over the pixel budget ``max_pixels`` (default :data:`MAX_PIXELS`).
    """
    path = Path(path)
    _check_nonempty(path)
    budget = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if _is_dicom(path):
        return _read_dicom(path, budget)
    return _read_pil(path, budget)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a ``uint8 (H, W)`` image to ``(size, size)`` with PIL's antialiased bilinear filter.

    PIL widens the bilinear kernel by the reduction factor, so downscaling 1024 -> 224 averages
    every source pixel (no aliasing of fine lung texture), and the result is deterministic and
    the same in the cache and on-the-fly paths. Non-square images are stretched to a square
    (NIH images are 1024x1024).
    """
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"resize expects a uint8 (H, W) array, got {img.dtype} {img.shape}")
    if img.shape == (size, size):
        return img
    return np.array(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))  # writable copy


def load_resized(path: str | os.PathLike, size: int, max_pixels: int | None = None) -> np.ndarray:
    """``resize(read_image(path), size)``: the one way pixels enter the framework."""
    return resize(read_image(path, max_pixels), size)


def read_dicom_demographics(path: str | os.PathLike) -> dict[str, Any]:
    """Age (float years), sex (``"M"``/``"F"``) and view (``"PA"``, ``"AP"``, ``"LL"``...) from a
    DICOM header; each is ``None`` when the tag is absent or unusable."""
    header = read_dicom_header(path)
    return {k: header[k] for k in ("age", "sex", "view")}


def read_dicom_header(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_dicom_demographics` plus the image's ``rows`` and ``columns`` (its pixel size,
    which box coordinates refer to), from the header alone; sizes are ``None`` when absent."""
    path = Path(path)
    _check_nonempty(path)
    ds = _dcmread(path, stop_before_pixels=True)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        rows = cols = 0
    return {
        "age": parse_dicom_age(str(ds.get("PatientAge", "") or "")),
        "sex": sex if sex in ("M", "F") else None,
        "view": view or None,
        "rows": rows or None,
        "columns": cols or None,
    }


def parse_dicom_age(value: str) -> float | None:
    """DICOM age string (``058Y``, ``011M``, ``003W``, ``005D``) to years; ``None`` if unparsable."""
    years = parse_ages(pd.Series([value])).iloc[0]
    return None if pd.isna(years) else float(years)


def check_readable(path: str | os.PathLike, max_pixels: int | None = None) -> None:
    """That ``path`` decodes in full (``data.verify_images=true``); :class:`DataError` if not.

    A full decode, not a header check: a truncated JPEG, or DICOM pixel data cut short, passes every
    header check and fails only when decoded, which would otherwise stop a run later.
    """
    read_image(path, max_pixels)


# Thresholds of scaling_problem: a radiograph spreads over most of 0..255 (min-max scaled DICOMs
# span all of it); these flag inputs that a model trained on radiographs will misread.
_NEAR_BINARY = 0.95  # share of pixels on the two most frequent values
_NARROW_RANGE = 48  # 1st-99th percentile span of gray levels, of 255
_CLIPPED = 0.25  # share of pixels at exactly 0 or exactly 255


def scaling_problem(pixels: np.ndarray) -> str | None:
    """Why decoded ``uint8`` pixels look wrongly scaled for a radiograph, or None: constant, nearly
    binary (a mask, a thresholded or 1-bit export), a narrow gray range (the wrong window or
    16-bit data squeezed into a few levels), or heavily clipped (a window far too narrow)."""
    values = np.asarray(pixels).ravel()
    if values.size == 0:
        return None
    lo, hi = int(values.min()), int(values.max())
    if lo == hi:
        return f"it is constant (every pixel is {lo})"
    counts = np.bincount(values.astype(np.int64), minlength=256)
    top_two = float(np.sort(counts)[-2:].sum()) / values.size
    if top_two >= _NEAR_BINARY:
        return (
            f"it is nearly binary ({top_two:.0%} of its pixels take two gray values): "
            "a mask or a thresholded export?"
        )
    p1, p99 = np.percentile(values, [1, 99])
    if p99 - p1 < _NARROW_RANGE:
        return (
            f"98% of its pixels lie in gray levels {p1:.0f}..{p99:.0f} of 0..255: the wrong window, or high-bit data "
            "scaled as if 8-bit?"
        )
    clipped = float(counts[0] + counts[255]) / values.size
    if clipped >= _CLIPPED:
        return f"{clipped:.0%} of its pixels are clipped at 0 or 255: a window much narrower than the image's range?"
    return None


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file by suffix or by the ``DICM`` magic at byte 128."""
    return _is_dicom(Path(path))


# ------------------------------------------------------------------------------------------------
def _check_nonempty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"Image file {path} does not exist.") from None
    except OSError as exc:
        raise DataError(f"Image file {path} cannot be accessed: {exc}") from exc
    if size == 0:
        raise DataError(f"Image file {path} is empty (0 bytes); re-download or remove it.")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError as exc:
        raise DataError(f"Image file {path} cannot be read: {exc}") from exc


def _read_pil(path: Path, budget: int) -> np.ndarray:
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:  # reads the header only
            _check_pixel_count(path, im.width, im.height, budget, bytes_per_pixel=_MODE_BYTES.get(im.mode, 4))
            im.load()
            return _pil_to_gray(im, path)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_large(path, str(exc), budget) from None
    except UnidentifiedImageError:
        raise DataError(
            f"Image file {path} is not a PNG or JPEG (nor DICOM); other formats are not decoded. Convert it to PNG."
        ) from None
    except Exception as exc:  # PIL signals truncation/corruption with OSError, SyntaxError, ValueError, zlib.error...
        raise DataError(
            f"Image file {path} is corrupt or truncated ({type(exc).__name__}: {exc}); re-download or remove it."
        ) from exc


# 16-bit gray -> 8-bit, round(v * 255 / 65535): a table lookup allocates only the 8-bit result
# (int64 arithmetic would need 8 bytes per pixel, several times over).
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def _pil_to_gray(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling, so scale here.
        values = np.asarray(im)
        if values.dtype.kind != "u" and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"Image file {path}: 32-bit integer pixels outside the 16-bit range are not supported; "
                f"save it as an 8- or 16-bit PNG."
            )
        return _SIXTEEN_TO_EIGHT[values]
    if im.mode == "F":
        raise DataError(f"Image file {path}: floating-point images are not supported; save it as an 8- or 16-bit PNG.")
    # RGB(A), LA, P, 1, CMYK, YCbCr: PIL's ITU-R 601-2 luma, which maps gray RGB to itself.
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def _check_pixel_count(
    path: Path, width: int, height: int, budget: int, frames: int = 1, bytes_per_pixel: int = 1
) -> None:
    pixels = width * height * frames
    if pixels * bytes_per_pixel > budget:
        size = f"{width} x {height}{f' x {frames} frames' if frames > 1 else ''} pixels ({pixels / 1e6:.0f} MP)"
        if bytes_per_pixel > 1:
            size += f" of {bytes_per_pixel} bytes each, {pixels * bytes_per_pixel / 1e6:.0f} MP decoded"
        raise _too_large(path, size, budget)


def _too_large(path: Path, size: str, budget: int = MAX_PIXELS) -> DataError:
    return DataError(
        f"Image file {path} declares {size}, more than the {budget / 1e6:.0f} MP limit "
        "(data.max_pixels): not decoding it. A radiograph is at most about 20 MP; "
        "downscale the image, or check where the file came from (a decompression bomb looks like this)."
    )


def _check_dicom_size(path: Path, ds: Any, budget: int) -> None:
    """Rows x Columns x frames x samples x bytes per sample from the header, before the pixel data is read."""
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1) or 1)
        depth = max(1, (int(ds.get("BitsAllocated", 8) or 8) + 7) // 8)
    except (TypeError, ValueError) as exc:
        raise DataError(f"DICOM file {path}: unreadable image size in its header ({exc}).") from None
    _check_pixel_count(path, cols, rows, budget, frames, bytes_per_pixel=depth)


# The transfer syntaxes decoded: uncompressed, JPEG (baseline, extended, lossless), JPEG-LS, JPEG
# 2000, HTJ2K and RLE. Deflate compresses the whole data set, header included, so it could not be
# sized before inflating: refused.
_DEFLATED = "1.2.840.10008.1.2.1.99"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOFn markers, and JPEG-LS's SOF55


def _frame_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a compressed frame's own header (JPEG family, JPEG 2000), None if it has none (RLE)."""
    if frame[:2] == b"\xff\xd8":  # JPEG, JPEG-LS: walk the marker segments up to the frame header
        i = 2
        while i + 9 <= len(frame):
            if frame[i] != 0xFF:
                return None
            marker = frame[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                return int.from_bytes(frame[i + 7:i + 9], "big"), int.from_bytes(frame[i + 5:i + 7], "big")
            i += 2 + int.from_bytes(frame[i + 2:i + 4], "big")
        return None
    siz = frame.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ, also inside a JP2 box
    if siz >= 0 and siz + 24 <= len(frame):
        x, y, x0, y0 = (int.from_bytes(frame[siz + 8 + 4 * k:siz + 12 + 4 * k], "big") for k in range(4))
        return x - x0, y - y0
    return None


def _check_compressed_frame(path: Path, ds: Any, budget: int) -> None:
    """A compressed frame decodes to what its codestream says, whatever the DICOM header claims:
    refuse one whose own size disagrees with the header, or exceeds the budget, before decoding."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    if str(syntax) == _DEFLATED:
        raise DataError(f"DICOM file {path}: the deflated transfer syntax is not decoded (it cannot be sized "
                        "before inflating); save it uncompressed or JPEG-compressed.")
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception as exc:  # no items, a broken offset table
        raise DataError(
            f"DICOM file {path}: its compressed pixel data is malformed ({type(exc).__name__}: {exc})."
        ) from None
    size = _frame_size(frame)
    if size is None:
        return
    width, height = size
    depth = max(1, (int(ds.get("BitsAllocated", 8) or 8) + 7) // 8)
    _check_pixel_count(path, width, height, budget, bytes_per_pixel=depth)
    if (height, width) != (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))):
        raise DataError(
            f"DICOM file {path}: its compressed frame holds {width} x {height} pixels but its header says "
            f"{ds.get('Columns')} x {ds.get('Rows')}; the file is inconsistent, not decoding it."
        )


def _dcmread(path: Path, **kwargs: Any):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force: a .dcm file without the 128-byte preamble (older writers) is still DICOM.
        return pydicom.dcmread(path, force=True, **kwargs)
    except InvalidDicomError as exc:
        raise DataError(f"DICOM file {path} is not valid DICOM: {exc}") from exc
    except Exception as exc:  # pydicom reports truncated headers as EOFError/OSError/ValueError
        raise DataError(f"DICOM file {path} is corrupt or truncated ({type(exc).__name__}: {exc}).") from exc


def _read_dicom(path: Path, budget: int) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    ds = _dcmread(path, defer_size=1024)  # the pixel data is read only when decoded below
    if "PixelData" not in ds:
        raise DataError(f"DICOM file {path} holds no pixel data (PixelData tag missing).")
    _check_dicom_size(path, ds, budget)
    _check_compressed_frame(path, ds, budget)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # truncated data, or no decoder plug-in for a compressed transfer syntax
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (
            f" Its transfer syntax {syntax.name} is compressed: `pip install pylibjpeg pylibjpeg-libjpeg "
            f"pylibjpeg-openjpeg` adds the decoders."
            if syntax is not None and syntax.is_compressed
            else ""
        )
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError(f"DICOM file {path}: cannot decode its pixel data ({reason}).{hint}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if not photometric.startswith("MONOCHROME"):
        raise DataError(
            f"DICOM file {path}: photometric interpretation {photometric} is not a grayscale radiograph."
        )
    if pixels.ndim != 2:
        raise DataError(f"DICOM file {path}: expected one 2-D frame, got pixel data of shape {pixels.shape}.")
    try:
        values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    except Exception as exc:  # WindowWidth=0 or < 1, a VOI LUT whose descriptor does not fit its data...
        raise DataError(
            f"DICOM file {path}: its rescale, window or VOI LUT tags cannot be applied ({type(exc).__name__}: "
            f"{str(exc)[:160]}); fix WindowCenter/WindowWidth or the LUT, or remove the file."
        ) from None
    lo, hi = float(values.min()), float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"DICOM file {path}: its rescaled pixel values are not finite (RescaleSlope/Intercept?).")
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # low values are white: invert so that bone is bright
        scaled = 255.0 - scaled
    return np.rint(scaled).astype(np.uint8)
