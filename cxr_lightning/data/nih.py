"""The NIH ChestX-ray14 release on disk: label table, image files, official split lists, BBox list.

NIH has published the label table in three formats over the years; :func:`read_label_table`
turns any of them into one column contract (see docs/architecture.md) and rejects malformed
files with a :class:`DataError` that names the file, the rows and the columns at fault.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.labels import encode_labels

log = logging.getLogger(__name__)

NIH_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
LABEL_TABLE = "Data_Entry_2017_v2020.csv"
# Written beside the label table by the demo generator (data/demo), so logs name the table for what it is.
DEMO_MARKER = "DEMO_README.txt"
# In order of preference: v2020 carries NIH's 2020 relabelling of 181 images.
LABEL_TABLES = (LABEL_TABLE, "Data_Entry_2017.csv", "sample_labels.csv")
# Byte for byte, so that files written here read like NIH's (see _COLUMN_ALIASES for the split).
LABEL_TABLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_TABLE = "BBox_List_2017.csv"
BBOX_TABLE_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# NIH drew boxes for these eight findings only, and spells one of them differently.
BOX_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"
)
BBOX_SPELLINGS = {"Infiltrate": "Infiltration"}
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
# The released PNGs are this many pixels square, and the BBox list measures boxes in that space.
ORIGINAL_SIZE = 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

IMAGE, FINDING_LABELS, FOLLOW_UP, PATIENT = "Image Index", "Finding Labels", "Follow-up #", "Patient ID"
AGE, SEX, VIEW = "Patient Age", "Patient Gender", "View Position"
# The columns of a box table (read_bbox_table): one box per row, in ORIGINAL_SIZE pixels.
BOX_FINDING = "Finding Label"
BBOX_COLUMNS = (IMAGE, BOX_FINDING, "x", "y", "w", "h")
REQUIRED_COLUMNS = (IMAGE, FINDING_LABELS, FOLLOW_UP, PATIENT, AGE, SEX, VIEW)
# Acquisition geometry: informational only, so a table without it still loads (as NaN).
GEOMETRY_COLUMNS = (
    "OriginalImage Width",
    "OriginalImage Height",
    "OriginalImagePixelSpacing x",
    "OriginalImagePixelSpacing y",
)
COLUMNS = REQUIRED_COLUMNS + GEOMETRY_COLUMNS

# NIH's header "OriginalImage[Width,Height]" is unquoted, so CSV readers split it at the comma;
# the Kaggle sample spells the same columns with underscores.
_COLUMN_ALIASES = {
    "OriginalImage[Width": "OriginalImage Width",
    "Height]": "OriginalImage Height",
    "OriginalImagePixelSpacing[x": "OriginalImagePixelSpacing x",
    "y]": "OriginalImagePixelSpacing y",
    "OriginalImageWidth": "OriginalImage Width",
    "OriginalImageHeight": "OriginalImage Height",
    "OriginalImagePixelSpacing_x": "OriginalImagePixelSpacing x",
    "OriginalImagePixelSpacing_y": "OriginalImagePixelSpacing y",
    # Some copies of the v2020 table name the sex column "Patient Sex".
    "Patient Sex": "Patient Gender",
}
# Kaggle ages are strings such as "058Y", "011M", "005D".
_AGE_PATTERN = r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$"
_UNITS_PER_YEAR = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}
MAX_AGE = 100.0
_SHOW = 5  # how many offending rows an error message lists


def image_name(patient_id: int, number: int) -> str:
    """NIH's file name for image ``number`` (from 0) of patient ``patient_id`` (from 1)."""
    return f"{patient_id:08d}_{number:03d}.png"


def image_folder(k: int) -> str:
    """The folder that NIH's ``k``-th image archive (from 1) extracts to, relative to the root."""
    return f"images_{k:03d}/images"


def find_label_table(root: str | os.PathLike) -> Path:
    """The label table at ``root``, preferring the files of :data:`LABEL_TABLES` in that order."""
    root = _existing_dir(root)
    for name in LABEL_TABLES:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"no NIH label table in {root}. Put one of {list(LABEL_TABLES)} directly in that folder "
        f"(NIH's release at {NIH_URL} provides {LABEL_TABLES[0]}, {BBOX_TABLE}, {TRAIN_VAL_LIST}, "
        f"{TEST_LIST} and images_001.tar.gz ... images_012.tar.gz, which extract to "
        f"images_NNN/images/ below the same folder). The folder holds: {_listing(root)}"
    )


