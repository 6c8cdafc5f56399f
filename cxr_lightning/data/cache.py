"""A uint8 memory-mapped cache of resized images: decode the 112k PNGs once, not every epoch.

Layout of one cache (one per image size)::

    <cache_root>/<size>px/images.npy   (N, size, size) uint8, opened with mmap_mode="r"
    <cache_root>/<size>px/index.json   image names ("Image Index"), row order
    <cache_root>/<size>px/meta.json    fingerprint and what it was computed from

The fingerprint covers the image list (names, file sizes, mtimes), the size, the resize method
and a caller-supplied string (the label table's hash), so a cache is never reused for other
images. A build writes into a temporary directory beside the target and renames it into place
at the end: an interrupted build leaves no usable cache, and its leftovers are removed by the
next build.

The caches of one dataset live under ``cache_root(paths.cache_dir, data.root)``, which the data
module and the command line both use. Build one ahead of training (otherwise the data module's
``prepare_data`` builds it on first use) with the same data options as the run::

    python -m cxr_lightning.cache data=nih data.root=DIR data.image_size=320 [workers=16]
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import Progress

from cxr_lightning import files
from cxr_lightning.data import images
from cxr_lightning.errors import DataError
from cxr_lightning.progress import Progress as LogProgress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES_FILE, INDEX_FILE, META_FILE = "images.npy", "index.json", "meta.json"
BUILD_HINT = (
    "`python -m cxr_lightning.cache` and the run's data options "
    "(e.g. data=nih data.root=DIR data.image_size=N)"
)
_CHUNK = 64  # images per worker task: large enough to amortise IPC, small enough for a live progress bar


class ImageCache:
    """Read-only view of a built cache. Rows are read lazily from the memory map, which each
    process opens for itself (the array is never pickled into dataloader workers)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        meta_path, index_path = self.directory / META_FILE, self.directory / INDEX_FILE
        if not (meta_path.is_file() and index_path.is_file() and (self.directory / IMAGES_FILE).is_file()):
            raise DataError(
                f"No complete image cache in {self.directory}; build it with {BUILD_HINT}, "
                f"or set data.cache=false."
            )
        self.meta: dict = json.loads(meta_path.read_text())
        self.names: list[str] = json.loads(index_path.read_text())
        self.size: int = int(self.meta["size"])
        self.fingerprint: str = self.meta["fingerprint"]
        self._rows = pd.Index(self.names)
        self._images: np.memmap | None = None
        self._pid: int | None = None
        shape = self._open().shape
        if shape != (len(self.names), self.size, self.size):
            raise DataError(
                f"Image cache {self.directory} is inconsistent: images.npy has shape {shape} but the index "
                f"lists {len(self.names)} images of {self.size} px. Delete the directory to rebuild it."
            )

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, row: int) -> np.ndarray:
        """Image ``row`` as a ``(size, size)`` uint8 array (a copy: safe to hand to torch)."""
        return np.array(self._open()[row])

    def rows(self, names: Sequence[str] | pd.Series) -> np.ndarray:
        """Cache rows of the given image names; :class:`DataError` if any is not in the cache."""
        rows = self._rows.get_indexer(pd.Index(names))
        missing = rows < 0
        if missing.any():
            absent = list(pd.Index(names)[missing][:5])
            raise DataError(
                f"{int(missing.sum())} image(s) are not in the cache {self.directory}, e.g. {absent}. "
                f"The cache was built for other images: delete it to rebuild, or set data.cache=false."
            )
        return rows.astype(np.int64)

    def _open(self) -> np.memmap:
        # Reopen after fork/spawn: each dataloader worker maps the file itself.
        if self._images is None or self._pid != os.getpid():
            self._images = np.load(self.directory / IMAGES_FILE, mmap_mode="r")
            self._pid = os.getpid()
        return self._images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        state["_pid"] = None
        return state

    # -- finding / building ----------------------------------------------------------------------
    @staticmethod
    def directory_for(cache_root: str | os.PathLike, size: int) -> Path:
        return Path(cache_root) / f"{int(size)}px"

    @classmethod
    def open(cls, cache_root: str | os.PathLike, size: int, fingerprint: str | None = None) -> ImageCache:
        """Open the cache for ``size``; with ``fingerprint``, refuse (:class:`DataError`) a stale one."""
        cache = cls(cls.directory_for(cache_root, size))
        if fingerprint is not None and cache.fingerprint != fingerprint:
            raise DataError(
                f"Image cache {cache.directory} is stale (its fingerprint differs from the data's); "
                f"rebuild it with {BUILD_HINT}."
            )
        return cache

    def why_stale(self, parts: dict) -> str:
        """Which of the fingerprint's inputs (see :func:`fingerprint_parts`) differ from this cache's."""
        old = self.meta.get("parts", {})
        changed = [k for k in parts if old.get(k) != parts[k]]
        labels = {
            "version": "cache format changed",
            "resize": "resize method changed",
            "size": "image size changed",
            "n_images": f"number of images changed ({old.get('n_images')} -> {parts['n_images']})",
            "images": "image list, file sizes or modification times changed",
            "extra": "label table changed (fingerprint_extra)",
        }
        return "; ".join(labels.get(k, k) for k in changed) or "fingerprint differs"

    @classmethod
    def get_or_build(
        cls,
        paths: Sequence[str],
        names: Sequence[str],
        size: int,
        cache_root: str | os.PathLike,
        fingerprint_extra: str = "",
        workers: int = 0,
    ) -> ImageCache:
        """The cache for these images at ``size``: reused when its fingerprint matches, otherwise
        (missing, stale, incomplete) rebuilt, with the reason logged."""
        parts = fingerprint_parts(paths, names, size, fingerprint_extra)
        fingerprint = _combine(parts)
        directory = cls.directory_for(cache_root, size)
        try:
            cache = cls(directory)
        except (DataError, OSError, ValueError, KeyError) as exc:
            reason = "it does not exist yet" if not directory.exists() else f"the existing one is unusable ({exc})"
        else:
            if cache.fingerprint == fingerprint:
                log.info("Using image cache %s (%d images, %d px)", directory, len(cache), size)
                return cache
            reason = f"the existing one is stale: {cache.why_stale(parts)}"
        log.warning("Building image cache %s because %s.", directory, reason)
        return cls._build(paths, names, size, cache_root, parts, workers)

    @classmethod
    def _build(cls, paths, names, size, cache_root, parts: dict, workers: int) -> ImageCache:
        paths, names = [str(p) for p in paths], [str(n) for n in names]
        if len(paths) != len(names):
            raise ValueError(f"{len(paths)} paths but {len(names)} names")
        duplicated = pd.Index(names)[pd.Index(names).duplicated()]
        if len(duplicated):
            raise DataError(f"Duplicate image names cannot be cached: {list(duplicated[:5])}")
        target = cls.directory_for(cache_root, size)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        owner = f"{socket.gethostname()}-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target) + owner))
        try:
            npy = tmp / IMAGES_FILE
            np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(paths), size, size)).flush()
            failures = _decode_all(npy, paths, size, workers)
            if failures:
                listing = "\n".join(f"  {msg}" for _, msg in failures[:10])
                raise DataError(
                    f"{len(failures)} image(s) could not be cached:\n{listing}\nReplace them, or run with "
                    f"data.on_missing=skip data.verify_images=true to leave them out."
                )
            files.write_json(tmp / INDEX_FILE, names)
            # meta.json last: its presence marks a complete cache.
            files.write_json(tmp / META_FILE, {"fingerprint": _combine(parts), "parts": parts, "size": int(size)})
            try:
                _replace_dir(tmp, target)
            except OSError:
                # Another process (e.g. a second DDP rank) renamed its identical build in first.
                if _fingerprint_at(target) != _combine(parts):
                    raise
                log.info("Another process finished the same cache first; using %s", target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("Built image cache %s (%d images, %d px)", target, len(paths), size)
        return cls(target)


# ------------------------------------------------------------------------------------------------
def fingerprint_parts(paths: Sequence[str], names: Sequence[str], size: int, extra: str = "") -> dict:
    """What a cache's fingerprint is computed from (kept separately so staleness can be explained)."""
    digest = hashlib.sha256()
    for name, path in zip(names, paths, strict=True):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"Cannot cache image {path}: {exc.strerror or exc}.") from exc
        digest.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {
        "version": FORMAT_VERSION,
        "resize": images.RESIZE_METHOD,
        "size": int(size),
        "n_images": len(paths),
        "images": digest.hexdigest(),
        "extra": str(extra),
    }


