"""Property test of the label-table parser: any corruption of a real NIH table is either read into the
column contract or rejected with the framework's own error naming the file, never an unhandled
exception from deep inside pandas."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from helpers import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr_lightning.data import nih
from cxr_lightning.errors import CXRError
from cxr_lightning.labels import ALL_LABELS

SOURCE = FIXTURES / "nih" / "Data_Entry_2017_v2020.csv"
# The fixture is unquoted CSV, so plain splitting on commas reads it (independently of the parser).
HEADER, *ROWS = [line.split(",") for line in SOURCE.read_text().splitlines()]
N_COLS = len(HEADER)
AGE_COL = HEADER.index("Patient Age")
LABEL_COL = HEADER.index("Finding Labels")

cell_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=",\n\r"), max_size=12)
row_index = st.integers(0, len(ROWS) - 1)


# --- corruptions of the table (header + rows of cells) --------------------------------------------


@st.composite
def drop_column(draw, header, rows):
    col = draw(st.integers(0, len(header) - 1))
    return header[:col] + header[col + 1 :], [r[:col] + r[col + 1 :] for r in rows]


@st.composite
def extra_column(draw, header, rows):
    name = draw(st.sampled_from(["Notes", "", "Image Index", "Unnamed: 3", "Patient Age"]))
    values = draw(st.lists(cell_text, min_size=len(rows), max_size=len(rows)))
    return header + [name], [r + [v] for r, v in zip(rows, values)]


@st.composite
def bad_ages(draw, header, rows):
    if AGE_COL >= len(header) or header[AGE_COL] != "Patient Age":
        return header, rows
    rows = [list(r) for r in rows]
    values = st.one_of(
        st.sampled_from(["abc", "-5", "1e400", "", " ", "150", "058Y", "011M", "5D", "3W", "NaN", "inf", "0x10"]),
        cell_text,
    )
    for i in draw(st.lists(row_index, min_size=1, max_size=5)):
        if i < len(rows) and AGE_COL < len(rows[i]):
            rows[i][AGE_COL] = draw(values)
    return header, rows


@st.composite
def unknown_labels(draw, header, rows):
    rows = [list(r) for r in rows]
    values = st.one_of(
        st.sampled_from(["Pneumonitis", "cardiomegaly", "", "Mass||Nodule", "Mass|", "No Finding|Mass", " Mass "]),
        cell_text,
    )
    for i in draw(st.lists(row_index, min_size=1, max_size=5)):
        if i < len(rows) and LABEL_COL < len(rows[i]):
            rows[i][LABEL_COL] = draw(values)
    return header, rows


@st.composite
def random_cells(draw, header, rows):
    rows = [list(r) for r in rows]
    for _ in range(draw(st.integers(1, 6))):
        i = draw(row_index)
        if i < len(rows) and rows[i]:
            rows[i][draw(st.integers(0, len(rows[i]) - 1))] = draw(cell_text)
    return header, rows


@st.composite
def duplicate_rows(draw, header, rows):
    picks = draw(st.lists(row_index, min_size=1, max_size=3))
    return header, rows + [rows[i] for i in picks if i < len(rows)]


@st.composite
def ragged_rows(draw, header, rows):
    """Lines with cells missing or one too many (a truncated or mis-joined line)."""
    rows = [list(r) for r in rows]
    for i in draw(st.lists(row_index, min_size=1, max_size=3)):
        if i < len(rows):
            rows[i] = rows[i][: draw(st.integers(0, len(rows[i])))] + draw(st.lists(cell_text, max_size=2))
    return header, rows


@st.composite
def fewer_rows(draw, header, rows):
    header_only = draw(st.sampled_from([False] * 5 + [True]))
    return header, [] if header_only else rows[: draw(st.integers(1, max(1, len(rows))))]


TABLE_CORRUPTIONS = [
    drop_column, extra_column, bad_ages, unknown_labels, random_cells, duplicate_rows, ragged_rows, fewer_rows
]


@st.composite
def corrupted_table(draw) -> bytes:
    header, rows = list(HEADER), [list(r) for r in ROWS]
    for corruption in draw(st.lists(st.sampled_from(TABLE_CORRUPTIONS), max_size=3)):
        header, rows = draw(corruption(header, rows))
    text = "\n".join(",".join(cells) for cells in [header] + rows) + draw(st.sampled_from(["\n", "", "\n\n", "\r\n"]))
    encoding = draw(st.sampled_from(["utf-8"] * 4 + ["utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    if encoding not in ("utf-8", "utf-8-sig") and draw(st.booleans()):
        text = text.replace("M,PA", "M,PÄ", 1)  # a non-ASCII character, as a spreadsheet export might add
    data = text.encode(encoding, errors="replace")
    return draw(byte_corruption(data))


@st.composite
def byte_corruption(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none"] * 6 + ["truncate", "flip", "insert", "garbage", "empty"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if kind == "garbage":
        return draw(st.binary(max_size=2000))
    if kind == "empty":
        return b""
    return data


# --- the property ---------------------------------------------------------------------------------


def check_contract(df: pd.DataFrame, path: Path, written: str) -> None:
    assert list(df.columns[: len(nih.COLUMNS)]) == list(nih.COLUMNS)
    assert len(df) > 0
    assert df.attrs["source"] == path.name
    names = df[nih.IMAGE]
    assert names.notna().all() and (names.str.len() > 0).all() and names.is_unique
    assert all(name in written for name in names)  # every row comes from the file
    assert pd.api.types.is_integer_dtype(df[nih.FOLLOW_UP]) and pd.api.types.is_integer_dtype(df[nih.PATIENT])
    ages = df[nih.AGE]
    assert pd.api.types.is_float_dtype(ages)
    assert ((ages >= 0) & (ages <= nih.MAX_AGE) | ages.isna()).all()
    # "Mass||Nodule" (an empty name between separators) reads as Mass and Nodule; no name is unknown.
    findings = set(df[nih.FINDING_LABELS].str.split("|").explode()) - {""}
    assert findings and findings <= set(ALL_LABELS), findings - set(ALL_LABELS)
    for col in nih.GEOMETRY_COLUMNS:
        assert pd.api.types.is_float_dtype(df[col])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=corrupted_table())
def test_corrupted_table_is_read_or_rejected_with_a_data_error_naming_the_file(tmp_path, data):
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_bytes(data)
    try:
        df = nih.read_label_table(path)
    except CXRError as exc:
        assert str(path) in str(exc), str(exc)
        return
    check_contract(df, path, data.decode("utf-8", errors="replace"))


def test_uncorrupted_fixture_satisfies_the_contract(tmp_path):
    # Positive control: the property's checks accept a good table and would see a wrong one.
    path = tmp_path / SOURCE.name
    path.write_bytes(SOURCE.read_bytes())
    df = nih.read_label_table(path)
    check_contract(df, path, SOURCE.read_text())
    assert len(df) == len(ROWS)
    with pytest.raises(AssertionError):
        check_contract(df.assign(**{nih.AGE: 150.0}), path, SOURCE.read_text())


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_table_in_another_encoding_is_rejected_with_what_to_save_it_as(tmp_path, encoding):
    path = tmp_path / SOURCE.name
    path.write_bytes(SOURCE.read_text().replace("M,PA", "M,PÄ", 1).encode(encoding))
    with pytest.raises(CXRError, match=re.escape(f"{path} is not UTF-8 text") + ".*save it as UTF-8 CSV"):
        nih.read_label_table(path)