def read_label_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read any NIH label-table format into the column contract of docs/architecture.md."""
    path = Path(path)
    raw = _read_csv(path)
    raw.columns = [_COLUMN_ALIASES.get(c.strip(), c.strip()) for c in raw.columns]
    raw = _drop_blank_rows(raw)
    if raw.empty:
        raise DataError(f"{path}: has a header but no rows; expected one row per image.")
    raw = _drop_unnamed_columns(raw, path)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {missing}; present: {list(raw.columns)}. "
            f"Expected an NIH label table ({', '.join(LABEL_TABLES)})."
        )

    df = raw.copy()
    df[IMAGE] = df[IMAGE].str.strip()
    _reject(df, df[IMAGE].isna() | (df[IMAGE] == ""), path, f"rows without an {IMAGE}")
    duplicated = df[IMAGE].duplicated(keep=False)
    if duplicated.any():
        names = sorted(df.loc[duplicated, IMAGE].unique())
        raise DataError(
            f"{path}: {len(names)} {IMAGE} value(s) occur on more than one row: {names[:_SHOW]}; "
            "each image must have exactly one row."
        )
    df[FINDING_LABELS] = df[FINDING_LABELS].str.strip()
    _reject(
        df, df[FINDING_LABELS].isna() | (df[FINDING_LABELS] == ""), path, f"empty {FINDING_LABELS} (write 'No Finding')"
    )
    # Validates every finding name (DataError naming the images with unknown ones).
    encode_labels(df.set_index(IMAGE)[FINDING_LABELS], source=str(path))
    for col in (FOLLOW_UP, PATIENT):
        df[col] = _integers(df, col, path)
    df[AGE] = _ages(df, path)
    df[SEX] = df[SEX].str.strip().str.upper()
    df[VIEW] = df[VIEW].str.strip().str.upper()
    for col in GEOMETRY_COLUMNS:
        df[col] = _floats(df, col, path) if col in df.columns else float("nan")

    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra].reset_index(drop=True)
    df.attrs["source"] = path.name
    _log_table_choice(path, df)
    return df


def index_images(root: str | os.PathLike, names: Iterable[str] | None = None) -> pd.Series:
    """Map image file names to absolute paths, for PNG/JPEG files anywhere below ``root``.

    NIH's archives extract to ``images_001/images/`` ... ``images_012/images/``; any nesting
    works. Names match up to the extension, so a JPEG copy of the release works with NIH's
    ``.png`` table. With ``names``, the result is indexed by those names (only found ones);
    without, by the file names. The same name in two folders is a :class:`DataError`.
    """
    root = _existing_dir(root)
    top = os.path.abspath(root)  # so every dirpath below is absolute
    found_names: list[str] = []
    found_dirs: list[str] = []
    # followlinks: image folders are often symlinked in from a bigger disk.
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        # Hidden folders/files: editor checkpoints and macOS "._x.png" resource forks, not images.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        images = [f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
        found_names += images
        found_dirs += [dirpath] * len(images)

    files = pd.DataFrame({"name": found_names, "dir": found_dirs}, dtype=str)
    files["path"] = files["dir"] + os.sep + files["name"]
    files["stem"] = _stem(files["name"])
    if names is None:
        wanted = files.assign(key=files["name"])
    else:
        requested = pd.DataFrame({"key": pd.Series(list(names), dtype=str).drop_duplicates()})
        requested["stem"] = _stem(requested["key"])
        wanted = requested.merge(files, on="stem", how="inner")
    clash = wanted["stem"].duplicated(keep=False)
    if clash.any():
        pairs = wanted.loc[clash].sort_values("path").groupby("stem")["path"].agg(list)
        shown = "; ".join(" and ".join(p) for p in pairs.iloc[:_SHOW])
        raise DataError(
            f"{len(pairs)} image name(s) exist in more than one place below {root}: {shown}. "
            "Remove or move the copies so each image occurs once."
        )
    return pd.Series(wanted["path"].to_numpy(), index=pd.Index(wanted["key"], name=IMAGE), name="path")


def attach_paths(df: pd.DataFrame, root: str | os.PathLike, on_missing: str = "error") -> pd.DataFrame:
    """Copy of ``df`` with a ``path`` column; rows whose image is absent raise or are dropped.

    ``on_missing="skip"`` drops them with a warning (for partial downloads); the index is kept
    so the result still aligns with ``df``.
    """
    if on_missing not in ("error", "skip"):
        raise ConfigError(f"data.on_missing must be 'error' or 'skip', got {on_missing!r}.")
    source = df.attrs.get("source", "the label table")
    paths = index_images(root, df[IMAGE])
    out = df.copy()
    out["path"] = out[IMAGE].map(paths)
    missing = out["path"].isna()
    n_missing = int(missing.sum())
    if n_missing == 0:
        return out
    first = out.loc[missing, IMAGE].head(_SHOW).tolist()
    if n_missing == len(out):
        raise DataError(
            f"none of the {len(out)} images listed in {source} were found below {root} "
            f"(first: {first}). Extract NIH's images_001.tar.gz ... images_012.tar.gz there "
            "(they unpack to images_NNN/images/; any nesting works)."
        )
    if on_missing == "error":
        raise DataError(
            f"{n_missing} of {len(out)} images listed in {source} were not found below {root} "
            f"(first: {first}). Extract the missing archives there, or set data.on_missing=skip "
            "to use only the images present."
        )
    log.warning(
        "%d of %d images listed in %s were not found below %s and are skipped (data.on_missing=skip); "
        "first: %s",
        n_missing, len(out), source, root, first,
    )
    return out.loc[~missing]


def read_split_lists(root: str | os.PathLike) -> tuple[set[str], set[str]] | None:
    """NIH's official ``(train_val, test)`` image-name sets, or None if neither file exists."""
    root = _existing_dir(root)
    train_val_path, test_path = root / TRAIN_VAL_LIST, root / TEST_LIST
    present = [p for p in (train_val_path, test_path) if p.is_file()]
    if not present:
        return None
    if len(present) == 1:
        absent = ({train_val_path, test_path} - set(present)).pop()
        raise DataError(
            f"found {present[0]} but not {absent.name} in {root}: NIH's split is the pair of files. "
            f"Add {absent.name} (from {NIH_URL}) or remove {present[0].name} to use seeded patient splits."
        )
    train_val, test = _read_list(train_val_path), _read_list(test_path)
    both = sorted(train_val & test)
    if both:
        raise DataError(
            f"{len(both)} image(s) are in both {train_val_path} and {test_path}: {both[:_SHOW]}. "
            "An image belongs to one list only."
        )
    return train_val, test


