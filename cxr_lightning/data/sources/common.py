"""What every external source's reader shares: the standard table it returns, CSV reading with
named errors, label codes, visit order, and the check that the listed images exist.

The standard table has NIH's column contract (``nih.read_label_table``: Image Index, Finding
Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position) plus:

- ``path``: the image file (absolute), built from the publisher's path convention;
- ``frontal``: True for frontal (PA/AP) images, whose view may still be unknown (NaN); the others
  are left out of a run and counted;
- ``finding:<finding>``: 1.0 positive, 0.0 negative, -1.0 uncertain (CheXpert labeller), one
  column per finding of the source's harmonisation (see :mod:`cxr_lightning.data.label_spaces`);
- ``official_split``: ``train``/``val``/``test`` where the publisher assigns one, else NaN.

Missing ages, sexes and views are NaN (flagged as missing in the metadata, never imputed here).
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data import images, nih
from cxr_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FINDING_PREFIX = "finding:"
FRONTAL = "frontal"
OFFICIAL_SPLIT = "official_split"
FRONTAL_VIEWS = ("PA", "AP")
UNCERTAIN = -1.0
_SHOW = 5


@dataclass
class SourceData:
    """A source's files read into the standard table (see the module docstring)."""

    table: pd.DataFrame
    label_table: Path  # the main labels file: named in reports, hashed into the cache fingerprint
    available: list[str]  # the NIH labels it gives, one ``finding:`` column each
    left_out: dict[str, int] = field(default_factory=dict)  # rows the reader could not use, by reason


def existing_dir(root: str | os.PathLike, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data root {root} {state}; set data.root to the folder holding the {what} download.")
    return root


def find_file(root: Path, names: Sequence[str], what: str, required: bool = True) -> Path | None:
    """The first of ``names`` (each tried as given and with ``.gz``) that exists in ``root``."""
    for name in names:
        for candidate in (name, name + ".gz") if not name.endswith(".gz") else (name,):
            if (root / candidate).is_file():
                return root / candidate
    if not required:
        return None
    listing = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "nothing"
    raise DataError(f"no {what} in {root}: expected one of {list(names)} (or .gz). The folder holds: {listing}.")


def read_csv(path: Path, required: Iterable[str], what: str) -> pd.DataFrame:
    """``path`` (.csv or .csv.gz) with every cell a string, blank rows dropped, ``required`` columns checked.

    The index keeps file positions, so row ``i`` is line ``i + 2`` in error messages.
    """
    try:
        raw = pd.read_csv(path, dtype=str, skip_blank_lines=False, encoding="utf-8-sig", low_memory=False)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; expected the {what} with its header line.") from None
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); download it again.") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); is it the {what} as published?") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} is not a well-formed CSV table: {str(exc).strip()}") from None
    raw.columns = [c.strip() for c in raw.columns]
    raw = raw.loc[raw.notna().any(axis=1)]
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} of the {what}; present: {list(raw.columns)}.")
    if raw.empty:
        raise DataError(f"{path}: has a header but no rows; expected the {what}.")
    return raw


def describe_rows(frame: pd.DataFrame, mask: pd.Series, name_col: str) -> str:
    """``line N (name)`` for the first rows of ``mask``; the index holds file positions."""
    rows = frame.loc[mask]
    shown = [f"line {int(i) + 2} ({n})" for i, n in zip(rows.index[:_SHOW], rows[name_col].iloc[:_SHOW])]
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return ", ".join(shown) + more


def reject(frame: pd.DataFrame, mask: pd.Series, path: Path, problem: str, name_col: str, fix: str) -> None:
    """DataError naming the file, the rows of ``mask`` and what to do, if any row is in ``mask``."""
    if mask.any():
        raise DataError(
            f"{path}: {int(mask.sum())} row(s) with {problem}: {describe_rows(frame, mask, name_col)}. {fix}"
        )


def unique_names(frame: pd.DataFrame, col: str, path: Path) -> None:
    duplicated = frame[col].duplicated(keep=False)
    reject(
        frame,
        duplicated,
        path,
        f"a {col} that occurs on more than one row",
        col,
        "Each image must have exactly one row.",
    )


def label_codes(frame: pd.DataFrame, columns: Sequence[str], path: Path, name_col: str) -> pd.DataFrame:
    """CheXpert-labeller codes as floats: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain;
    a blank cell (the finding is not mentioned in the report) is a negative, as CheXpert defines it."""
    out = {}
    for col in columns:
        text = frame[col].str.strip()
        values = pd.to_numeric(text, errors="coerce")
        bad = (values.isna() & text.notna() & (text != "")) | (values.notna() & ~values.isin((1.0, 0.0, -1.0)))
        reject(
            frame,
            bad,
            path,
            f"a {col!r} that is not 1.0, 0.0, -1.0 or blank (values {frame.loc[bad, col].head(_SHOW).tolist()})",
            name_col,
            "Fix those cells or use the file as published.",
        )
        out[col] = values.fillna(0.0).astype(float)
    return pd.DataFrame(out, index=frame.index)


