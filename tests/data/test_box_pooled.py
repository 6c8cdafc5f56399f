"""A pooled run trains on the box sources' boxes: NIH (the demo, its boxes on test images only, as
NIH's are) with VinDr-CXR and RSNA copies of its boxed training images."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import compose_config, tiny_overrides

from cxr_lightning.data import leakage, nih
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.data.demo.box_copies import write_box_copies
from cxr_lightning.data.sources import rsna_pneumonia
from cxr_lightning.data.spec import DataSpec
from cxr_lightning.errors import ConfigError

NIH14_VINDR = {"Atelectasis", "Cardiomegaly", "Pleural effusion", "Infiltration", "Pneumothorax"}


@pytest.fixture(scope="module")
def box_demo(tiny_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("box_demo") / "nih"
    shutil.copytree(tiny_demo, root)
    write_box_copies(root, val_fraction=0.15, split_seed=0)
    return root


def sources(root, rsna_root=None) -> dict:
    return {
        "nih": {"source": "nih", "root": str(root)},
        "vindr": {"source": "vindr_cxr", "root": str(root / "vindr_cxr")},
        "rsna": {"source": "rsna_pneumonia", "root": str(rsna_root or root / "rsna_pneumonia")},
    }


def test_pooled_training_uses_every_box_sources_training_boxes_and_leaves_twins_out(box_demo):
    dm = CXRDataModule(DataSpec.from_options(sources=sources(box_demo), image_size=64, num_workers=0,
                                             val_fraction=0.15, train_boxes=True))
    train = dm.split_table("train")
    boxes = dm.training_boxes()
    # Recount from the published files: VinDr's annotation rows of training images whose class is
    # an nih14 label (both drawing readers' boxes), RSNA's Target-1 rows of training images.
    vindr_rows = pd.read_csv(box_demo / "vindr_cxr" / "annotations" / "annotations_train.csv")
    vindr_train = set(train.loc[train["source"] == "vindr", "Image Index"])
    vindr_expected = vindr_rows[vindr_rows["image_id"].isin(vindr_train) & vindr_rows["class_name"].isin(NIH14_VINDR)]
    rsna_rows = pd.read_csv(box_demo / "rsna_pneumonia" / "stage_2_train_labels.csv")
    rsna_train = set(train.loc[train["source"] == "rsna", "Image Index"])
    rsna_expected = rsna_rows[rsna_rows["patientId"].isin(rsna_train) & (rsna_rows["Target"] == 1)]
    assert sum(boxes.by_source.get("vindr", {}).values()) == len(vindr_expected) > 0
    assert sum(boxes.by_source.get("rsna", {}).values()) == len(rsna_expected)
    assert "nih" not in boxes.by_source  # NIH's boxes are all on test images
    assert boxes.count == len(vindr_expected) + len(rsna_expected)
    # RSNA's copies of NIH validation or test patients' images are left out of training, counted.
    mapping = rsna_pneumonia.read_mapping(box_demo / "rsna_pneumonia" / rsna_pneumonia.MAPPING)
    nih_rows = pd.concat([dm.split_table(s).assign(split=s) for s in ("train", "val", "test")])
    nih_rows = nih_rows[nih_rows["source"] == "nih"]
    held = set(nih_rows.loc[nih_rows["split"] != "train", nih.PATIENT].str.removeprefix("nih:").astype(int))
    twins = {r for r, name in mapping.items() if int(name[:8]) in held}
    present = {n for s in ("train", "val", "test") for n in dm.split_table(s)["Image Index"]}
    assert dm.tables.left_out[f"rsna: {leakage.LEFT_OUT}"] == len(twins - present) > 0
    assert not twins & set(train["Image Index"])


def test_pooling_rsna_with_nih_without_the_mapping_file_is_refused(box_demo, tmp_path):
    rsna = tmp_path / "rsna"
    shutil.copytree(box_demo / "rsna_pneumonia", rsna)
    (rsna / rsna_pneumonia.MAPPING).unlink()
    with pytest.raises(ConfigError, match="pneumonia-challenge-dataset-mappings_2018.json"):
        CXRDataModule(DataSpec.from_options(sources=sources(box_demo, rsna), image_size=64, num_workers=0)).setup()


@pytest.mark.slow
def test_a_pooled_demo_and_vindr_run_trains_on_vindr_boxes(box_demo, tmp_path):
    from cxr_lightning.tasks.train import train

    srcs = "{nih: {source: nih, root: %s}, vindr: {source: vindr_cxr, root: %s}}" % (box_demo, box_demo / "vindr_cxr")
    base = [o for o in tiny_overrides(box_demo, tmp_path) if not o.startswith(("data=", "data.root="))]
    train(compose_config(base + ["data=pooled", f"data.sources={srcs}", "loss.box_weight=1.0",
                                 "loss.box_warmup_epochs=0", "test_after_fit=false", "data.val_fraction=0.15"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["boxes_trained_on"] > 0 and set(written["boxes_trained_on_by_source"]) == {"vindr"}
    assert written["boxes_trained_on"] == sum(written["boxes_trained_on_by_source"]["vindr"].values())
    assert written["box_pairs_seen"] > 0 and written["box_loss_mean"] > 0  # the box term was not zero


def _published_boxed_names(root) -> dict[str, set[str]]:
    """Per box source, the images its published files box (read independently of the readers)."""
    vindr = pd.read_csv(root / "vindr_cxr" / "annotations" / "annotations_train.csv").dropna(subset=["x_min"])
    rsna = pd.read_csv(root / "rsna_pneumonia" / "stage_2_train_labels.csv")
    return {"vindr": set(vindr["image_id"]), "rsna": set(rsna.loc[rsna["Target"] == 1, "patientId"])}


def test_localisation_boxes_of_a_pooled_run_are_nih_test_boxes_only(box_demo):
    dm = CXRDataModule(DataSpec.from_options(sources=sources(box_demo), image_size=64, num_workers=0,
                                             val_fraction=0.15))
    test = dm.split_table("test")
    boxed = _published_boxed_names(box_demo)
    # The trap: the box sources have boxed images in the test split, which the pooled table holds.
    other = test[test["source"].isin(boxed)]
    assert any(other.loc[other["source"] == s, "Image Index"].isin(boxed[s]).any() for s in boxed)
    assert set(dm.bbox_table["Image Index"]) & set(other["Image Index"])
    assert dm.localization_sources == ["nih"]
    scored = dm.localization_boxes(test)
    nih_boxes = nih.read_bbox_table(box_demo / nih.BBOX_TABLE)
    nih_test = set(test.loc[test["source"] == "nih", "Image Index"])
    expected = nih_boxes[nih_boxes["Image Index"].isin(nih_test)]
    assert len(scored) == len(expected) > 0
    assert sorted(map(tuple, scored[["Image Index", "Finding Label", "x", "y", "w", "h"]].to_numpy())) == sorted(
        map(tuple, expected[["Image Index", "Finding Label", "x", "y", "w", "h"]].to_numpy()))


def test_localisation_boxes_without_an_nih_source_carry_their_dicoms_size(box_demo):
    import pydicom

    dm = CXRDataModule(DataSpec.from_options(
        sources={"vindr": {"source": "vindr_cxr", "root": str(box_demo / "vindr_cxr")}}, image_size=64,
        num_workers=0, val_fraction=0.15))
    assert dm.localization_sources == ["vindr"]
    test = dm.split_table("test")
    scored = dm.localization_boxes(test)
    assert len(scored) and set(scored["Image Index"]) <= set(test["Image Index"])
    path_of = test.set_index("Image Index")["path"]
    for name, width, height in scored[["Image Index", "OriginalImage Width", "OriginalImage Height"]].to_numpy():
        header = pydicom.dcmread(path_of[name], stop_before_pixels=True)
        assert (width, height) == (header.Columns, header.Rows)


@pytest.mark.slow
def test_explain_of_a_pooled_run_scores_the_nih_test_boxes_only(box_demo, tmp_path):
    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.train import train

    base = [o for o in tiny_overrides(box_demo, tmp_path) if not o.startswith(("data=", "data.root="))]
    srcs = ", ".join(f"{n}: {{source: {s['source']}, root: {s['root']}}}" for n, s in sources(box_demo).items())
    train(compose_config(base + ["data=pooled", f"data.sources={{{srcs}}}", "test_after_fit=false",
                                 "data.val_fraction=0.15", "callbacks.cam_grid=null"]))
    out = tmp_path / "explain"
    metrics = explain(compose_config([f"run_dir={tmp_path}", "split=test", "n=2", f"output_dir={out}"],
                                     config_name="explain"))
    dm = CXRDataModule(DataSpec.from_options(sources=sources(box_demo), image_size=64, num_workers=0,
                                             val_fraction=0.15))
    test = dm.split_table("test")
    nih_boxes = nih.read_bbox_table(box_demo / nih.BBOX_TABLE)
    expected = nih_boxes[nih_boxes["Image Index"].isin(set(test.loc[test["source"] == "nih", "Image Index"]))]
    boxed = _published_boxed_names(box_demo)
    assert test[test["source"].isin(boxed)]["Image Index"].isin(set().union(*boxed.values())).any()
    assert metrics["localization.sources"] == "nih"
    assert metrics["localization.n_boxes"] == len(expected) > 0
    assert metrics["localization.n_images"] == expected["Image Index"].nunique()
    assert metrics["localization.n_pairs"] == len(expected.drop_duplicates(["Image Index", "Finding Label"]))
    scores = pd.read_csv(out / "localization.csv", index_col="finding")
    assert scores.loc["All", "n_boxes"] == len(expected)
    assert json.loads((out / "metrics.json").read_text())["localization.sources"] == "nih"


def test_a_job_reading_some_splits_sees_the_twins_rule_as_training_did(box_demo):
    """evaluate reads the test and val splits only: an RSNA test image whose NIH twin trains must
    still have moved to training, and the left-out counts must be training's."""
    options = dict(sources=sources(box_demo), image_size=64, num_workers=0, val_fraction=0.15)
    full = CXRDataModule(DataSpec.from_options(**options))
    full.setup()
    moved = full.tables.left_out.get(f"rsna: {leakage.JOINED}", 0)
    assert moved > 0  # the fixture exercises the rule
    for only in (("test",), ("test", "val")):
        some = CXRDataModule(DataSpec.from_options(**options, only_splits=only))
        some.setup()
        for split in only:
            keys = ["source", "Image Index"]
            assert some.split_table(split)[keys].sort_values(keys).values.tolist() == (
                full.split_table(split)[keys].sort_values(keys).values.tolist()), (only, split)
        assert dict(some.tables.left_out) == dict(full.tables.left_out)