def _fingerprint_at(directory: Path) -> str | None:
    try:
        return json.loads((directory / META_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def compute_fingerprint(paths: Sequence[str], names: Sequence[str], size: int, extra: str = "") -> str:
    """The fingerprint a cache of these images must carry to be reused (see :meth:`ImageCache.open`)."""
    return _combine(fingerprint_parts(paths, names, size, extra))


def _combine(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, _CHUNK):
        yield start, min(start + _CHUNK, n)


def _decode_all(npy: Path, paths: list[str], size: int, workers: int) -> list[tuple[str, str]]:
    failures: list[tuple[str, str]] = []
    # The bar for a terminal, the lines for a log file.
    lines = LogProgress(f"image cache ({size} px)", len(paths), log)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"Caching {len(paths)} images at {size} px", total=len(paths))
        if workers <= 0:
            for start, stop in _chunks(len(paths)):
                failures += _decode_chunk(npy, start, paths[start:stop], size)
                progress.advance(task, stop - start)
                lines.advance(stop - start)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {
                    pool.submit(_decode_chunk, npy, start, paths[start:stop], size): stop - start
                    for start, stop in _chunks(len(paths))
                }
                try:
                    for future in as_completed(futures):
                        failures += future.result()
                        progress.advance(task, futures[future])
                        lines.advance(futures[future])
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    lines.done()
    return failures


def _decode_chunk(npy: Path, start: int, paths: list[str], size: int) -> list[tuple[str, str]]:
    """Decode ``paths`` into rows ``start...`` of the cache file; runs in a worker process, which
    maps the file itself, so only paths and error messages cross the process boundary."""
    out = np.load(npy, mmap_mode="r+")
    failures = []
    for offset, path in enumerate(paths):
        try:
            out[start + offset] = images.load_resized(path, size)
        except DataError as exc:
            failures.append((path, str(exc)))
    out.flush()
    del out
    return failures


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.building-"


def _remove_stale_temps(target: Path) -> None:
    """Remove temp dirs of builds that died (killed before their own cleanup ran). A temp dir of a
    live build on this host, or of another host sharing the file system, is left alone."""
    host = socket.gethostname()
    for tmp in target.parent.glob(_temp_prefix(target) + "*"):
        owner = tmp.name[len(_temp_prefix(target)):].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _pid_alive(int(owner[1])):
            log.warning("Removing %s, left by an interrupted cache build.", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(src: Path, target: Path) -> None:
    # rename(2) cannot replace a non-empty directory: move the old one aside first. In between,
    # readers find no cache (and rebuild or fail clearly), never a half-written one.
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class SourceCaches:
    """A pooled run's caches, one per source (each beside its own dataset's other sizes): rows are
    ``(source, Image Index)`` pairs, since two sources may use the same image names."""

    def __init__(self, caches: dict[str, ImageCache]) -> None:
        sizes = {c.size for c in caches.values()}
        if len(sizes) != 1:
            raise DataError(
                f"Pooled image caches of different sizes {sorted(sizes)}; rebuild them at one data.image_size."
            )
        self.caches = dict(caches)
        self._order = list(self.caches)
        self.size = sizes.pop()
        self.directory = ", ".join(str(c.directory) for c in self.caches.values())

    def rows(self, keys: Sequence[tuple[str, str]]) -> np.ndarray:
        """``(N, 2)``: the cache number and row of each ``(source, name)`` pair."""
        keys = list(keys)
        out = np.zeros((len(keys), 2), dtype=np.int64)
        sources = np.array([k[0] for k in keys], dtype=object)
        names = np.array([k[1] for k in keys], dtype=object)
        for i, source in enumerate(self._order):
            mask = sources == source
            if mask.any():
                out[mask, 0] = i
                out[mask, 1] = self.caches[source].rows(list(names[mask]))
        unknown = ~np.isin(sources, self._order)
        if unknown.any():
            raise DataError(f"No image cache for source(s) {sorted(set(sources[unknown]))}; rebuild the caches.")
        return out

    def __getitem__(self, row: Any) -> np.ndarray:
        cache, index = (int(v) for v in row)
        return self.caches[self._order[cache]][index]


# ------------------------------------------------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike, data_root: str | os.PathLike) -> Path:
    """Where the caches (one per size) of the dataset at ``data_root`` live:
    ``cache_dir/images/<readable tail of data_root's absolute path>-<hash of all of it>``, so two
    datasets never share a directory. The data module and the command line both use this."""
    absolute = str(Path(data_root).expanduser().resolve())
    readable = "".join(c if c.isalnum() else "_" for c in absolute.strip("/"))[-60:]
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / "images" / f"{readable}-{digest}"
