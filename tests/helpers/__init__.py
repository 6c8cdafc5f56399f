"""Builders every test folder shares: the repository's paths, small training configs, a tiny fit,
a DICOM writer. ``tests/`` is on ``sys.path`` (pytest's rootdir-relative import of the test
folders), so test modules import them as ``from helpers import ...``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
CONF_DIR = str(REPO / "conf")
FIXTURES = TESTS / "fixtures"


def tiny_overrides(root: Path, out: Path) -> list[str]:
    """Overrides that make any training config run in seconds on a CPU."""
    return [
        "data=nih",
        f"data.root={root}",
        "data.image_size=64",
        "data.batch_size=16",
        "data.num_workers=0",
        "backbone=tiny",
        f"paths.output_dir={out}",
        f"paths.cache_dir={out}/cache",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null",
    ]


def compose_config(overrides: list[str], config_name: str = "train"):
    with initialize_config_module(config_module="cxr_lightning.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def fit_tiny(root: Path, out: Path, head: str = "fusion_residual") -> tuple[Path, Path]:
    """A one-epoch fit of the tiny backbone, not tested afterwards: (run directory, best checkpoint)."""
    from cxr_lightning.tasks.train import train

    metrics = train(compose_config(tiny_overrides(root, out) + [f"head={head}", "test_after_fit=false"]))
    return out, Path(metrics["best_checkpoint"])


def write_dicom(path: Path, raw: np.ndarray, photometric: str, preamble: bool = True, **tags) -> Path:
    """A 12-bit DICOM file of ``raw`` as pydicom writes it, with extra header ``tags``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
