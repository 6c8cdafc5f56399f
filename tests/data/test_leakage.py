"""RSNA's and Google's images are NIH images: a training image whose NIH twin (by RSNA's mapping
file, or by name) belongs to a validation or test patient of the run is left out and counted."""
from __future__ import annotations

import sys

import pandas as pd
import pytest
from helpers import FIXTURES

sys.path.insert(0, str(FIXTURES))
from make_box_sources import RSNAImage, write_rsna  # noqa: E402

from cxr_lightning.data import leakage  # noqa: E402
from cxr_lightning.data.sources import rsna_pneumonia  # noqa: E402
from cxr_lightning.errors import ConfigError  # noqa: E402


def pooled_table() -> pd.DataFrame:
    rows = [
        # NIH: patient 1 trains, patient 2 validates, patient 3 is tested.
        ("nih", "00000001_000.png", "train"), ("nih", "00000002_000.png", "val"), ("nih", "00000003_001.png", "test"),
        # RSNA, all drawn into training: twins of patient 1 (fine), 2 (val) and 3's other image (test patient).
        ("rsna", "r-of-1", "train"), ("rsna", "r-of-2", "train"), ("rsna", "r-of-3", "train"),
        ("rsna", "r-unmapped", "train"), ("rsna", "r-val-of-2", "val"), ("rsna", "r-test-of-1", "test"),
        # Google's expert labels: NIH names; its test image of patient 1 leaks patient 1's training rows.
        ("google", "00000001_000.png", "test"),
    ]
    return pd.DataFrame(rows, columns=["source", "Image Index", "split"])


def test_twins_of_held_out_patients_leave_training(tmp_path):
    mapping = {"r-of-1": "00000001_000.png", "r-of-2": "00000002_000.png", "r-of-3": "00000003_000.png",
               "r-val-of-2": "00000002_000.png", "r-test-of-1": "00000001_001.png"}
    root = write_rsna(tmp_path / "rsna", [RSNAImage(p, "Normal") for p in [*mapping, "r-unmapped"]], mapping=mapping,
                      dicoms=False)
    kinds = {"nih": "nih", "rsna": "rsna_pneumonia"}
    found = leakage.check_pooling(kinds, {"nih": tmp_path, "rsna": root})
    assert found == {"rsna": root / rsna_pneumonia.MAPPING}
    table = pooled_table()[lambda t: t.source != "google"].reset_index(drop=True)
    twins = leakage.nih_twins(table, kinds, found)
    assert twins.iloc[:6].tolist() == ["00000001_000.png", "00000002_000.png", "00000003_001.png",
                                       "00000001_000.png", "00000002_000.png", "00000003_000.png"]
    assert pd.isna(twins.iloc[6]) and twins.iloc[7] == "00000002_000.png"  # unmapped: no twin
    kept, counts = leakage.leave_out_twins(table, twins, kinds)
    # Counted by hand: r-of-2 (patient 2 validates) and r-of-3 (patient 3 is tested) leave training;
    # r-test-of-1 (patient 1 trains) joins training; r-val-of-2 stays in validation.
    assert counts == {f"rsna: {leakage.LEFT_OUT}": 2, f"rsna: {leakage.JOINED}": 1}
    assert sorted(set(table["Image Index"]) - set(kept["Image Index"])) == ["r-of-2", "r-of-3"]
    split = kept.set_index("Image Index")["split"]
    assert split["r-test-of-1"] == "train" and split["r-val-of-2"] == "val"

    # With Google's test image of patient 1, NIH's own training image of patient 1 and its RSNA twin go too.
    table = pooled_table()
    kinds = {"nih": "nih", "rsna": "rsna_pneumonia", "google": "nih_google"}
    kept, counts = leakage.leave_out_twins(table, leakage.nih_twins(table, kinds, found), kinds)
    assert counts == {f"rsna: {leakage.LEFT_OUT}": 3, f"nih: {leakage.LEFT_OUT}": 1}


@pytest.mark.parametrize("other", ["nih", "nih_google", "demo"])
def test_pooling_rsna_with_nih_images_needs_the_mapping_file(tmp_path, other):
    root = write_rsna(tmp_path / "rsna", [RSNAImage("p", "Normal")], dicoms=False)
    with pytest.raises(ConfigError, match=r"pneumonia-challenge-dataset-mappings_2018\.json") as err:
        leakage.check_pooling({"x": other, "rsna": "rsna_pneumonia"}, {"x": tmp_path, "rsna": root})
    assert "\n" not in str(err.value) and "data.sources.rsna.mapping=FILE" in str(err.value)
    # Alone, or pooled with a source of other images, RSNA needs no mapping.
    assert leakage.check_pooling({"rsna": "rsna_pneumonia", "v": "vindr_cxr"}, {"rsna": root}) == {}
    # A mapping file named by option is found.
    write_rsna(tmp_path / "m", [RSNAImage("p", "Normal")], mapping={"p": "00000001_000.png"}, dicoms=False)
    named = tmp_path / "m" / rsna_pneumonia.MAPPING
    assert leakage.check_pooling({"x": other, "rsna": "rsna_pneumonia"}, {"rsna": root},
                                 {"rsna": {"mapping": str(named)}}) == {"rsna": named}