def visit_order(patients: pd.Series, *keys: pd.Series) -> pd.Series:
    """0-based visit number of each row within its patient, by ``keys`` (e.g. date, time): rows with
    equal keys are one visit (one study), so they share a number."""
    frame = pd.DataFrame(
        {"patient": patients.to_numpy(), **{f"k{i}": k.to_numpy() for i, k in enumerate(keys)}}, index=patients.index
    )
    key_cols = [f"k{i}" for i in range(len(keys))]
    studies = frame.drop_duplicates().sort_values(["patient", *key_cols], kind="stable")
    studies["visit"] = studies.groupby("patient", sort=False).cumcount()
    return frame.merge(studies, on=["patient", *key_cols], how="left")["visit"].set_axis(frame.index).astype("int64")


def finding_string(findings: pd.DataFrame) -> pd.Series:
    """NIH's ``A|B`` string of the positive findings (``finding:`` columns) per row; ``No Finding``
    where none is positive, as NIH writes it."""
    names = [c.removeprefix(FINDING_PREFIX) for c in findings.columns]
    positive = findings.to_numpy() == 1.0
    joined = ["|".join(n for n, p in zip(names, row) if p and n != "No Finding") for row in positive]
    return pd.Series([j or "No Finding" for j in joined], index=findings.index, dtype=object)


def sex_codes(values: pd.Series, spellings: dict[str, str]) -> pd.Series:
    """``M``/``F`` from a publisher's spellings; anything else (unknown, other, blank) is NaN."""
    return values.str.strip().map(spellings).astype(object)


def standard_table(
    frame: pd.DataFrame,
    image: pd.Series,
    patient: pd.Series,
    visit: pd.Series,
    age: pd.Series,
    sex: pd.Series,
    view: pd.Series,
    path: pd.Series | None,
    frontal: pd.Series,
    findings: pd.DataFrame,
    official_split: pd.Series | None,
    source: str,
) -> pd.DataFrame:
    """Assemble the standard table (module docstring) from per-row series aligned with ``frame``;
    ``path=None`` for a source whose images are found by name (NIH's images, see the registry)."""
    ages = age.astype(float)
    implausible = (ages < 0) | (ages > nih.MAX_AGE)
    if implausible.any():
        log.warning("%s: %d age(s) outside 0-%g years treated as missing", source, int(implausible.sum()), nih.MAX_AGE)
    finding_cols = findings.add_prefix(FINDING_PREFIX)
    table = pd.DataFrame(
        {
            nih.IMAGE: image.astype(str),
            nih.FINDING_LABELS: finding_string(finding_cols),
            nih.FOLLOW_UP: visit.astype("int64"),
            nih.PATIENT: patient,
            nih.AGE: ages.mask(implausible),
            nih.SEX: sex,
            nih.VIEW: view.where(view.notna(), None).astype(object),
            "path": path.astype(str) if path is not None else np.nan,
            FRONTAL: frontal.astype(bool).to_numpy(),
            OFFICIAL_SPLIT: official_split if official_split is not None else np.nan,
        },
        index=frame.index,
    )
    table = pd.concat([table, finding_cols], axis=1).reset_index(drop=True)
    table.attrs["source"] = source
    return table


def check_paths(table: pd.DataFrame, root: Path, on_missing: str, hint: str) -> pd.DataFrame:
    """``table`` without rows whose ``path`` is absent (``on_missing=skip``), or a DataError naming them."""
    if on_missing not in ("error", "skip"):
        raise ConfigError(f"data.on_missing must be 'error' or 'skip', got {on_missing!r}.")
    exists = np.fromiter((os.path.isfile(p) for p in table["path"]), dtype=bool, count=len(table))
    missing = ~exists
    if not missing.any():
        return table
    first = table.loc[missing, "path"].head(_SHOW).tolist()
    source = table.attrs.get("source", "the label table")
    if missing.all():
        raise DataError(
            f"none of the {len(table)} images listed in {source} were found below {root} (first: {first}). {hint}"
        )
    if on_missing == "error":
        raise DataError(
            f"{int(missing.sum())} of {len(table)} images listed in {source} were not found below {root} "
            f"(first: {first}). {hint} Or set data.on_missing=skip to use only the images present."
        )
    log.warning(
        "%d of %d images listed in %s were not found below %s and are skipped (data.on_missing=skip); first: %s",
        int(missing.sum()),
        len(table),
        source,
        root,
        first,
    )
    out = table.loc[exists].reset_index(drop=True)
    out.attrs.update(table.attrs)
    return out


def dicom_demographics(paths: pd.Series, source: str) -> pd.DataFrame:
    """Age, sex and view from the DICOM headers of the images present (NaN for the others): for
    sources whose label tables carry no demographics (VinDr-CXR, RSNA Pneumonia)."""

    def one(path: str) -> dict:
        if not Path(path).is_file():
            return {"age": None, "sex": None, "view": None}
        try:
            header = images.read_dicom_header(path)
        except DataError as exc:  # an unreadable header: the image itself is refused when decoded
            log.debug("%s", exc)
            return {"age": None, "sex": None, "view": None}
        return {k: header[k] for k in ("age", "sex", "view")}

    with ThreadPoolExecutor(max_workers=4) as pool:  # file I/O: threads overlap the reads
        rows = list(pool.map(one, paths.tolist()))
    out = pd.DataFrame(rows, index=paths.index, columns=["age", "sex", "view"])
    present = out.notna().any(axis=1).sum()
    if present:
        log.info("%s: age, sex and view from %d DICOM header(s)", source, int(present))
    return out
