"""A lab's own data (``data=csv``): one CSV or Parquet table plus a folder of images.

``data.root`` is the image folder, ``data.table`` the table (a path relative to the root, or
absolute; ``.csv``, ``.csv.gz`` or ``.parquet``). ``data.columns`` names its columns:

- ``image`` (required): the image's path relative to the root (never outside it);
- ``patient`` (required): the patient identifier; splits are by patient;
- ``visit``: a date or a number that orders a patient's visits (blank: one visit per image, in
  table order);
- ``age`` (years), ``sex`` (M/F, Male/Female), ``view`` (PA, AP, LATERAL/L/LL/RL; blank counts
  as frontal); missing values are flagged missing, never imputed here;
- ``split``: train / val / test (valid, validation, validate are val); a blank cell leaves the
  image's patient to be drawn by ``data.val_fraction`` and ``data.test_fraction``;
- the labels, either ``labels``: one column of ``A|B`` strings, NIH style (an image is positive
  for the names it lists and negative for every other name of the table), or ``label_columns``:
  a list of columns coded 1 / 0 / -1 (uncertain) / blank, CheXpert style (blank: not mentioned,
  a negative, as CheXpert defines it).

The label names are the table's own. ``data.label_map`` maps an own name to a label of the run's
label space (``{"pleural fluid": "Effusion"}``, or a CheXpert spelling such as "Pleural
Effusion"); an unmapped name counts for the concept it spells, or, under ``labels=union``, is a
label of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from cxr_lightning.data.label_spaces import concept_of_label
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register
from cxr_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "csv"
COLUMN_KEYS = ("image", "patient", "visit", "age", "sex", "view", "split", "labels", "label_columns")
_SEXES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "validate": "val", "test": "test"}
_LATERAL = {"LATERAL", "L", "LL", "RL", "LAT"}
_FRONTAL = {"PA", "AP"}


@register
class CSVTable(Source):
    name = NAME
    title = "a lab's own table"
    hint = "data.columns.image holds paths relative to data.root; check both."
    options = ("table", "columns", "label_map")

    def __init__(
        self,
        root: str | Path,
        label_table: str = "auto",
        table: str | None = None,
        columns: Mapping[str, Any] | None = None,
        label_map: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(root, label_table)
        if not table:
            raise ConfigError("data=csv needs data.table=FILE: the CSV or Parquet table of the images below data.root.")
        self.table_path = Path(str(table)).expanduser()
        if not self.table_path.is_absolute():
            self.table_path = self.root / self.table_path
        self.columns = {k: v for k, v in dict(columns or {}).items() if v not in (None, "", [])}
        unknown = sorted(set(self.columns) - set(COLUMN_KEYS))
        if unknown:
            raise ConfigError(f"data.columns: unknown key(s) {unknown}; the keys are {list(COLUMN_KEYS)}.")
        for key in ("image", "patient"):
            if key not in self.columns:
                raise ConfigError(
                    f"data=csv needs data.columns.{key}=COLUMN (the {key} column of {self.table_path.name})."
                )
        if ("labels" in self.columns) == ("label_columns" in self.columns):
            raise ConfigError(
                "data=csv needs exactly one of data.columns.labels=COLUMN (one column of 'A|B' strings) "
                "or data.columns.label_columns=[COLUMN, ...] (one 1/0/-1/blank column per label)."
            )
        if "label_columns" in self.columns:
            listed = self.columns["label_columns"]
            if (
                isinstance(listed, str)
                or not isinstance(listed, Sequence)
                or not all(isinstance(c, str) for c in listed)
            ):
                raise ConfigError(f"data.columns.label_columns={listed!r}: expected a list of column names.")
            self.columns["label_columns"] = list(listed)
        self.label_map = {str(k): str(v) for k, v in dict(label_map or {}).items()}
        self.harmonisation: dict[str, tuple[str, ...]] = {}
        if "label_columns" in self.columns:  # known from the config; "A|B" names only once read
            self._harmonise(self.columns["label_columns"])

    def _harmonise(self, names: Sequence[str]) -> None:
        self.harmonisation = {n: (concept_of_label(self.label_map.get(n, n)),) for n in names}

    def concepts(self) -> list[str]:
        if not self.harmonisation:
            self._harmonise(_label_names(self._read_table()[self.columns["labels"]], self.table_path))
        return super().concepts()

    def _read_table(self) -> pd.DataFrame:
        path = self.table_path
        if not path.is_file():
            raise DataError(f"data.table={path} does not exist; point it at the CSV or Parquet table of your images.")
        needed = [v for k, v in self.columns.items() if k != "label_columns"] + self.columns.get("label_columns", [])
        if path.name.endswith(".parquet"):
            try:
                raw = pd.read_parquet(path)
            except ImportError:
                raise DataError(
                    f"{path}: reading Parquet needs pyarrow (pip install 'cxr-lightning[parquet]'), "
                    "or save the table as CSV."
                ) from None
            except Exception as exc:  # pyarrow's errors have no common base class worth naming here
                raise DataError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc}).") from None
            raw = raw.astype(object).where(raw.notna(), None).astype("string").astype(object)
            raw.columns = [str(c).strip() for c in raw.columns]
            missing = [c for c in needed if c not in raw.columns]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {missing} named in data.columns; present: {list(raw.columns)}."
                )
            if raw.empty:
                raise DataError(f"{path}: has no rows.")
            return raw
        return common.read_csv(path, needed, "image table named by data.columns")

    def read(self) -> common.SourceData:
        common.existing_dir(self.root, "image folder (data=csv)")
        path, cols = self.table_path, self.columns
        raw = self._read_table()
        image = raw[cols["image"]].astype("string").str.strip()
        common.reject(
            raw,
            image.isna() | (image == ""),
            path,
            f"an empty {cols['image']!r}",
            cols["patient"],
            "Every row names its image.",
        )
        unsafe = image.map(_unsafe_path)
        common.reject(
            raw,
            unsafe,
            path,
            f"an {cols['image']!r} that is absolute or leaves data.root",
            cols["image"],
            "Give each image's path relative to data.root.",
        )
        raw[cols["image"]] = image
        common.unique_names(raw, cols["image"], path)
        patient = raw[cols["patient"]].astype("string").str.strip()
        common.reject(
            raw,
            patient.isna() | (patient == ""),
            path,
            f"an empty {cols['patient']!r}",
            cols["image"],
            "Every image needs its patient: splits are by patient.",
        )

        findings = self._findings(raw, path)
        visit = self._visits(raw, patient, path)
        age = self._numbers(raw, "age", path)
        sex = (
            common.sex_codes(raw[cols["sex"]].astype("string").str.upper(), _SEXES)
            if "sex" in cols
            else pd.Series(np.nan, index=raw.index, dtype=object)
        )
        view = (
            raw[cols["view"]].astype("string").str.strip().str.upper()
            if "view" in cols
            else pd.Series(pd.NA, index=raw.index, dtype="string")
        )
        view = view.where(~view.isin(_LATERAL), "LATERAL")
        frontal = view.isna() | view.isin(_FRONTAL)
        split = None
        if "split" in cols:
            given = raw[cols["split"]].astype("string").str.strip().str.lower()
            split = given.map(_SPLITS)
            common.reject(
                raw,
                given.notna() & (given != "") & split.isna(),
                path,
                f"a {cols['split']!r} other than {sorted(set(_SPLITS))} or blank",
                cols["image"],
                "Fix those cells.",
            )
            split = split.astype(object)
        table = common.standard_table(
            raw,
            image=image,
            patient=patient.astype(str),
            visit=visit,
            age=age,
            sex=sex,
            view=view.astype(object).where(view.notna(), None),
            path=image.map(lambda p: str(self.root / p)),
            frontal=frontal.fillna(True),
            findings=findings,
            official_split=split,
            source=path.name,
        )
        return common.SourceData(table, path, list(findings.columns))

    def _findings(self, raw: pd.DataFrame, path: Path) -> pd.DataFrame:
        cols = self.columns
        if "label_columns" in cols:
            return common.label_codes(raw, cols["label_columns"], path, cols["image"])
        text = raw[cols["labels"]].astype("string").str.strip()
        common.reject(
            raw,
            text.isna() | (text == ""),
            path,
            f"an empty {cols['labels']!r}",
            cols["image"],
            "List each image's findings as 'A|B' (or the table's own word for none, such as 'No Finding').",
        )
        names = _label_names(text, path)
        self._harmonise(names)
        codes, uniques = pd.factorize(text)
        dummies = pd.Series(uniques).str.get_dummies(sep="|")
        dummies.columns = [c.strip() for c in dummies.columns]
        dummies = dummies.T.groupby(level=0).max().T.reindex(columns=names, fill_value=0)
        return pd.DataFrame(dummies.to_numpy(dtype=float)[codes], columns=names, index=raw.index)

    def _visits(self, raw: pd.DataFrame, patient: pd.Series, path: Path) -> pd.Series:
        if "visit" not in self.columns:
            return patient.groupby(patient).cumcount().astype("int64")
        col = self.columns["visit"]
        text = raw[col].astype("string").str.strip()
        number = pd.to_numeric(text, errors="coerce")
        if number.notna().sum() >= text.notna().sum():
            key = number
        else:
            key = (
                pd.to_datetime(text, errors="coerce")
                .astype("int64")
                .astype(float)
                .where(pd.to_datetime(text, errors="coerce").notna())
            )
        common.reject(
            raw,
            key.isna(),
            path,
            f"a {col!r} that is neither a number nor a date",
            self.columns["image"],
            "Give every image its visit (a date such as 2021-03-04, or a visit number).",
        )
        return common.visit_order(patient, key)

    def _numbers(self, raw: pd.DataFrame, key: str, path: Path) -> pd.Series:
        if key not in self.columns:
            return pd.Series(np.nan, index=raw.index, dtype=float)
        col = self.columns[key]
        text = raw[col].astype("string").str.strip()
        values = pd.to_numeric(text, errors="coerce")
        common.reject(
            raw,
            values.isna() & text.notna() & (text != ""),
            path,
            f"a {col!r} that is not a number",
            self.columns["image"],
            "Fix those cells or leave them blank (missing).",
        )
        return values.astype(float)

    def attach_paths(self, table: pd.DataFrame, on_missing: str) -> pd.DataFrame:
        return common.check_paths(table, self.root, on_missing, self.hint)


def _label_names(text: pd.Series, path: Path) -> list[str]:
    names = sorted({n.strip() for value in text.dropna().unique() for n in str(value).split("|") if n.strip()})
    if not names:
        raise DataError(f"{path}: the label column holds no label name.")
    return names


def _unsafe_path(value: Any) -> bool:
    if value is None or pd.isna(value):
        return False
    text = str(value).replace("\\", "/")
    pure = PurePosixPath(text)
    if not pure.parts:
        return False
    drive = ":" in pure.parts[0]  # C:/... on Windows
    return pure.is_absolute() or os.path.isabs(text) or drive or ".." in pure.parts