def read_bbox_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``BBox_List_2017.csv``: columns Image Index, Finding Label (canonical), x, y, w, h.

    NIH's header ``Bbox [x,y,w,h],,,`` is unquoted, so the four box values are read by position.
    """
    path = Path(path)
    raw = _drop_blank_rows(_read_csv(path))
    names = [c.strip() for c in raw.columns]
    if len(names) < 6 or names[:2] != [IMAGE, "Finding Label"]:
        raise DataError(
            f"{path}: expected the NIH BBox list header 'Image Index,Finding Label,Bbox [x,y,w,h]' "
            f"(six values per row); found columns {names}."
        )
    if raw.empty:
        raise DataError(f"{path}: has a header but no rows.")
    extra = raw.iloc[:, 6:].notna().any(axis=1)
    _reject(raw, extra, path, "more than six values (Image Index, Finding Label, x, y, w, h)", name_col=0)
    box = raw.iloc[:, 2:6].apply(pd.to_numeric, errors="coerce").astype(float)
    box.columns = ["x", "y", "w", "h"]
    image = raw.iloc[:, 0].str.strip()
    label = raw.iloc[:, 1].str.strip()
    malformed = image.isna() | label.isna() | box.isna().any(axis=1) | (box["w"] <= 0) | (box["h"] <= 0)
    _reject(raw, malformed, path, "a missing name/label or a box that is not four numbers with w, h > 0",
            name_col=0)
    encode_labels(pd.Series(label.to_numpy(), index=image.to_numpy()), source=str(path), aliases=BBOX_SPELLINGS)
    label = label.replace(BBOX_SPELLINGS)
    out = pd.concat([image.rename(IMAGE), label.rename("Finding Label"), box], axis=1).reset_index(drop=True)
    out.attrs["source"] = path.name
    return out


# --- helpers -------------------------------------------------------------------------------------


def _existing_dir(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist; set data.root to the folder holding the NIH release.")
    if not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder; set data.root to the folder holding it.")
    return root


def _listing(root: Path, limit: int = 20) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        return "nothing (empty folder)"
    more = f" ... and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _read_csv(path: Path) -> pd.DataFrame:
    """All cells as strings (NaN when empty), blank lines kept so row i is file line i + 2."""
    try:
        return pd.read_csv(path, dtype=str, skip_blank_lines=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected a CSV file.") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; expected a CSV table with a header line.") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8 CSV (a spreadsheet's "
            "'CSV UTF-8' export, not UTF-16 or Latin-1 text), or extract it if it is a zip or gzip archive."
        ) from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} is not a well-formed CSV table: {str(exc).strip()}") from None


def _drop_blank_rows(raw: pd.DataFrame) -> pd.DataFrame:
    return raw.loc[raw.notna().any(axis=1)]


def _drop_unnamed_columns(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    # The 2017 table ends every line with a comma: an empty column without a header.
    unnamed = [c for c in raw.columns if c.startswith("Unnamed:") or c == ""]
    for col in unnamed:
        _reject(raw, raw[col].notna(), path, f"a value in a column without a header ({col!r})")
    return raw.drop(columns=unnamed)


def _describe_rows(frame: pd.DataFrame, mask: pd.Series, name_col: str | int = IMAGE) -> str:
    """``line N (image name)`` for the first offending rows; the index holds file positions."""
    rows = frame.loc[mask]
    if isinstance(name_col, int):
        names = rows.iloc[:, name_col]
    else:
        names = rows[name_col] if name_col in rows.columns else pd.Series(pd.NA, index=rows.index)
    shown = [
        f"line {i + 2}" + (f" ({n})" if isinstance(n, str) and n else "")
        for i, n in zip(rows.index[:_SHOW], names.iloc[:_SHOW])
    ]
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return ", ".join(shown) + more


def _reject(frame: pd.DataFrame, mask: pd.Series, path: Path, problem: str, name_col: str | int = IMAGE) -> None:
    if mask.any():
        raise DataError(f"{path}: {int(mask.sum())} row(s) with {problem}: {_describe_rows(frame, mask, name_col)}.")


def _integers(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[col].str.strip(), errors="coerce")
    bad = values.isna() | (values % 1 != 0)
    if bad.any():
        examples = df.loc[bad, col].head(_SHOW).tolist()
        _reject(df, bad, path, f"a {col!r} that is not an integer (values {examples})")
    return values.astype("int64")


def _floats(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    text = df[col].str.strip()
    values = pd.to_numeric(text, errors="coerce").astype(float)
    bad = values.isna() & text.notna() & (text != "")
    if bad.any():
        _reject(df, bad, path, f"a {col!r} that is not a number (values {df.loc[bad, col].head(_SHOW).tolist()})")
    return values


def _ages(df: pd.DataFrame, path: Path) -> pd.Series:
    """Float years; NaN when empty or above :data:`MAX_AGE` (typos of the 2017 table)."""
    text = df[AGE].str.strip()
    years = parse_ages(text)
    bad = years.isna() & text.notna() & (text != "")
    if bad.any():
        examples = df.loc[bad, AGE].head(_SHOW).tolist()
        _reject(df, bad, path, f"a {AGE!r} that is not a non-negative number of years "
                f"(or '058Y'/'011M'/'005D'; values {examples})")
    implausible = years > MAX_AGE
    if implausible.any():
        log.warning(
            "%s: %d age(s) above %g years treated as missing (e.g. %s); NIH's v2020 table corrected them.",
            path.name, int(implausible.sum()), MAX_AGE, _describe_rows(df, implausible),
        )
    return years.mask(implausible)


def parse_ages(text: pd.Series) -> pd.Series:
    """Ages as float years from plain numbers or NIH/DICOM age strings (``058Y``, ``011M``,
    ``003W``, ``005D``); NaN where a value is not one of those."""
    parts = text.astype("string").str.strip().str.upper().str.extract(_AGE_PATTERN)
    return parts[0].astype(float) / parts[1].map(_UNITS_PER_YEAR).astype(float)


def _stem(names: pd.Series) -> pd.Series:
    return names.str.replace(r"\.(png|jpe?g)$", "", case=False, regex=True)


def _read_list(path: Path) -> set[str]:
    try:
        names = set(path.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected one image name per line.") from None
    if not names:
        raise DataError(f"{path} is empty; expected one image name per line.")
    return names


def _log_table_choice(path: Path, df: pd.DataFrame) -> None:
    if any((path.parent / name).is_file() for name in (DEMO_MARKER, "demo.json")):
        note = "the generated demo's table: synthetic, not evidence about X-rays"
    elif path.name == LABEL_TABLES[0]:
        note = "NIH's 2020 revision, which relabelled 181 images"
    else:
        note = (f"older than {LABEL_TABLES[0]}, in which NIH relabelled 181 images; "
                f"put that file beside it to use the corrected labels")
    log.info("label table %s: %d images of %d patients (%s)", path, len(df), df[PATIENT].nunique(), note)
