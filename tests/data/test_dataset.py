"""CXRDataset samples (contract dtypes and shapes, cache and decode paths) and find_unreadable."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxr_lightning.data import images
from cxr_lightning.data.cache import ImageCache
from cxr_lightning.data.dataset import CXRDataset, find_unreadable
from cxr_lightning.errors import DataError

torch.set_num_threads(1)
SIZE = 16
LABELS = ["label:Atelectasis", "label:Effusion", "label:No Finding"]
META = ["meta:age", "meta:age_missing", "meta:sex_male", "meta:view_ap"]


@pytest.fixture()
def table(tmp_path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        name = f"{i:08d}_000.png"
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).convert("RGB" if i == 2 else "L").save(
            tmp_path / name
        )
        rows.append({"Image Index": name, "path": str(tmp_path / name)})
    df = pd.DataFrame(rows)
    df[LABELS] = rng.integers(0, 2, (5, len(LABELS))).astype(float)
    df[META] = rng.random((5, len(META)))
    return df


def test_samples_follow_the_contract(table):
    ds = CXRDataset(table, LABELS, META, image_size=SIZE)
    assert len(ds) == len(table)
    for i in range(len(ds)):
        s = ds[i]
        assert set(s) == {"image", "meta", "labels", "index"}
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (1, SIZE, SIZE)
        assert s["meta"].dtype == torch.float32 and s["meta"].shape == (len(META),)
        assert s["labels"].dtype == torch.float32 and s["labels"].shape == (len(LABELS),)
        assert s["index"] == i
        np.testing.assert_array_equal(s["image"][0].numpy(), images.load_resized(table.loc[i, "path"], SIZE))
        np.testing.assert_allclose(s["labels"].numpy(), table.loc[i, LABELS].to_numpy(float), rtol=1e-6)
        np.testing.assert_allclose(s["meta"].numpy(), table.loc[i, META].to_numpy(float), rtol=1e-6)
    # Labels and metadata are numpy blocks built once; no DataFrame is kept for __getitem__.
    assert not any(isinstance(v, (pd.DataFrame, pd.Series)) for v in vars(ds).values())


def test_cache_and_decode_give_identical_batches(table, tmp_path):
    cache = ImageCache.get_or_build(table["path"], table["Image Index"], SIZE, tmp_path / "cache")
    # The split table is a shuffled subset of what the cache holds.
    subset = table.iloc[[3, 0, 4]].reset_index(drop=True)
    decoded = CXRDataset(subset, LABELS, META, SIZE)
    cached = CXRDataset(subset.drop(columns="path"), LABELS, META, SIZE, cache=cache)
    batch_d = next(iter(DataLoader(decoded, batch_size=3)))
    # One worker process: the cache reopens its memory map there instead of receiving the array.
    batch_c = next(iter(DataLoader(cached, batch_size=3, num_workers=1)))
    assert batch_c["image"].shape == (3, 1, SIZE, SIZE) and batch_c["image"].dtype == torch.uint8
    for key in ("image", "meta", "labels", "index"):
        torch.testing.assert_close(batch_c[key], batch_d[key], rtol=0, atol=0)
    assert batch_c["index"].tolist() == [0, 1, 2]


def test_unreadable_image_error_names_file_and_hints_skip(table):
    Path(table.loc[1, "path"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = CXRDataset(table, LABELS, META, SIZE)
    with pytest.raises(DataError, match=re.escape(table.loc[1, "path"]) + r".*data\.on_missing=skip"):
        ds[1]


def test_missing_columns_and_values_are_reported(table):
    with pytest.raises(DataError, match=r"lacks column\(s\) \['meta:prior:Mass'\]"):
        CXRDataset(table, LABELS, META + ["meta:prior:Mass"], SIZE)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['path'\]"):
        CXRDataset(table.drop(columns="path"), LABELS, META, SIZE)
    gappy = table.copy()
    gappy.loc[3, "meta:age"] = np.nan
    with pytest.raises(DataError, match=r"metadata values in column\(s\) \['meta:age'\] at rows \[3\]"):
        CXRDataset(gappy, LABELS, META, SIZE)


def test_cache_of_other_size_or_images_is_refused(table, tmp_path):
    cache = ImageCache.get_or_build(table["path"][:3], table["Image Index"][:3], SIZE, tmp_path / "cache")
    with pytest.raises(DataError, match="holds 16 px images but image_size=32"):
        CXRDataset(table, LABELS, META, 32, cache=cache)
    with pytest.raises(DataError, match=r"2 image\(s\) are not in the cache"):
        CXRDataset(table, LABELS, META, SIZE, cache=cache)


def test_find_unreadable_lists_the_bad_files_in_order(table, tmp_path, caplog):
    good = table["path"].tolist()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(good[0]).read_bytes()[:-40])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not a png")
    missing = tmp_path / "missing.png"
    paths = [good[0], str(truncated), good[1], str(empty), str(missing), good[2], str(text)]
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.dataset"):
        bad = find_unreadable(paths, workers=2)
    assert bad == [str(truncated), str(empty), str(missing), str(text)]
    for path in bad:
        assert path in caplog.text
    assert find_unreadable(good, workers=1) == []
