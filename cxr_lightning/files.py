"""Atomic file writes: a reader never sees half a file and a crash never leaves a corrupt one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary file lives in the same directory so that ``os.replace`` is an atomic rename.
    On any exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    # numpy / torch scalars and paths appear in metric dicts; NaN stays NaN (json allows it).
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: fingerprints label tables for caches and reports."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A spreadsheet reads a cell starting with one of these as a formula (CSV injection): a label,
# file or group name from someone else's file must stay text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run as a formula; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def write_csv(frame: Any, path: str | os.PathLike, index: bool = False) -> Path:
    """``frame.to_csv`` written atomically, every text cell, header and index value through :func:`csv_cell`."""
    safe = frame.rename(columns=csv_cell)
    if index:
        safe = safe.rename(index=csv_cell)
    from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_numeric_dtype

    text_columns = [
        c for c in safe.columns
        if not (is_numeric_dtype(safe[c]) or is_bool_dtype(safe[c]) or is_datetime64_any_dtype(safe[c]))
    ]
    for column in text_columns:
        safe[column] = safe[column].map(csv_cell, na_action="ignore")
    with atomic_path(path) as tmp:
        safe.to_csv(tmp, index=index)
    return Path(path)
