"""NIH file readers on fixtures cut from the real NIH tables (see tests/fixtures/README.md)."""
from __future__ import annotations

import csv
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import FIXTURES

from cxr_lightning.data import nih
from cxr_lightning.errors import ConfigError, DataError

NIH = FIXTURES / "nih"
V2020 = NIH / "Data_Entry_2017_v2020.csv"
ORIGINAL = NIH / "variants" / "Data_Entry_2017.csv"
KAGGLE = NIH / "variants" / "sample_labels.csv"
BBOX = NIH / "BBox_List_2017.csv"
TXV = Path("/tmp/txv/torchxrayvision/data")


def raw_rows(path: Path) -> list[dict[str, str]]:
    """The file as plain strings, read with the csv module (independent of the code under test)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def table_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def lines_name(path: Path, line_index: int) -> str:
    return table_lines(path)[line_index].split(",")[0]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def make_images(root: Path, names_by_folder: dict[str, list[str]]) -> None:
    for folder, names in names_by_folder.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"")


# --- find_label_table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "present, expected",
    [
        (("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "sample_labels.csv"), "Data_Entry_2017_v2020.csv"),
        (("Data_Entry_2017.csv", "sample_labels.csv"), "Data_Entry_2017.csv"),
        (("sample_labels.csv",), "sample_labels.csv"),
    ],
)
def test_find_label_table_prefers_v2020_then_original_then_sample(tmp_path, present, expected):
    for name in present:
        (tmp_path / name).write_text("x\n")
    assert nih.find_label_table(tmp_path) == tmp_path / expected


def test_find_label_table_lists_folder_and_nih_files_when_none(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "images_001").mkdir()
    with pytest.raises(DataError, match=r"no NIH label table") as err:
        nih.find_label_table(tmp_path)
    message = str(err.value)
    for expected in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "test_list.txt", "notes.txt", "images_001/"):
        assert expected in message


def test_find_label_table_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"nope does not exist"):
        nih.find_label_table(tmp_path / "nope")


# --- read_label_table ----------------------------------------------------------------------------


def test_v2020_table_columns_types_and_values():
    df = nih.read_label_table(V2020)
    raw = raw_rows(V2020)
    assert list(df.columns) == list(nih.COLUMNS)
    assert df.attrs["source"] == "Data_Entry_2017_v2020.csv"
    assert len(df) == len(raw) == 198
    assert df["Image Index"].tolist() == [r["Image Index"] for r in raw]
    assert df["Patient ID"].dtype == np.int64 and df["Follow-up #"].dtype == np.int64
    assert df["Patient ID"].tolist() == [int(r["Patient ID"]) for r in raw]
    assert df["Follow-up #"].tolist() == [int(r["Follow-up #"]) for r in raw]
    np.testing.assert_array_equal(df["Patient Age"], [float(r["Patient Age"]) for r in raw])
    np.testing.assert_array_equal(df["OriginalImage Width"], [float(r["OriginalImage[Width"]) for r in raw])
    np.testing.assert_array_equal(df["OriginalImagePixelSpacing y"], [float(r["y]"]) for r in raw])
    assert set(df["Patient Gender"]) == {"M", "F"} and set(df["View Position"]) == {"PA", "AP"}


def test_patient_sex_header_spelling_reads_as_patient_gender(tmp_path):
    lines = table_lines(V2020)
    lines[0] = lines[0].replace("Patient Gender", "Patient Sex")
    df = nih.read_label_table(write_lines(tmp_path / "Data_Entry_2017_v2020.csv", lines))
    assert df["Patient Gender"].tolist() == [r["Patient Gender"] for r in raw_rows(V2020)]


def test_original_2017_format_matches_v2020_except_impossible_ages(caplog):
    v2020 = nih.read_label_table(V2020)
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.nih"):
        original = nih.read_label_table(ORIGINAL)
    assert list(original.columns) == list(nih.COLUMNS)  # trailing unnamed column dropped
    assert original.attrs["source"] == "Data_Entry_2017.csv"
    over_100 = [r["Image Index"] for r in raw_rows(ORIGINAL) if int(r["Patient Age"]) > 100]
    assert len(over_100) == 2
    impossible = original["Image Index"].isin(over_100)
    assert original.loc[impossible, "Patient Age"].isna().all()
    pd.testing.assert_frame_equal(
        original.loc[~impossible].drop(columns=["OriginalImagePixelSpacing x", "OriginalImagePixelSpacing y"]),
        v2020.loc[~impossible].drop(columns=["OriginalImagePixelSpacing x", "OriginalImagePixelSpacing y"]),
    )
    np.testing.assert_allclose(original["OriginalImagePixelSpacing x"], v2020["OriginalImagePixelSpacing x"], atol=1e-6)
    warnings = [r for r in caplog.records if "above 100" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 age(s)" in warnings[0].getMessage() and over_100[0] in warnings[0].getMessage()


def test_kaggle_sample_ages_in_years_months_days():
    v2020 = nih.read_label_table(V2020)
    kaggle = nih.read_label_table(KAGGLE)
    assert list(kaggle.columns) == list(nih.COLUMNS)
    assert kaggle.attrs["source"] == "sample_labels.csv"
    raw_age = pd.Series([r["Patient Age"] for r in raw_rows(KAGGLE)])
    unit, number = raw_age.str[-1], raw_age.str[:-1].astype(float)
    assert set(unit) == {"Y", "M", "D"}
    years = unit == "Y"
    np.testing.assert_array_equal(kaggle.loc[years, "Patient Age"], v2020.loc[years, "Patient Age"])
    np.testing.assert_allclose(kaggle.loc[unit == "M", "Patient Age"], number[unit == "M"] / 12)
    np.testing.assert_allclose(kaggle.loc[unit == "D", "Patient Age"], number[unit == "D"] / 365.25)
    same = kaggle.drop(columns=["Patient Age", "OriginalImagePixelSpacing x", "OriginalImagePixelSpacing y"])
    pd.testing.assert_frame_equal(
        same, v2020.drop(columns=["Patient Age", "OriginalImagePixelSpacing x", "OriginalImagePixelSpacing y"])
    )


def test_logs_table_used_and_v2020_relabelling(caplog):
    with caplog.at_level(logging.INFO, logger="cxr_lightning.data.nih"):
        nih.read_label_table(ORIGINAL)
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "Data_Entry_2017.csv" in message and "181" in message and "198 images of 73 patients" in message


def test_geometry_columns_optional_and_extra_columns_kept(tmp_path):
    raw = pd.read_csv(V2020, dtype=str).iloc[:, :7].assign(Site="NIH")
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    raw.to_csv(path, index=False)
    df = nih.read_label_table(path)
    assert list(df.columns) == [*nih.COLUMNS, "Site"]
    assert df[list(nih.GEOMETRY_COLUMNS)].isna().all().all()


def _edited(tmp_path: Path, edit, source: Path = V2020, name: str = "Data_Entry_2017_v2020.csv") -> Path:
    lines = table_lines(source)
    return write_lines(tmp_path / name, edit(lines))


def _replace_field(line: str, index: int, value: str) -> str:
    fields = line.split(",")
    fields[index] = value
    return ",".join(fields)


def test_missing_required_column_names_file_missing_and_present(tmp_path):
    raw = pd.read_csv(V2020, dtype=str).drop(columns=["Patient Gender"])
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    raw.to_csv(path, index=False)
    expected = r"Data_Entry_2017_v2020\.csv: missing required column\(s\) \['Patient Gender'\]"
    with pytest.raises(DataError, match=expected) as err:
        nih.read_label_table(path)
    assert "present: ['Image Index', 'Finding Labels'" in str(err.value)


def test_empty_and_header_only_tables(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        nih.read_label_table(tmp_path / "empty.csv")
    header_only = _edited(tmp_path, lambda lines: lines[:1])
    with pytest.raises(DataError, match=r"has a header but no rows"):
        nih.read_label_table(header_only)


def test_undecodable_table(tmp_path):
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_bytes(b"PK\x03\x04\xff\xfe\x00\x81 zipped")
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020\.csv is not UTF-8 text"):
        nih.read_label_table(path)


def test_missing_table_file(tmp_path):
    with pytest.raises(DataError, match=r"absent\.csv does not exist"):
        nih.read_label_table(tmp_path / "absent.csv")


def test_ragged_row_is_a_data_error(tmp_path):
    path = _edited(tmp_path, lambda lines: lines[:5] + [lines[5] + ",1,2"] + lines[6:])
    with pytest.raises(DataError, match=r"not a well-formed CSV table.*line 6"):
        nih.read_label_table(path)


def test_duplicate_image_rows_named(tmp_path):
    path = _edited(tmp_path, lambda lines: lines + [lines[3]])
    name = lines_name(V2020, 3)
    with pytest.raises(DataError, match=rf"occur on more than one row: \['{name}'\]"):
        nih.read_label_table(path)


@pytest.mark.parametrize(
    "column, value, message",
    [
        (3, "P0042", r"'Patient ID' that is not an integer \(values \['P0042'\]\)"),
        (2, "1.5", r"'Follow-up #' that is not an integer \(values \['1.5'\]\)"),
        (2, "", r"'Follow-up #' that is not an integer"),
        (4, "fifty", r"'Patient Age' that is not a non-negative number"),
        (1, "", r"empty Finding Labels"),
        (7, "wide", r"'OriginalImage Width' that is not a number"),
    ],
)
def test_bad_cell_names_file_line_and_image(tmp_path, column, value, message):
    path = _edited(tmp_path, lambda lines: lines[:10] + [_replace_field(lines[10], column, value)] + lines[11:])
    with pytest.raises(DataError, match=message) as err:
        nih.read_label_table(path)
    assert f"line 11 ({lines_name(V2020, 10)})" in str(err.value)
    assert "Data_Entry_2017_v2020.csv" in str(err.value)


def test_unknown_finding_names_image(tmp_path):
    path = _edited(tmp_path, lambda lines: lines[:10] + [_replace_field(lines[10], 1, "Hernai|Mass")] + lines[11:])
    with pytest.raises(DataError, match=rf"unknown finding name\(s\) \['Hernai'\].*{lines_name(V2020, 10)}"):
        nih.read_label_table(path)


def test_value_under_unnamed_trailing_column_rejected(tmp_path):
    path = _edited(tmp_path, lambda lines: lines[:7] + [lines[7] + "oops"] + lines[8:], ORIGINAL, "Data_Entry_2017.csv")
    with pytest.raises(DataError, match=r"value in a column without a header.*line 8"):
        nih.read_label_table(path)


def test_blank_lines_do_not_shift_reported_line_numbers(tmp_path):
    def edit(lines):
        return lines[:4] + [""] + lines[4:9] + [_replace_field(lines[9], 3, "x")] + lines[10:]

    path = _edited(tmp_path, edit)
    # Line 11 of the edited file holds original line index 9.
    with pytest.raises(DataError, match=rf"line 11 \({lines_name(V2020, 9)}\)"):
        nih.read_label_table(path)
    ok = _edited(tmp_path, lambda lines: lines[:4] + ["", ""] + lines[4:])
    assert len(nih.read_label_table(ok)) == 198


# --- images --------------------------------------------------------------------------------------


def test_index_images_finds_nih_layouts_and_skips_hidden(tmp_path):
    make_images(
        tmp_path,
        {
            "images_001/images": ["00000001_000.png", "00000001_001.png"],
            "images_012/images": ["00000003_000.png"],
            "images": ["00000002_000.png"],
            "extra/deep/er": ["00000020_000.jpg", "00000057_000.JPEG"],
            ".ipynb_checkpoints": ["00000001_000.png"],
            "images_002/images": ["._00000001_001.png", "notes.txt"],
        },
    )
    found = nih.index_images(tmp_path)
    assert found.to_dict() == {
        "00000001_000.png": str(tmp_path / "images_001/images/00000001_000.png"),
        "00000001_001.png": str(tmp_path / "images_001/images/00000001_001.png"),
        "00000003_000.png": str(tmp_path / "images_012/images/00000003_000.png"),
        "00000002_000.png": str(tmp_path / "images/00000002_000.png"),
        "00000020_000.jpg": str(tmp_path / "extra/deep/er/00000020_000.jpg"),
        "00000057_000.JPEG": str(tmp_path / "extra/deep/er/00000057_000.JPEG"),
    }
    # Asked for by table name: a JPEG copy answers for the PNG name; absent names are left out.
    wanted = nih.index_images(tmp_path, ["00000020_000.png", "00000001_000.png", "00009999_000.png"])
    assert wanted.to_dict() == {
        "00000020_000.png": str(tmp_path / "extra/deep/er/00000020_000.jpg"),
        "00000001_000.png": str(tmp_path / "images_001/images/00000001_000.png"),
    }


def test_index_images_duplicate_names_both_paths(tmp_path):
    make_images(tmp_path, {"images_001/images": ["00000001_000.png"], "images_002/images": ["00000001_000.png"]})
    with pytest.raises(DataError, match=r"more than one place") as err:
        nih.index_images(tmp_path)
    assert str(tmp_path / "images_001/images/00000001_000.png") in str(err.value)
    assert str(tmp_path / "images_002/images/00000001_000.png") in str(err.value)
    # An unrelated duplicate does not block a run that does not use it.
    make_images(tmp_path, {"images": ["00000002_000.png"]})
    assert list(nih.index_images(tmp_path, ["00000002_000.png"]).index) == ["00000002_000.png"]


def test_index_images_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        nih.index_images(tmp_path / "absent")


def test_attach_paths_all_present(tmp_path):
    df = nih.read_label_table(V2020)
    names = df["Image Index"].tolist()
    make_images(tmp_path, {"images_001/images": names[:100], "images_002/images": names[100:]})
    out = nih.attach_paths(df, tmp_path)
    assert out["path"].map(lambda p: Path(p).is_file()).all()
    assert (out["path"].map(lambda p: Path(p).name) == out["Image Index"]).all()
    assert "path" not in df.columns  # input untouched


def test_attach_paths_missing_error_and_skip(tmp_path, caplog):
    df = nih.read_label_table(V2020)
    names = df["Image Index"].tolist()
    make_images(tmp_path, {"images_001/images": names[7:]})
    with pytest.raises(DataError, match=r"7 of 198 images listed in Data_Entry_2017_v2020\.csv were not found") as err:
        nih.attach_paths(df, tmp_path)
    assert names[0] in str(err.value) and "data.on_missing=skip" in str(err.value)

    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.nih"):
        kept = nih.attach_paths(df, tmp_path, on_missing="skip")
    assert kept["Image Index"].tolist() == names[7:]
    assert list(kept.index) == list(range(7, 198))
    assert any("7 of 198" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_attach_paths_no_images_at_all_and_bad_option(tmp_path):
    df = nih.read_label_table(V2020)
    with pytest.raises(DataError, match=r"none of the 198 images.*images_001\.tar\.gz"):
        nih.attach_paths(df, tmp_path, on_missing="skip")
    with pytest.raises(ConfigError, match=r"data\.on_missing must be 'error' or 'skip', got 'ignore'"):
        nih.attach_paths(df, tmp_path, on_missing="ignore")


# --- official split lists ------------------------------------------------------------------------


def test_read_split_lists_fixture_is_patient_disjoint():
    lists = nih.read_split_lists(NIH)
    assert lists is not None
    train_val, test = lists
    assert train_val == set(table_lines(NIH / "train_val_list.txt"))
    assert test == set(table_lines(NIH / "test_list.txt"))
    df = nih.read_label_table(V2020)
    assert train_val | test == set(df["Image Index"])
    test_patients = set(df.loc[df["Image Index"].isin(test), "Patient ID"])
    train_patients = set(df.loc[df["Image Index"].isin(train_val), "Patient ID"])
    assert not test_patients & train_patients
    assert round(0.25 * df["Patient ID"].nunique()) == len(test_patients)


def test_read_split_lists_absent_partial_overlapping_empty(tmp_path):
    assert nih.read_split_lists(tmp_path) is None
    shutil.copy(NIH / "test_list.txt", tmp_path)
    with pytest.raises(DataError, match=r"test_list\.txt but not train_val_list\.txt"):
        nih.read_split_lists(tmp_path)
    listed = sorted((NIH / "test_list.txt").read_text().split())[0]
    (tmp_path / "train_val_list.txt").write_text(f"00000001_000.png\n{listed}\n")
    with pytest.raises(DataError, match=rf"1 image\(s\) are in both .*{re.escape(listed)}"):
        nih.read_split_lists(tmp_path)
    (tmp_path / "train_val_list.txt").write_text("\n")
    with pytest.raises(DataError, match=r"train_val_list\.txt is empty"):
        nih.read_split_lists(tmp_path)


# --- BBox list -----------------------------------------------------------------------------------


def test_read_bbox_table_fixture():
    boxes = nih.read_bbox_table(BBOX)
    raw = table_lines(BBOX)[1:]
    assert list(boxes.columns) == ["Image Index", "Finding Label", "x", "y", "w", "h"]
    assert len(boxes) == len(raw) == 23
    assert boxes["Image Index"].tolist() == [line.split(",")[0] for line in raw]
    expected = np.array([[float(v) for v in line.split(",")[2:6]] for line in raw])
    np.testing.assert_array_equal(boxes[["x", "y", "w", "h"]].to_numpy(), expected)
    raw_labels = [line.split(",")[1] for line in raw]
    assert "Infiltrate" in raw_labels
    assert boxes["Finding Label"].tolist() == ["Infiltration" if n == "Infiltrate" else n for n in raw_labels]
    # Every boxed image is in the label table.
    assert set(boxes["Image Index"]) <= set(nih.read_label_table(V2020)["Image Index"])


def test_read_bbox_table_plain_header_and_trailing_commas(tmp_path):
    lines = table_lines(BBOX)
    plain = ["Image Index,Finding Label,x,y,w,h,,,"] + [line + ",,," for line in lines[1:]]
    path = write_lines(tmp_path / "boxes.csv", plain)
    pd.testing.assert_frame_equal(nih.read_bbox_table(path), nih.read_bbox_table(BBOX))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f[:2] + ["wide"] + f[3:], r"1 row\(s\) with a missing name/label or a box"),
        (lambda f: f[:5], r"1 row\(s\) with a missing name/label or a box"),
        (lambda f: f[:4] + ["-3"] + f[5:], r"box that is not four numbers with w, h > 0"),
        (lambda f: f + ["", "", "9"], r"more than six values"),
    ],
)
def test_read_bbox_table_malformed_rows_named(tmp_path, edit, message):
    lines = table_lines(BBOX)
    bad = ",".join(edit(lines[4].split(",")))
    path = write_lines(tmp_path / "BBox_List_2017.csv", lines[:4] + [bad] + lines[5:])
    with pytest.raises(DataError, match=message) as err:
        nih.read_bbox_table(path)
    assert f"line 5 ({lines[4].split(',')[0]})" in str(err.value) and "BBox_List_2017.csv" in str(err.value)


def test_read_bbox_table_unknown_label_and_wrong_header(tmp_path):
    lines = table_lines(BBOX)
    path = write_lines(tmp_path / "BBox_List_2017.csv", lines[:3] + [_replace_field(lines[3], 1, "Tumour")] + lines[4:])
    with pytest.raises(DataError, match=rf"unknown finding name\(s\) \['Tumour'\].*{lines[3].split(',')[0]}"):
        nih.read_bbox_table(path)
    path = write_lines(tmp_path / "other.csv", ["image,label,x,y,w,h"] + lines[1:])
    with pytest.raises(DataError, match=r"other\.csv: expected the NIH BBox list header"):
        nih.read_bbox_table(path)


# --- the real, full NIH tables (only where torchxrayvision's copy is unpacked) --------------------


@pytest.mark.skipif(not (TXV / "Data_Entry_2017_v2020.csv").is_file(), reason="full NIH table not available")
def test_full_nih_tables():
    start = time.perf_counter()
    df = nih.read_label_table(TXV / "Data_Entry_2017_v2020.csv")
    boxes = nih.read_bbox_table(TXV / "BBox_List_2017.csv")
    elapsed = time.perf_counter() - start
    assert len(df) == 112_120 and df["Patient ID"].nunique() == 30_805
    assert df["Patient Age"].notna().all()  # v2020 has no impossible ages
    assert len(boxes) == 984 and "Infiltrate" not in set(boxes["Finding Label"])
    assert elapsed < 20, f"reading the full tables took {elapsed:.1f} s"
