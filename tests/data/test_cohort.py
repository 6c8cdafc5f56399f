"""Cohort construction on the real-NIH fixture table (see tests/fixtures/README.md)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import FIXTURES

from cxr_lightning.data import cohort, nih
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.labels import ALL_LABELS, FINDINGS, encode_labels, label_names

NIH = FIXTURES / "nih"
V2020 = NIH / "Data_Entry_2017_v2020.csv"
ORIGINAL = NIH / "variants" / "Data_Entry_2017.csv"
TXV = Path("/tmp/txv/torchxrayvision/data/Data_Entry_2017_v2020.csv")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return nih.read_label_table(V2020)


def by_image(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("Image Index")


# --- demographics --------------------------------------------------------------------------------


def test_demographics_encoding_and_median_imputation():
    df = nih.read_label_table(ORIGINAL)  # has two impossible ages -> missing
    meta, fill = cohort.encode_demographics(df)
    assert list(meta.columns) == list(cohort.DEMOGRAPHIC_COLUMNS)
    assert meta.index.equals(df.index)
    valid = [float(a) for a in df["Patient Age"] if not np.isnan(a)]
    assert len(valid) == len(df) - 2
    assert fill == statistics.median(valid)
    missing = df["Patient Age"].isna()
    np.testing.assert_allclose(meta.loc[~missing, "meta:age"], df.loc[~missing, "Patient Age"] / 100)
    np.testing.assert_allclose(meta.loc[missing, "meta:age"], fill / 100)
    assert meta["meta:age_missing"].tolist() == [1.0 if m else 0.0 for m in missing]
    assert meta["meta:sex_male"].tolist() == [1.0 if s == "M" else 0.0 for s in df["Patient Gender"]]
    assert meta["meta:view_ap"].tolist() == [1.0 if v == "AP" else 0.0 for v in df["View Position"]]


def test_demographics_uses_given_fill_for_evaluation_rows(table):
    evaluation = table.iloc[:10].copy()
    evaluation.loc[evaluation.index[:3], "Patient Age"] = np.nan
    meta, fill = cohort.encode_demographics(evaluation, age_fill=42.0)
    assert fill == 42.0
    np.testing.assert_allclose(meta["meta:age"].iloc[:3], 0.42)
    assert meta["meta:age_missing"].tolist() == [1.0] * 3 + [0.0] * 7


def test_demographics_accepts_lower_case_and_padding(table):
    rows = table.iloc[:2].copy()
    rows["Patient Gender"] = [" m", "f "]
    rows["View Position"] = ["ap", " PA"]
    meta, _ = cohort.encode_demographics(rows)
    assert meta["meta:sex_male"].tolist() == [1.0, 0.0] and meta["meta:view_ap"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "column, value", [("Patient Gender", "X"), ("Patient Gender", np.nan), ("View Position", "LL")]
)
def test_demographics_unknown_values_name_rows(table, column, value):
    df = table.copy()
    df.loc[[5, 17], column] = value
    with pytest.raises(DataError, match=rf"2 row\(s\) with {column} .* not in") as err:
        cohort.encode_demographics(df)
    assert table.loc[5, "Image Index"] in str(err.value) and table.loc[17, "Image Index"] in str(err.value)


def test_demographics_all_ages_missing(table):
    with pytest.raises(DataError, match=r"no row of Data_Entry_2017_v2020\.csv has a valid Patient Age"):
        cohort.encode_demographics(table.assign(**{"Patient Age": np.nan}))


# --- prior visits --------------------------------------------------------------------------------

# Read off tests/fixtures/nih/Data_Entry_2017_v2020.csv by hand: image -> findings of the visit with
# the previous Follow-up # (None: first visit). File-name order would give different answers.
HAND_READ_PRIORS = {
    "00000003_001.png": None,  # Follow-up # 0
    "00000003_004.png": {"Hernia", "Infiltration"},  # FU 3; FU 2 is 00000003_003.png
    "00000003_000.png": {"Hernia"},  # FU 7; FU 6 is 00000003_007.png
    "00000020_001.png": None,  # FU 0 (file name order would give 00000020_000's Pleural_Thickening)
    "00000020_002.png": {"Fibrosis", "Infiltration"},  # FU 1
    "00000020_000.png": {"Fibrosis", "Infiltration", "Pleural_Thickening"},  # FU 2 (file order: none)
    "00000057_003.png": None,  # FU 0
    "00000057_004.png": {"No Finding"},  # FU 1
    "00000057_000.png": {"Infiltration"},  # FU 2
    "00000131_002.png": None,  # FU 0
    "00000131_000.png": {"Cardiomegaly", "Emphysema"},  # FU 1
    "00000131_001.png": {"Infiltration"},  # FU 2
}


def test_prior_visits_follow_follow_up_order_not_file_names(table):
    out = by_image(cohort.add_prior_visits(table, ALL_LABELS))
    columns = [cohort.PRIOR_PREFIX + n for n in ALL_LABELS]
    for image, prior in HAND_READ_PRIORS.items():
        row = out.loc[image]
        expected = set() if prior is None else prior
        assert row[cohort.HAS_PRIOR] == (0.0 if prior is None else 1.0), image
        assert {n for n, c in zip(ALL_LABELS, columns) if row[c] == 1.0} == expected, image


def test_prior_visits_keep_rows_and_count_first_visits(table):
    shuffled = table.sample(frac=1.0, random_state=0)
    out = cohort.add_prior_visits(shuffled, label_names(drop_no_finding=True))
    assert out.index.equals(shuffled.index) and out["Image Index"].equals(shuffled["Image Index"])
    assert [c for c in out.columns if c.startswith("meta:")] == [cohort.PRIOR_PREFIX + n for n in FINDINGS] + [
        cohort.HAS_PRIOR
    ]
    assert out[cohort.HAS_PRIOR].sum() == len(table) - table["Patient ID"].nunique()
    assert set(np.unique(out.filter(like=cohort.PRIOR_PREFIX).to_numpy())) <= {0.0, 1.0}
    # Same answer whatever the row order of the input.
    straight = by_image(cohort.add_prior_visits(table, label_names(drop_no_finding=True)))
    pd.testing.assert_frame_equal(by_image(out).loc[straight.index], straight)


def test_prior_from_an_image_that_is_not_in_the_run(table, tmp_path):
    with_priors = cohort.add_prior_visits(table, ALL_LABELS)
    present = [n for n in table["Image Index"] if n != "00000003_007.png"]
    (tmp_path / "images").mkdir()
    for name in present:
        (tmp_path / "images" / name).write_bytes(b"")
    run = by_image(nih.attach_paths(with_priors, tmp_path, on_missing="skip"))
    assert "00000003_007.png" not in run.index
    assert run.loc["00000003_000.png", cohort.HAS_PRIOR] == 1.0
    assert run.loc["00000003_000.png", cohort.PRIOR_PREFIX + "Hernia"] == 1.0


def test_prior_visits_ambiguous_order(table):
    df = table.copy()
    df.loc[df["Image Index"] == "00000003_000.png", "Follow-up #"] = 6
    with pytest.raises(DataError, match=r"2 rows share a \(Patient ID, Follow-up #\) pair.*00000003_007\.png"):
        cohort.add_prior_visits(df, ALL_LABELS)


# --- splits --------------------------------------------------------------------------------------


def test_official_lists_test_split_is_exactly_test_list(table):
    lists = nih.read_split_lists(NIH)
    train_val, test = lists
    split = cohort.split_by_patient(table, lists, val_fraction=0.2, test_fraction=0.3, seed=0)
    assert split.index.equals(table.index)
    assert set(table.loc[split == "test", "Image Index"]) == test
    assert set(table.loc[split != "test", "Image Index"]) == train_val
    val_patients = set(table.loc[split == "val", "Patient ID"])
    train_val_patients = set(table.loc[split != "test", "Patient ID"])
    assert len(val_patients) == round(0.2 * len(train_val_patients))
    cohort.check_patient_disjoint(table.assign(split=split))
    for name in ("train", "val", "test"):
        others = set(table.loc[split != name, "Patient ID"])
        assert not set(table.loc[split == name, "Patient ID"]) & others
    again = cohort.split_by_patient(table, lists, 0.2, 0.3, seed=0)
    assert again.equals(split)
    other_seed = cohort.split_by_patient(table, lists, 0.2, 0.3, seed=1)
    assert not other_seed.equals(split)
    assert other_seed[split == "test"].eq("test").all()


def test_official_lists_rows_in_neither(table):
    train_val, test = nih.read_split_lists(NIH)
    dropped = sorted(train_val)[:2]
    with pytest.raises(DataError, match=rf"2 images of Data_Entry_2017_v2020\.csv are in neither .*{dropped[0]}"):
        cohort.split_by_patient(table, (train_val - set(dropped), test), 0.1, 0.0, seed=0)


def test_official_lists_that_split_a_patient(table):
    train_val, test = nih.read_split_lists(NIH)
    moved = "00000003_000.png" if "00000003_000.png" in train_val else sorted(train_val)[0]
    patient = int(moved[:8])
    with pytest.raises(DataError, match=rf"do not separate patients: 1 patient\(s\).*patient {patient} in"):
        cohort.split_by_patient(table, (train_val - {moved}, test | {moved}), 0.1, 0.0, seed=0)


def test_seeded_split_without_lists(table):
    split = cohort.split_by_patient(table, None, val_fraction=0.1, test_fraction=0.25, seed=3)
    n_patients = table["Patient ID"].nunique()
    per_split = table.groupby(split)["Patient ID"].nunique()
    assert per_split["test"] == round(0.25 * n_patients)
    assert per_split["val"] == round(0.1 * (n_patients - per_split["test"]))
    assert per_split.sum() == n_patients  # disjoint: each patient counted once
    assert cohort.split_by_patient(table.iloc[::-1], None, 0.1, 0.25, seed=3).loc[table.index].equals(split)
    assert not cohort.split_by_patient(table, None, 0.1, 0.25, seed=4).equals(split)


def test_split_fraction_errors(table):
    with pytest.raises(ConfigError, match=r"data\.val_fraction must be in \[0, 1\), got 1\.5"):
        cohort.split_by_patient(table, None, 1.5, 0.1, seed=0)
    with pytest.raises(ConfigError, match=r"leaves no training patients"):
        cohort.split_by_patient(table, None, 0.5, 0.5, seed=0)
    two_patients = table[table["Patient ID"].isin([1, 3])]
    with pytest.raises(DataError, match=r"only 1 remaining patient\(s\): a val fraction of 0\.1"):
        cohort.split_by_patient(two_patients, None, 0.1, 0.1, seed=0)


def test_check_patient_disjoint_names_patients(table):
    split = pd.Series("train", index=table.index)
    split[table["Image Index"] == "00000020_000.png"] = "val"
    split[table["Image Index"] == "00000131_001.png"] = "test"
    with pytest.raises(DataError, match=r"2 patient\(s\) have images in more than one split") as err:
        cohort.check_patient_disjoint(table.assign(split=split))
    assert "patient 20 in ['train', 'val']" in str(err.value)
    assert "patient 131 in ['test', 'train']" in str(err.value)


# --- folds ---------------------------------------------------------------------------------------


def test_patient_folds(table):
    folds = cohort.patient_folds(table, folds=5, seed=0)
    assert folds.index.equals(table.index)
    assert (folds.groupby(table["Patient ID"]).nunique() == 1).all()
    patients_per_fold = table.groupby(folds)["Patient ID"].nunique()
    assert sorted(patients_per_fold.index) == [0, 1, 2, 3, 4]
    assert patients_per_fold.max() - patients_per_fold.min() <= 1
    assert cohort.patient_folds(table, 5, seed=0).equals(folds)
    with pytest.raises(ConfigError, match=r"folds >= 2, got 1"):
        cohort.patient_folds(table, 1, seed=0)
    with pytest.raises(DataError, match=r"cannot make 5 patient folds from 2 patients"):
        cohort.patient_folds(table[table["Patient ID"].isin([1, 3])], 5, seed=0)


# --- label statistics ----------------------------------------------------------------------------


def test_label_statistics_from_array_and_frame(table):
    names = label_names()
    stats = cohort.label_statistics(encode_labels(table["Finding Labels"], names), names)
    findings = [set(s.split("|")) for s in table["Finding Labels"]]
    expected_pos = [sum(name in f for f in findings) for name in names]
    assert list(stats.index) == names
    assert stats["n_pos"].tolist() == expected_pos
    assert (stats["n_pos"] + stats["n_neg"] == len(table)).all()
    np.testing.assert_allclose(stats["pos_frac"], np.array(expected_pos) / len(table))
    np.testing.assert_allclose(stats["pos_frac"] + stats["neg_frac"], 1.0)

    frame = pd.DataFrame(encode_labels(table["Finding Labels"], names), columns=[f"label:{n}" for n in names])
    pd.testing.assert_frame_equal(cohort.label_statistics(frame, names), stats)
    with pytest.raises(DataError, match=r"shape \(198, 15\) do not match 14 names"):
        cohort.label_statistics(frame.to_numpy(), names[:-1])
    with pytest.raises(DataError, match=r"no column for \['label:Tumour'\]"):
        cohort.label_statistics(frame, ["Tumour"])
    with pytest.raises(DataError, match=r"no rows"):
        cohort.label_statistics(np.zeros((0, 15)), names)


# --- speed on NIH-sized tables -------------------------------------------------------------------


def setup_work(path: Path) -> tuple[pd.DataFrame, float]:
    """The table work a training run does at setup, timed."""
    start = time.perf_counter()
    df = nih.read_label_table(path)
    df = cohort.add_prior_visits(df, label_names())
    split = cohort.split_by_patient(df, None, 0.1, 0.2, seed=0)
    cohort.encode_demographics(df[split == "train"])
    cohort.patient_folds(df[split != "test"], 5, seed=0)
    return df, time.perf_counter() - start


def test_setup_work_is_vectorised_on_100k_rows(tmp_path):
    raw = pd.read_csv(V2020, dtype=str)
    copies = 505  # 505 x 198 rows ~ the 112,120 of the real table
    tiled = pd.concat([raw] * copies, ignore_index=True)
    copy = np.repeat(np.arange(copies), len(raw))
    patient = tiled["Patient ID"].astype(int) + copy * 100_000
    tiled["Patient ID"] = patient.astype(str)
    tiled["Image Index"] = patient.map("{:08d}".format) + tiled["Image Index"].str[8:]
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    tiled.to_csv(path, index=False)
    df, seconds = setup_work(path)
    assert len(df) == 99_990
    assert seconds < 20, f"setup work on {len(df)} rows took {seconds:.1f} s"


@pytest.mark.skipif(not TXV.is_file(), reason="full NIH table not available")
def test_setup_work_on_the_full_nih_table():
    df, seconds = setup_work(TXV)
    assert len(df) == 112_120
    assert df[cohort.HAS_PRIOR].sum() == 112_120 - 30_805
    patient3 = by_image(df).loc["00000003_000.png"]
    assert patient3[cohort.HAS_PRIOR] == 1.0 and patient3[cohort.PRIOR_PREFIX + "Hernia"] == 1.0
    assert seconds < 20, f"setup work on the full table took {seconds:.1f} s"
