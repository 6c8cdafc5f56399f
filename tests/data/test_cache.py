"""The memory-mapped image cache: same pixels as decoding, invalidation, atomic builds."""
from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_lightning.data import cache as cache_mod
from cxr_lightning.data import images
from cxr_lightning.data.cache import ImageCache, compute_fingerprint
from cxr_lightning.errors import DataError

SIZE = 16


@pytest.fixture()
def pngs(tmp_path) -> tuple[list[str], list[str]]:
    """Six small images in assorted PNG flavours, 40x48 (so the cache really resizes)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths, names = [], []
    for i, mode in enumerate(["L", "I;16", "RGB", "RGBA", "L", "L"]):
        img = rng.integers(0, 256, (40, 48), dtype=np.uint8)
        name = f"{i:08d}_000.png"
        if mode == "I;16":
            Image.fromarray(img.astype(np.uint16) * 257).save(folder / name)
        elif mode in ("RGB", "RGBA"):
            Image.fromarray(img).convert(mode).save(folder / name)
        else:
            Image.fromarray(img).save(folder / name)
        paths.append(str(folder / name))
        names.append(name)
    return paths, names


def _build(pngs, root, extra="table-v1", workers=0, size=SIZE) -> ImageCache:
    paths, names = pngs
    return ImageCache.get_or_build(paths, names, size, root, fingerprint_extra=extra, workers=workers)


def test_cache_holds_the_same_pixels_as_decoding(pngs, tmp_path):
    paths, names = pngs
    cache = _build(pngs, tmp_path / "cache")
    assert cache.directory == tmp_path / "cache" / f"{SIZE}px"
    assert len(cache) == len(paths) and cache.size == SIZE
    rows = cache.rows(list(reversed(names)))
    np.testing.assert_array_equal(rows, np.arange(len(names))[::-1])
    for row, path in zip(cache.rows(names), paths):
        got = cache[row]
        assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(got, images.resize(images.read_image(path), SIZE))
    stored = np.load(cache.directory / "images.npy", mmap_mode="r")
    assert stored.shape == (len(paths), SIZE, SIZE) and stored.dtype == np.uint8


def test_parallel_build_equals_serial_build(pngs, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "_CHUNK", 2)  # several tasks for the two workers
    serial = _build(pngs, tmp_path / "a", workers=0)
    parallel = _build(pngs, tmp_path / "b", workers=2)
    np.testing.assert_array_equal(
        np.load(serial.directory / "images.npy"), np.load(parallel.directory / "images.npy")
    )


def test_rows_are_read_lazily_and_never_pickled(pngs, tmp_path):
    cache = _build(pngs, tmp_path / "cache")
    assert isinstance(cache._open(), np.memmap)  # a file view, not an array in RAM
    blob = pickle.dumps(cache)
    assert len(blob) < 4096  # names and metadata only, not the N x S x S pixels
    clone = pickle.loads(blob)
    assert clone._images is None
    np.testing.assert_array_equal(clone[3], cache[3])


def test_matching_cache_is_reused_without_rebuilding(pngs, tmp_path, monkeypatch):
    first = _build(pngs, tmp_path / "cache")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cache that was up to date")

    monkeypatch.setattr(ImageCache, "_build", no_rebuild)
    again = _build(pngs, tmp_path / "cache")
    assert again.fingerprint == first.fingerprint


def test_changed_label_table_invalidates(pngs, tmp_path, caplog):
    paths, names = pngs
    old = _build(pngs, tmp_path / "cache", extra="table-v1")
    new_fp = compute_fingerprint(paths, names, SIZE, "table-v2")
    with pytest.raises(DataError, match="stale"):
        ImageCache.open(tmp_path / "cache", SIZE, fingerprint=new_fp)
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.cache"):
        rebuilt = _build(pngs, tmp_path / "cache", extra="table-v2")
    assert "label table changed" in caplog.text
    assert rebuilt.fingerprint == new_fp != old.fingerprint
    assert ImageCache.open(tmp_path / "cache", SIZE, fingerprint=new_fp).fingerprint == new_fp


def test_changed_size_or_image_invalidates(pngs, tmp_path, caplog):
    paths, names = pngs
    _build(pngs, tmp_path / "cache")
    # Another size lives in its own directory and does not match this one's fingerprint.
    with pytest.raises(DataError, match="stale"):
        ImageCache.open(tmp_path / "cache", SIZE, fingerprint=compute_fingerprint(paths, names, SIZE * 2, "table-v1"))
    bigger = _build(pngs, tmp_path / "cache", size=SIZE * 2)
    assert bigger.directory.name == f"{SIZE * 2}px" and bigger[0].shape == (SIZE * 2, SIZE * 2)
    # Rewriting an image (new content, new mtime) makes the cache stale.
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(paths[2])
    os.utime(paths[2], ns=(os.stat(paths[2]).st_atime_ns, os.stat(paths[2]).st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.cache"):
        rebuilt = _build(pngs, tmp_path / "cache")
    assert "image list, file sizes or modification times changed" in caplog.text
    assert (rebuilt[rebuilt.rows([names[2]])[0]] == 0).all()


def test_interrupted_build_leaves_no_usable_cache(pngs, tmp_path, monkeypatch):
    real = images.load_resized
    calls = []

    def dies_on_third(path, size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(path, size)

    monkeypatch.setattr(images, "load_resized", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _build(pngs, tmp_path / "cache")
    root = tmp_path / "cache"
    assert not (root / f"{SIZE}px").exists()
    assert list(root.iterdir()) == []  # the temporary directory is gone too
    with pytest.raises(DataError, match="No complete image cache"):
        ImageCache.open(root, SIZE)


def test_stale_temp_dir_of_a_dead_build_is_removed(pngs, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = root / f".{SIZE}px.building-{host}-{int(dead.stdout)}-abc123"
    alive = root / f".{SIZE}px.building-{host}-{os.getpid()}-def456"
    for d in (stale, alive):
        d.mkdir()
        (d / "images.npy").write_bytes(b"partial")
    _build(pngs, root)
    assert not stale.exists()
    assert alive.exists()  # a build still running on this host is left alone


def test_unreadable_image_fails_the_build_naming_it(pngs, tmp_path):
    paths, _ = pngs
    Path(paths[4]).write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)" + re.escape(paths[4]) + r".*data\.on_missing=skip"):
        _build(pngs, tmp_path / "cache")
    assert not (tmp_path / "cache" / f"{SIZE}px").exists()


def test_incomplete_or_inconsistent_directory_is_rebuilt(pngs, tmp_path, caplog):
    cache = _build(pngs, tmp_path / "cache")
    (cache.directory / "meta.json").unlink()
    with pytest.raises(DataError, match="No complete image cache"):
        ImageCache.open(tmp_path / "cache", SIZE)
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.cache"):
        rebuilt = _build(pngs, tmp_path / "cache")
    assert "unusable" in caplog.text and len(rebuilt) == len(pngs[0])


def test_unknown_names_are_reported(pngs, tmp_path):
    cache = _build(pngs, tmp_path / "cache")
    with pytest.raises(DataError, match=r"1 image\(s\) are not in the cache.*elsewhere\.png"):
        cache.rows([pngs[1][0], "elsewhere.png"])


def test_cache_root_is_per_dataset(tmp_path):
    a, b = tmp_path / "x" / "nih", tmp_path / "y" / "nih"
    assert cache_mod.cache_root(tmp_path / "c", a).parent == tmp_path / "c" / "images"
    assert cache_mod.cache_root(tmp_path / "c", a) != cache_mod.cache_root(tmp_path / "c", b)
    # Relative and absolute spellings of one folder share one cache.
    assert cache_mod.cache_root("c", a) == cache_mod.cache_root("c", os.path.relpath(a))


def test_command_line_builds_where_the_data_module_looks(tiny_demo, tmp_path, monkeypatch, capsys):
    from helpers import compose_config, tiny_overrides

    from cxr_lightning.cli import cache_main
    from cxr_lightning.tasks.build import instantiate

    # The Hydra entry point itself, in this process (a subprocess would spend seconds importing torch).
    monkeypatch.setattr(sys, "argv", [
        "cache", "data=nih", f"data.root={tiny_demo}", f"data.image_size={SIZE}",
        f"paths.cache_dir={tmp_path / 'cache'}", "workers=0", f"hydra.run.dir={tmp_path / 'run'}",
    ])
    cache_main()
    directory = cache_mod.cache_root(tmp_path / "cache", tiny_demo) / f"{SIZE}px"
    out = capsys.readouterr().out
    assert f"{directory}: " in out and f"images of {SIZE} px" in out

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the training data module did not find the cache the command line built")

    monkeypatch.setattr(ImageCache, "_build", classmethod(no_rebuild))
    cfg = compose_config(tiny_overrides(tiny_demo, tmp_path) + ["data.cache=true", f"data.image_size={SIZE}"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    assert dm.dataset("train").cache.directory == directory
