"""Writing the demo dataset in NIH's layout (images, label table, split lists, BBox list), and
the cache of complete, marker-checked datasets behind :func:`ensure_demo`."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from cxr_lightning.data import nih
from cxr_lightning.data.demo.cohort import check_integer, check_positive, sample_table, split_test_patients
from cxr_lightning.data.demo.render import draw_chest, encode_png, sample_boxes
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.files import atomic_path, write_json, write_text
from cxr_lightning.labels import NO_FINDING
from cxr_lightning.progress import Progress

log = logging.getLogger(__name__)
MARKER_NAME = "demo.json"
# Bump when the generated content changes, so cached demo datasets are regenerated.
DEMO_VERSION = 2
DEMO_DEFAULTS: dict[str, int] = {"patients": 500, "image_size": 256, "seed": 0, "images_per_folder": 1000}
# The demo's tables use the label-table spelling; its BBox list spells findings as NIH's does.
_NIH_SPELLINGS = {label: spelled for spelled, label in nih.BBOX_SPELLINGS.items()}
MIN_IMAGES_PER_WORKER = 32
# Images per progress update when writing in this process.
_PROGRESS_CHUNK = 16
DEMO_NOTE = (
    "A synthetic miniature of NIH ChestX-ray14 in its exact layout, written by python -m cxr_lightning.data.demo:\n"
    "a demo for exercising the pipeline, not evidence about real X-rays.\n"
)


class _ImageJob(NamedTuple):
    path: str
    size: int
    seed: int
    patient_id: int
    follow_up: int
    findings: tuple[str, ...]
    view: str


def _write_images(jobs: Sequence[_ImageJob]) -> int:
    for job in jobs:
        pixels = draw_chest(job.size, job.seed, job.patient_id, job.follow_up, job.findings, job.view)
        with atomic_path(job.path) as tmp:
            tmp.write_bytes(encode_png(pixels))
    return len(jobs)


def image_folders(names: pd.Series, images_per_folder: int) -> pd.Series:
    """``images_001/images`` ... for each image, in name order, like NIH's twelve folders."""
    rank = names.rank(method="first").astype(int) - 1
    return (rank // images_per_folder + 1).map(nih.image_folder)


def generate(
    out: str | os.PathLike,
    patients: int = DEMO_DEFAULTS["patients"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    seed: int = DEMO_DEFAULTS["seed"],
    workers: int = 1,
    images: bool = True,
    images_per_folder: int = DEMO_DEFAULTS["images_per_folder"],
) -> Path:
    """Write a demo dataset in the NIH layout into ``out`` (a new or empty directory).

    ``images=False`` writes only the tables and lists (fast; for statistics). The label table is
    written last, so an interrupted run never looks like a complete dataset.
    """
    for name, value in zip(
        ("patients", "image_size", "workers", "images_per_folder"), (patients, image_size, workers, images_per_folder)
    ):
        check_positive(name, value)
    if image_size < 16:
        raise ConfigError(f"demo image_size={image_size}: use at least 16 pixels.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"demo output {out} exists and is not an empty directory; choose a new --out or delete it.")
    out.mkdir(parents=True, exist_ok=True)

    table = sample_table(patients, seed)
    test_ids = split_test_patients(table, seed)
    boxes = sample_boxes(table, seed)
    if images:
        jobs = _image_jobs(table, out, image_size, seed, images_per_folder)
        for folder in sorted({Path(job.path).parent for job in jobs}):
            folder.mkdir(parents=True, exist_ok=True)
        _run_jobs(jobs, workers)

    in_test = table["Patient ID"].isin(test_ids)
    write_text(out / nih.TRAIN_VAL_LIST, _name_list(table.loc[~in_test, "Image Index"]))
    write_text(out / nih.TEST_LIST, _name_list(table.loc[in_test, "Image Index"]))
    write_text(out / nih.BBOX_TABLE, bbox_table_text(boxes))
    write_text(out / nih.DEMO_MARKER, DEMO_NOTE)
    write_text(out / nih.LABEL_TABLE, label_table_text(table))
    return out


def _image_jobs(table: pd.DataFrame, out: Path, size: int, seed: int, images_per_folder: int) -> list[_ImageJob]:
    folders = image_folders(table["Image Index"], images_per_folder)
    columns = ("Image Index", "Patient ID", "Follow-up #", "Finding Labels", "View Position")
    return [
        _ImageJob(str(out / folder / name), size, seed, int(pid), int(visit), tuple(_split_findings(labels)), view)
        for folder, (name, pid, visit, labels, view) in zip(folders, table[list(columns)].itertuples(index=False))
    ]


def _split_findings(labels: str) -> list[str]:
    return [] if labels == NO_FINDING else labels.split("|")


def _run_jobs(jobs: Sequence[_ImageJob], workers: int) -> None:
    # Starting a worker costs about a second; below a few dozen images each it does not pay.
    workers = min(workers, math.ceil(len(jobs) / MIN_IMAGES_PER_WORKER))
    progress = Progress("demo images", len(jobs), log)
    if workers <= 1:
        for start in range(0, len(jobs), _PROGRESS_CHUNK):
            progress.advance(_write_images(jobs[start:start + _PROGRESS_CHUNK]))
        progress.done()
        return
    chunks = [jobs[i::workers * 4] for i in range(workers * 4)]
    # spawn, not fork: the caller may be a training process with torch's thread pools running.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for written in pool.map(_write_images, chunks):
            progress.advance(written)
    progress.done()


def _name_list(names: pd.Series) -> str:
    return "".join(name + "\n" for name in sorted(names))


def label_table_text(table: pd.DataFrame) -> str:
    """The label table as NIH writes it: its bracketed header and one comma-separated row per image."""
    body = table.to_csv(header=False, index=False, lineterminator="\n")
    return nih.LABEL_TABLE_HEADER + "\n" + body


def bbox_table_text(boxes: pd.DataFrame) -> str:
    """The box list as NIH writes it: its ``,,,``-padded header, ``Infiltrate``, 15-digit floats."""
    rows = boxes.assign(**{"Finding Label": boxes["Finding Label"].replace(_NIH_SPELLINGS)})
    body = rows.to_csv(header=False, index=False, lineterminator="\n", float_format="%.15g")
    return nih.BBOX_TABLE_HEADER + "\n" + body


def demo_dir(cache_dir: str | os.PathLike, **params: Any) -> Path:
    """Where :func:`ensure_demo` keeps the demo for ``params``: ``cache_dir/demo-<hash of params>``."""
    return Path(cache_dir).expanduser() / f"demo-{_digest(_marker(params))}"


def _marker(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEMO_DEFAULTS))
    if unknown:
        raise ConfigError(f"demo parameter(s) {unknown} unknown; expected some of {sorted(DEMO_DEFAULTS)}.")
    for name, value in params.items():
        (check_integer if name == "seed" else check_positive)(name, value)
    return {**DEMO_DEFAULTS, **{k: int(v) for k, v in params.items()}, "version": DEMO_VERSION}


def _digest(marker: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:10]


def ensure_demo(cache_dir: str | os.PathLike, workers: int | None = None, **params: Any) -> Path:
    """The demo dataset for ``params`` (``DEMO_DEFAULTS`` filled in), generated on first use
    into :func:`demo_dir` and reused afterwards.

    Generation goes to a temporary directory renamed into place when complete, with the marker
    file ``demo.json`` (the params) inside, so an interrupted run is never mistaken for a dataset.
    """
    marker = _marker(params)
    full = {k: v for k, v in marker.items() if k != "version"}
    digest = _digest(marker)
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"demo-{digest}"
    if _is_complete(target, marker):
        return target
    if target.exists():
        raise DataError(
            f"{target} exists but lacks a valid {MARKER_NAME}; delete the folder so the demo can be regenerated."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".demo-{digest}-tmp-"))
    try:
        generate(tmp, workers=workers or min(4, os.cpu_count() or 1), **full)
        write_json(tmp / MARKER_NAME, marker)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same demo first: use theirs.
            if not _is_complete(target, marker):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _is_complete(path: Path, marker: Mapping[str, Any]) -> bool:
    try:
        return json.loads((path / MARKER_NAME).read_text()) == dict(marker)
    except (OSError, ValueError):
        return False
