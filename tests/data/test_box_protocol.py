"""NIH's boxes are all on test images: box-guided training without training boxes is refused, and
NIH's boxed-image protocol (data.boxes.folds) moves one fold of boxed test patients into training."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import FIXTURES

from cxr_lightning.data import nih
from cxr_lightning.data.boxes import box_fold_of
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import ConfigError


@pytest.fixture(scope="module")
def nih_like(tiny_demo, tmp_path_factory):
    """The tiny demo with NIH's property: every boxed patient is a test patient (test_list.txt)."""
    root = tmp_path_factory.mktemp("nih_like") / "nih"
    shutil.copytree(tiny_demo, root)
    table = nih.read_label_table(root / nih.LABEL_TABLE)
    boxed = set(table.loc[table[nih.IMAGE].isin(nih.read_bbox_table(root / nih.BBOX_TABLE)[nih.IMAGE]), nih.PATIENT])
    old_test = set((root / nih.TEST_LIST).read_text().split())
    in_test = table[nih.PATIENT].isin(boxed) | table[nih.IMAGE].isin(old_test)
    (root / nih.TEST_LIST).write_text("".join(n + "\n" for n in sorted(table.loc[in_test, nih.IMAGE])))
    (root / nih.TRAIN_VAL_LIST).write_text("".join(n + "\n" for n in sorted(table.loc[~in_test, nih.IMAGE])))
    return root


def datamodule(root, **kwargs) -> CXRDataModule:
    dm = CXRDataModule(source="nih", root=root, image_size=64, num_workers=0, **kwargs)
    dm.setup()
    return dm


def test_the_nih_fixture_has_every_box_on_a_test_image():
    """As in NIH's release (984 boxes, all on test_list.txt images)."""
    boxes = nih.read_bbox_table(FIXTURES / "nih" / nih.BBOX_TABLE)
    test = set((FIXTURES / "nih" / nih.TEST_LIST).read_text().split())
    assert len(boxes) == 23 and boxes[nih.IMAGE].isin(test).all()


def test_box_guidance_without_training_boxes_is_refused(nih_like):
    with pytest.raises(ConfigError) as err:
        datamodule(nih_like, train_boxes=True)
    message = str(err.value)
    assert "\n" not in message
    assert "NIH's boxes are all on test_list.txt images" in message
    assert "data=pooled" in message and "vindr_cxr" in message  # way out 1
    assert "data.boxes.folds=K" in message  # way out 2
    assert datamodule(nih_like).training_boxes().count == 0  # the plain recipe is fine


@pytest.mark.parametrize("trained", ["fold", "others"])
def test_box_folds_are_patient_disjoint_and_keep_test_patients_out_of_training(nih_like, trained):
    folds = 3
    plain = datamodule(nih_like)
    official_test = plain.split_table("test")
    bbox = plain.bbox_table
    boxed_patients = set(official_test.loc[official_test[nih.IMAGE].isin(bbox[nih.IMAGE]), nih.PATIENT])
    fold_of = box_fold_of(official_test, bbox, pd.Series("test", index=official_test.index), folds, seed=0)
    assert set(fold_of.index) == boxed_patients and fold_of.index.is_unique  # each patient in one fold
    assert sorted(fold_of.value_counts()) == sorted(np.bincount(np.arange(len(boxed_patients)) % folds))

    trained_once = []
    for k in range(folds):
        dm = datamodule(nih_like, boxes={"folds": folds, "fold": k, "trained": trained}, train_boxes=True)
        splits = {s: dm.split_table(s) for s in ("train", "val", "test")}
        mine = set(fold_of.index[(fold_of == k) if trained == "fold" else (fold_of != k)])
        train_patients = set(splits["train"][nih.PATIENT])
        test_patients = set(splits["test"][nih.PATIENT])
        assert mine <= train_patients and not mine & test_patients
        # No boxed test patient of fold k is in fold k's training split.
        boxed_test = boxed_patients & test_patients
        assert boxed_test == boxed_patients - mine and not boxed_test & train_patients
        # The test split is the official list minus the moved patients' images.
        kept = official_test.loc[~official_test[nih.PATIENT].isin(mine), nih.IMAGE]
        assert set(splits["test"][nih.IMAGE]) == set(kept)
        # Validation is untouched; every moved box is trained on.
        assert set(splits["val"][nih.IMAGE]) == set(plain.split_table("val")[nih.IMAGE])
        moved_boxes = bbox[bbox[nih.IMAGE].isin(official_test.loc[official_test[nih.PATIENT].isin(mine), nih.IMAGE])]
        assert dm.training_boxes().count == len(moved_boxes) > 0
        record = dm.box_protocol["nih"]  # per source that has NIH's layout
        assert record["moved_patients"] == len(mine) and record["moved_boxes"] == len(moved_boxes)
        assert record["test_images"] == len(splits["test"]) and record["official_test_images"] == len(official_test)
        assert "test_list.txt minus" in record["test"]
        trained_once += sorted(mine)
    if trained == "fold":  # over the K runs, every boxed patient trains exactly once
        assert sorted(trained_once) == sorted(boxed_patients)


def test_box_folds_config_errors(nih_like):
    with pytest.raises(ConfigError, match="needs both"):
        CXRDataModule(source="nih", root=nih_like, boxes={"folds": 3, "fold": None})
    with pytest.raises(ConfigError, match="0 <= fold < folds"):
        CXRDataModule(source="nih", root=nih_like, boxes={"folds": 3, "fold": 3})
    with pytest.raises(ConfigError, match="trained"):
        CXRDataModule(source="nih", root=nih_like, boxes={"folds": 3, "fold": 0, "trained": "all"})
    with pytest.raises(ConfigError, match="unknown key"):
        CXRDataModule(source="nih", root=nih_like, boxes={"fold_count": 3})
