"""Files a user hands in -> model inputs, for predict and explain alike.

- :func:`collect_inputs`: one image file, or every image under a folder (PNG, JPEG, DICOM with or
  without a suffix);
- :func:`read_demographics_csv`: an optional CSV of age, sex and view per file;
- :func:`gather_demographics`: age/sex/view per file, the CSV first, then the DICOM header; a view
  other than PA/AP (a lateral film in particular) refuses that file;
- :func:`file_metadata`: those demographics encoded by the training code
  (:func:`cxr_lightning.data.cohort.new_patient_metadata`) in the checkpoint's column order: an age
  over 100 or missing is imputed with the training median and flagged in ``age_missing``; a missing
  sex or view gets 0.5; previous-visit findings are unknown for a new image (``prior:*`` and
  ``has_prior`` 0, as for a patient's first visit);
- :class:`ImageFiles`: the pixels, through the training decoder and resize
  (:func:`cxr_lightning.data.images.load_resized`); a file that cannot be decoded carries its error
  instead of stopping the others.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxr_lightning.data import cohort, images, nih
from cxr_lightning.data.sources.common import FRONTAL_VIEWS
from cxr_lightning.errors import DataError

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")
CSV_KEYS = ("file", nih.IMAGE)
CSV_FIELDS = ("age", "sex", "view")


def collect_inputs(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, files)``: one file as given, or every image file under a folder (recursively, sorted).

    In a folder, files with an image suffix count, and suffix-less files that carry the DICOM magic
    (PACS exports often have no suffix); anything else is ignored.
    """
    target = Path(path)
    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise DataError(f"input={path} does not exist; pass an image file or a folder of images.")
    files = sorted(
        f
        for f in target.rglob("*")
        if f.is_file() and (f.suffix.lower() in INPUT_SUFFIXES or (not f.suffix and images.is_dicom(f)))
    )
    if not files:
        raise DataError(f"input={path} holds no image files ({', '.join(INPUT_SUFFIXES)} or DICOM without a suffix).")
    return target, files


def read_demographics_csv(path: str | os.PathLike) -> pd.DataFrame:
    """The demographics CSV indexed by its ``file`` (or ``Image Index``) column, with float ``age``
    (NaN when blank) and upper-case ``sex``/``view`` (NA when blank); missing columns are all blank."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"demographics={path} does not exist.")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # parser errors, binary files
        raise DataError(f"demographics={path} is not a readable CSV ({type(exc).__name__}: {exc}).") from exc
    key = next((k for k in CSV_KEYS if k in raw.columns), None)
    if key is None:
        raise DataError(
            f"demographics={path} needs a `file` (or `Image Index`) column naming each image; "
            f"its columns are {list(raw.columns)}."
        )
    if not set(CSV_FIELDS) & set(raw.columns):
        raise DataError(
            f"demographics={path} has none of the columns {list(CSV_FIELDS)}; columns are {list(raw.columns)}."
        )
    names = raw[key].str.strip()
    repeated = names.duplicated(keep=False) & (names != "")
    if repeated.any():
        raise DataError(f"demographics={path}: file(s) listed more than once: {sorted(set(names[repeated]))[:5]}.")
    text = raw.reindex(columns=CSV_FIELDS, fill_value="").apply(lambda c: c.str.strip())
    age = pd.to_numeric(text["age"], errors="coerce")
    bad_age = (age.isna() & (text["age"] != "")) | (age < 0)
    sex = text["sex"].str.upper().replace("", pd.NA)
    bad_sex = sex.notna() & ~sex.isin(["M", "F"])
    for bad, what in ((bad_age, "age must be a number of years >= 0"), (bad_sex, "sex must be M or F")):
        if bad.any():
            rows = (bad[bad].index[:5] + 2).tolist()  # +2: header line, 1-based
            shown = text.loc[bad].head(5).to_dict("records")
            raise DataError(f"demographics={path}: {what} (or blank); see line(s) {rows}: {shown}.")
    table = pd.DataFrame(
        {"age": age, "sex": sex, "view": text["view"].str.upper().replace("", pd.NA)}
    ).set_axis(names.to_numpy())
    table.attrs["source"] = str(path)
    return table[names.to_numpy() != ""]


def gather_demographics(
    files: Sequence[Path], keys: Sequence[str], csv: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Age/sex/view per file (index: the file path), CSV values first, then the DICOM header, and
    the files refused already (unreadable DICOM header, non-frontal view)."""
    failures: dict[str, str] = {}
    tags = []
    for f in files:
        try:
            tags.append(images.read_dicom_demographics(f) if images.is_dicom(f) else {})
        except DataError as exc:
            failures[str(f)] = str(exc)
            tags.append({})
    index = pd.Index([str(f) for f in files], name="file")
    found = pd.DataFrame(tags, index=index).reindex(columns=CSV_FIELDS)
    if csv is not None:
        by_path = csv.reindex(list(keys)).set_axis(index)
        by_name = csv.reindex([Path(k).name for k in keys]).set_axis(index)
        found = by_path.combine_first(by_name).combine_first(found)
        unused = ~csv.index.isin(list(keys) + [Path(k).name for k in keys])
        if unused.any():
            warnings.warn(
                f"{csv.attrs.get('source', 'demographics CSV')}: {int(unused.sum())} row(s) match no input file, "
                f"e.g. {csv.index[unused][:3].tolist()}.",
                stacklevel=2,
            )
    found = found.reindex(columns=CSV_FIELDS).astype({"age": float, "sex": object, "view": object})
    view = found["view"]
    refused = view.notna() & ~view.isin(FRONTAL_VIEWS)
    for file, v in view[refused].items():
        kind = "a lateral view" if v in LATERAL_VIEWS else "not a frontal view"
        failures.setdefault(
            file, f"view position {v} is {kind}; the model was trained on frontal (PA/AP) chest X-rays only."
        )
    return found, failures


def file_metadata(
    files: Sequence[Path],
    keys: Sequence[str],
    csv: pd.DataFrame | None,
    meta_names: Sequence[str],
    age_fill: float | None,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    """``(demographics, meta, failures)`` of ``files`` (named ``keys`` in the CSV): the demographics
    of every file (index: its path), the ``(N, M)`` metadata rows of the files not refused, in
    order, and the refused files with why."""
    demographics, failures = gather_demographics(files, keys, csv)
    kept = demographics[~demographics.index.isin(list(failures))]
    return demographics, cohort.new_patient_metadata(kept, meta_names, age_fill), failures


def relative_key(path: Path, root: Path) -> str:
    """How a demographics CSV names ``path``: relative to the input folder, else its file name."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


class ImageFiles(Dataset):
    """Files as ``{"image": uint8 (1, S, S), "meta", "index", "error", "warning"}``; a file that
    cannot be decoded gives a blank image and its error message instead of stopping the run, one
    that decodes but looks wrongly scaled (:func:`images.scaling_problem`) a warning."""

    def __init__(self, paths: Sequence[str], meta: np.ndarray, image_size: int, max_pixels: int | None = None) -> None:
        self.max_pixels = max_pixels
        self.paths = list(paths)
        self.meta = torch.from_numpy(np.asarray(meta, dtype=np.float32))
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        try:
            pixels, error = images.load_resized(self.paths[index], self.image_size, self.max_pixels), ""
            warning = images.scaling_problem(pixels) or ""
        except DataError as exc:
            pixels = np.zeros((self.image_size, self.image_size), np.uint8)
            error, warning = str(exc), ""
        item = {"image": torch.from_numpy(pixels)[None], "meta": self.meta[index], "index": index}
        return {**item, "error": error, "warning": warning}
