"""External sources read as published: CheXpert, MIMIC-CXR-JPG, PadChest and NIH-Google, on
synthetic rows in each publisher's exact schema (tests/fixtures/make_external.py)."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest
from fixtures import make_external as mx

from cxr_lightning.data import images, label_spaces, sources
from cxr_lightning.data.sources import chexpert, get, padchest
from cxr_lightning.data.spec import DataSpec
from cxr_lightning.data.tables import build_tables
from cxr_lightning.errors import ConfigError, DataError


def tables_of(root, label_names=None, **options):
    return build_tables(DataSpec.from_options(root=root, labels=label_names, **options))


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    return mx.write_chexpert(tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small")


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory):
    return mx.write_mimic(tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def padchest_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("padchest")
    return root, mx.write_padchest(root)


def _all(tables) -> pd.DataFrame:
    return pd.concat(tables.tables.values(), ignore_index=True).set_index("Image Index")


def _code(rows, key, observation):
    return {r[key]: r[-1].get(observation, "") for r in rows}


# --- CheXpert ------------------------------------------------------------------------------------
def test_chexpert_frontal_only_laterals_counted(chexpert_root):
    tables = tables_of(chexpert_root, source="chexpert", test_fraction=0.2)
    laterals = sum(r[5] == "Lateral" for r in mx.CHEXPERT_TRAIN + mx.CHEXPERT_VALID)
    assert tables.left_out == {"view LATERAL": laterals}
    table = _all(tables)
    assert len(table) == len(mx.CHEXPERT_TRAIN) + len(mx.CHEXPERT_VALID) - laterals
    assert not table.index.str.contains("lateral").any()
    # valid.csv is the official val split; its patients are nowhere else
    val = tables.tables["val"]
    assert sorted(val["Patient ID"].unique()) == sorted({r[0] for r in mx.CHEXPERT_VALID})
    assert set(tables.tables["train"]["Patient ID"]).isdisjoint(val["Patient ID"])


@pytest.mark.parametrize("policy, uncertain_value", [("ignore", np.nan), ("ones", 1.0), ("zeros", 0.0)])
def test_chexpert_uncertain_and_blank_labels_under_each_policy(chexpert_root, policy, uncertain_value):
    table = _all(tables_of(chexpert_root, source="chexpert", test_fraction=0.2, uncertain=policy))
    for observation, nih_name in (
        ("Cardiomegaly", "Cardiomegaly"),
        ("Pleural Effusion", "Effusion"),
        ("Atelectasis", "Atelectasis"),
    ):
        for row in mx.CHEXPERT_TRAIN:
            if row[5] != "Frontal":
                continue
            name = mx.chexpert_row("train", row, None)[0]
            code = row[-1].get(observation, "")
            got = table.at[name, f"label:{nih_name}"]
            if code == "-1.0":
                assert (np.isnan(got) if np.isnan(uncertain_value) else got == uncertain_value), (name, observation)
            else:  # blank: not mentioned = negative, under every policy
                assert got == (1.0 if code == "1.0" else 0.0), (name, observation, code)


def test_chexpert_paths_with_and_without_prefix_give_the_same_table(tmp_path, chexpert_root):
    plain = mx.write_chexpert(tmp_path / "plain", prefix=None, valid_prefix=None)
    a = _all(tables_of(chexpert_root, source="chexpert", test_fraction=0.2))
    b = _all(tables_of(plain, source="chexpert", test_fraction=0.2))
    assert list(a.index) == list(b.index)
    assert all(p.startswith(str(chexpert_root)) for p in a["path"])
    assert all(p.startswith(str(plain)) for p in b["path"])
    label_cols = [c for c in a.columns if c.startswith(("label:", "meta:"))]
    pd.testing.assert_frame_equal(a[label_cols], b[label_cols])


def test_chexpert_missing_age_and_unknown_sex_are_flagged(chexpert_root):
    table = _all(tables_of(chexpert_root, source="chexpert", test_fraction=0.2))
    no_age = mx.chexpert_row("train", mx.CHEXPERT_TRAIN[3], None)[0]  # Age blank
    assert np.isnan(table.at[no_age, "Patient Age"]) and table.at[no_age, "meta:age_missing"] == 1.0
    unknown_sex = mx.chexpert_row("train", mx.CHEXPERT_TRAIN[5], None)[0]  # Sex "Unknown"
    assert table.at[unknown_sex, "meta:sex_male"] == 0.5
    assert table.at[mx.chexpert_row("train", mx.CHEXPERT_TRAIN[0], None)[0], "meta:sex_male"] == 0.0


def test_chexpert_unmapped_labels_are_unavailable_and_prior_study_counts(chexpert_root):
    tables = tables_of(
        chexpert_root, source="chexpert", test_fraction=0.2, label_names=["Effusion", "Mass"], age_fill=50.0
    )
    assert tables.unavailable_labels == ["Mass"]
    table = _all(tables)
    assert table["label:Mass"].isna().all()
    second = mx.chexpert_row("train", mx.CHEXPERT_TRAIN[1], None)[0]  # patient 1 study 2; study 1 was No Finding
    first = mx.chexpert_row("train", mx.CHEXPERT_TRAIN[0], None)[0]
    assert table.at[second, "meta:has_prior"] == 1.0 and table.at[first, "meta:has_prior"] == 0.0
    assert table.at[second, "meta:prior:Effusion"] == 0.0 and table.at[second, "label:Effusion"] == 1.0
    assert (
        tables.age_fill == 50.0 and table.at[mx.chexpert_row("train", mx.CHEXPERT_TRAIN[3], None)[0], "meta:age"] == 0.5
    )


def test_chexpert_bad_code_names_file_row_and_column(tmp_path):
    root = mx.write_chexpert(tmp_path / "bad")
    text = (root / "valid.csv").read_text().splitlines()
    cells = text[2].split(",")
    cells[7] = "2.0"  # Cardiomegaly
    text[2] = ",".join(cells)
    (root / "valid.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"valid\.csv: 1 row\(s\) with a 'Cardiomegaly' that is not 1\.0.*line 3"):
        tables_of(root, source="chexpert")


def test_chexpert_missing_image_is_a_named_error_or_skipped(tmp_path):
    root = mx.write_chexpert(tmp_path / "partial")
    victim = root / "train/patient00005/study1/view1_frontal.jpg"
    victim.unlink()
    with pytest.raises(DataError, match="1 of .* images listed .* not found.*patient00005.*on_missing=skip"):
        tables_of(root, source="chexpert", test_fraction=0.2)
    tables = tables_of(root, source="chexpert", test_fraction=0.2, on_missing="skip")
    assert str(victim) not in set(_all(tables)["path"])


def test_missing_label_files_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="no CheXpert label table"):
        tables_of(tmp_path, source="chexpert")
    with pytest.raises(ConfigError, match="expected one of"):
        get("chexpert5")


# --- MIMIC-CXR-JPG -------------------------------------------------------------------------------
def test_mimic_official_split_views_and_labels(mimic_root):
    tables = tables_of(mimic_root, source="mimic_cxr")
    non_frontal = [r for r in mx.MIMIC_IMAGES if r[3] not in ("PA", "AP")]
    assert sum(tables.left_out.values()) == len(non_frontal)
    assert tables.left_out["view LATERAL"] == 1 and tables.left_out["view AP AXIAL"] == 1
    expected = {"validate": "val"}
    for d, _, _, view, *_rest, split in mx.MIMIC_IMAGES:
        if view in ("PA", "AP"):
            assert (tables.tables[expected.get(split, split)]["Image Index"] == d).sum() == 1, d
    table = _all(tables)
    assert table.at["d9-pa", "label:Atelectasis"] == 1.0 and np.isnan(table.at["d9-pa", "label:Effusion"])
    assert table.at["d1-pa", "path"].endswith("files/p10/p10000032/s50414267/d1-pa.jpg")
    assert "Lung Opacity" not in str(tables.label_names)


def test_mimic_studies_out_of_date_order(mimic_root):
    table = _all(tables_of(mimic_root, source="mimic_cxr"))
    # subject 10000032: s53911762 (2180) < s50414267 (2181, two images) < s56699142 (2182)
    assert [table.at[d, "Follow-up #"] for d in ("d2-ap", "d1-pa", "d3-ap")] == [0, 1, 2]
    assert table.at["d2-ap", "meta:has_prior"] == 0.0
    assert table.at["d1-pa", "meta:prior:No Finding"] == 1.0  # from s53911762
    assert table.at["d3-ap", "meta:prior:Effusion"] == 1.0  # from s50414267
    # anchor_age 52 in anchor_year 2180
    assert [table.at[d, "Patient Age"] for d in ("d2-ap", "d1-pa", "d3-ap")] == [52.0, 53.0, 54.0]
    assert np.isnan(table.at["d10-ap", "Patient Age"]) and table.at["d10-ap", "meta:sex_male"] == 0.5


def test_mimic_without_patients_table_flags_age_and_sex_missing(tmp_path):
    root = mx.write_mimic(tmp_path / "m", patients=False, gz=False)
    table = _all(tables_of(root, source="mimic_cxr", label_table="mimic-cxr-2.0.0-negbio.csv"))
    assert table["Patient Age"].isna().all() and (table["meta:age_missing"] == 1.0).all()
    assert (table["meta:sex_male"] == 0.5).all()


def test_mimic_corrupt_gzip_is_a_named_error(tmp_path):
    root = mx.write_mimic(tmp_path / "m")
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(b"dicom_id,study_id\n")[:12])
    with pytest.raises(DataError, match="split.csv.gz"):
        tables_of(root, source="mimic_cxr")


# --- PadChest ------------------------------------------------------------------------------------
def test_padchest_labels_views_ages(padchest_root):
    root, _ = padchest_root
    tables = tables_of(root, source="padchest", val_fraction=0.2, test_fraction=0.2)
    assert tables.left_out == {"no Labels": 1, "view LATERAL": 1, "view COSTAL": 1}
    table = _all(tables)
    assert table.at["p1_c.png", "label:Effusion"] == 1.0 and table.at["p1_c.png", "label:Cardiomegaly"] == 1.0
    assert table.at["p2_a.png", "label:Nodule"] == 1.0  # "pseudonodule" maps to nothing
    assert table.at["p3_a.png", "label:Effusion"] == 1.0 and table.at["p3_a.png", "label:Emphysema"] == 0.0
    assert table.at["p4_a.png", "label:Atelectasis"] == 1.0 and table.at["p4_a.png", "label:Hernia"] == 1.0
    assert table.at["p7_a.png", "label:Mass"] == 1.0 and table.at["p7_a.png", "label:Emphysema"] == 1.0
    assert table.at["p1_a.png", "label:No Finding"] == 1.0
    assert table.at["p1_c.png", "Patient Age"] == 2015 - 1930 and np.isnan(table.at["p2_a.png", "Patient Age"])
    assert table.at["p2_a.png", "View Position"] == "AP" and table.at["p3_a.png", "meta:sex_male"] == 0.5
    assert table.at["p1_c.png", "meta:prior:No Finding"] == 1.0


def test_padchest_16_bit_png_decodes_by_bit_depth(padchest_root):
    root, raw = padchest_root
    table = _all(tables_of(root, source="padchest", val_fraction=0.2, test_fraction=0.2))
    decoded = images.read_image(table.at["p4_a.png", "path"])
    expected = np.round(raw["p4_a.png"].astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)


def test_padchest_labels_are_parsed_as_literals_only():
    assert padchest.parse_labels("['normal', ' nodule ', '']") == ["normal", "nodule"]
    for bad in ("__import__('os').system('true')", "['a', 1]", "{'a': 1}", "[normal"):
        with pytest.raises((ValueError, SyntaxError)):
            padchest.parse_labels(bad)


def test_padchest_bad_labels_cell_is_named(tmp_path):
    root = tmp_path / "pc"
    mx.write_padchest(root)
    csv_path = root / padchest.LABEL_TABLE
    csv_path.write_text(csv_path.read_text().replace("['rib fracture']", "open('x')"))
    with pytest.raises(DataError, match=r"Labels value that is not a list.*line 8 \(p5_a.png\)"):
        tables_of(root, source="padchest", val_fraction=0.2, test_fraction=0.2)


# --- NIH-Google ----------------------------------------------------------------------------------
def test_nih_google_reads_googles_files_beside_nih(tiny_demo, tmp_path):
    root = tmp_path / "nih"
    shutil.copytree(tiny_demo, root)
    nih_table = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    chosen = nih_table.iloc[::3]
    mx.write_nih_google(root, chosen["Image Index"].tolist(), chosen["Patient ID"].tolist())
    tables = tables_of(root, source="nih_google", label_names=["Pneumothorax", "Nodule", "Mass"], age_fill=40.0)
    assert tables.unavailable_labels == ["Nodule", "Mass"]
    assert len(tables.tables["train"]) == 0
    google = pd.concat([pd.read_csv(root / n) for n in (
        "four_findings_expert_labels_validation_labels.csv", "four_findings_expert_labels_test_labels.csv")])
    table = _all(tables)
    assert len(table) == len(google)
    expected = (google.set_index("Image Index")["Pneumothorax"] == "YES").astype(float)
    pd.testing.assert_series_equal(table["label:Pneumothorax"].sort_index(), expected.sort_index(), check_names=False)
    ages = nih_table.set_index("Image Index")["Patient Age"]
    assert (table["Patient Age"] == ages.loc[table.index]).all()


def test_harmonisation_table_is_what_the_readers_use():
    assert chexpert.HARMONISATION["Pleural Effusion"] == ("Effusion",)
    assert chexpert.HARMONISATION["Lung Opacity"] == ("Lung Opacity",)  # its own concept, not an NIH label
    assert padchest.HARMONISATION["hydropneumothorax"] == ("Pneumothorax", "Effusion")
    assert "Nodule" not in sources.create("nih_google", "/nonexistent").concepts()
    table = label_spaces.markdown_table(sources.harmonisations())
    assert (
        '| Effusion / Pleural Effusion | "Pleural Effusion" | "Pleural Effusion" | unavailable | "pleural effusion", '
        in table
    )
    assert '"hydropneumothorax"' in table.split('| Effusion /')[1].split('\n')[0]
    assert "| Mass / - | unavailable | unavailable | unavailable | " in table


def test_hydropneumothorax_counts_for_pneumothorax_and_effusion(tmp_path):
    root = tmp_path / "padchest"
    mx.write_padchest(root)
    path = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[frame["ImageID"] == "p8_a.png", "Labels"] = "['hydropneumothorax']"
    frame.to_csv(path, index=False)
    table = _all(tables_of(root, source="padchest", val_fraction=0.2, test_fraction=0.2))
    assert table.at["p8_a.png", "label:Pneumothorax"] == 1.0 and table.at["p8_a.png", "label:Effusion"] == 1.0
    assert table.at["p8_a.png", "label:Pneumonia"] == 0.0
