"""The images explain looks at: rows of a data split, or image files / ``Image Index`` names (files
become model input through :mod:`cxr_lightning.inputs`, as predict's do).

Both end as an :class:`ImageSet` of uint8 pixels at the model's input size plus the metadata
rows the model receives with them.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.data.nih import IMAGE
from cxr_lightning.data.tables import SPLITS
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.inputs import ImageFiles, file_metadata


class UnknownMetadataWarning(UserWarning):
    """An image outside the data table: its demographics are unknown and filled with defaults."""


@dataclass
class ImageSet:
    """``images`` ``(N, 1, S, S)`` uint8, ``meta`` ``(N, M)`` float32, ``names[i]`` the file name."""

    names: list[str]
    images: torch.Tensor
    meta: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)

    def slice(self, start: int, stop: int) -> ImageSet:
        return ImageSet(self.names[start:stop], self.images[start:stop], self.meta[start:stop])

    def take(self, indices: Sequence[int]) -> ImageSet:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return ImageSet([self.names[i] for i in indices], self.images[rows], self.meta[rows])


def sample_rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_rows)`` distinct row numbers drawn with ``seed``, in table order."""
    if n < 1:
        raise ConfigError(f"n={n}: the number of images to explain must be >= 1.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(n, n_rows), replace=False))


def load_split(dm: CXRDataModule, split: str, rows: Sequence[int]) -> ImageSet:
    """Rows ``rows`` of ``split`` through the data module's own dataset (cache included)."""
    rows = [int(r) for r in rows]
    names = dm.split_table(split)[IMAGE].iloc[rows].tolist()
    if not rows:
        return ImageSet([], torch.zeros(0, 1, dm.image_size, dm.image_size, dtype=torch.uint8),
                        torch.zeros(0, dm.meta_dim))
    loader = DataLoader(Subset(dm.dataset(split), rows), batch_size=dm.batch_size, num_workers=dm.num_workers)
    batches = list(loader)
    return ImageSet(
        names,
        torch.cat([b["image"] for b in batches]),
        torch.cat([b["meta"] for b in batches]).float(),
    )


def data_table(dm: CXRDataModule) -> pd.DataFrame:
    """Every split's rows, indexed by ``Image Index``: where known images get their metadata."""
    return pd.concat([dm.split_table(s) for s in SPLITS], ignore_index=True).set_index(IMAGE)


def load_named(
    entries: Sequence[str],
    image_size: int,
    meta_names: Sequence[str],
    table: pd.DataFrame | None,
    age_fill: float | None,
    demographics: pd.DataFrame | None = None,
) -> ImageSet:
    """Image files or ``Image Index`` names of ``table``, made model input as predict makes its
    files (:mod:`cxr_lightning.inputs`).

    An entry that is an existing file is read from there; otherwise it must be an ``Image Index``
    of ``table``. Metadata comes from ``table`` where the file name is an ``Image Index`` there;
    other files get theirs from ``demographics`` (a demographics CSV, :func:`read_demographics_csv`)
    or their DICOM header, and an :class:`UnknownMetadataWarning` when neither knows anything.
    """
    if not entries:
        raise ConfigError("images=[] is empty: pass image files or Image Index names, or split=test n=16.")
    known = table.index if table is not None else pd.Index([])
    paths, names, keys = [], [], []
    for entry in map(str, entries):
        path = Path(entry).expanduser()
        if path.is_file():
            paths.append(path)
            names.append(path.name)
        elif entry in known:
            paths.append(Path(table.loc[entry, "path"]))
            names.append(entry)
        else:
            where = "the data table" if table is not None else "any data (the data module could not be built)"
            raise DataError(
                f"images: {entry!r} is neither an existing image file nor an Image Index of {where}; "
                "pass a path to a PNG/JPEG/DICOM file or a name from the label table."
            )
        keys.append(entry)

    in_table = np.array([n in known for n in names], dtype=bool)
    meta = np.zeros((len(names), len(meta_names)), np.float32)
    if in_table.any():
        meta_cols = [f"meta:{n}" for n in meta_names]
        meta[in_table] = table.loc[[n for n, k in zip(names, in_table) if k], meta_cols].to_numpy(np.float32)
    if not in_table.all():
        files = [p for p, k in zip(paths, in_table) if not k]
        found, file_meta, refused = file_metadata(
            files, [e for e, k in zip(keys, in_table) if not k], demographics, meta_names, age_fill
        )
        if refused:
            file, why = next(iter(refused.items()))
            raise DataError(f"images: {file}: {why}")
        meta[~in_table] = file_meta
        unknown = [Path(f).name for f, row in found.iterrows() if row.isna().all()]
        if unknown:
            warnings.warn(
                f"demographics unknown for {len(unknown)} image(s) not in the data table ({unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}): no demographics CSV row and no DICOM header, so age is "
                "the training median with age_missing=1 and sex and view are 0.5 where the model has them. "
                "Their predictions (and CAMs) may differ from those with the true age/sex/view; pass "
                "demographics=FILE.csv.",
                UnknownMetadataWarning,
                stacklevel=2,
            )
    files = ImageFiles([str(p) for p in paths], meta, image_size)
    items = [files[i] for i in range(len(files))]
    failed = [(paths[i], item["error"]) for i, item in enumerate(items) if item["error"]]
    if failed:
        raise DataError(f"images: {failed[0][1]}")
    return ImageSet(names, torch.stack([item["image"] for item in items]), torch.from_numpy(meta))
