"""Patient-level k-fold cross-validation on train_val: data.fold=k data.folds=K."""
from __future__ import annotations

import pandas as pd
import pytest
from helpers import compose_config, tiny_overrides

from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.errors import ConfigError
from cxr_lightning.tasks.build import build_datamodule

FOLDS = 3


@pytest.fixture(scope="module")
def folds(tiny_demo, tmp_path_factory) -> list[CXRDataModule]:
    cache = tmp_path_factory.mktemp("folds")
    modules = []
    for k in range(FOLDS):
        dm = CXRDataModule(
            source="nih", root=tiny_demo, cache_dir=cache, image_size=64, num_workers=0, fold=k, folds=FOLDS
        )
        dm.setup()
        modules.append(dm)
    return modules


def _listed(root, name: str) -> set[str]:
    return set((root / name).read_text().split())


def test_each_train_val_image_validates_exactly_once(folds, tiny_demo):
    train_val = _listed(tiny_demo, "train_val_list.txt")
    val = pd.concat([dm.split_table("val") for dm in folds])["Image Index"]
    assert not val.duplicated().any()
    assert set(val) == train_val
    for dm in folds:
        # Each fold trains on the rest of train_val.
        train = set(dm.split_table("train")["Image Index"])
        assert train | set(dm.split_table("val")["Image Index"]) == train_val
        assert not train & set(dm.split_table("val")["Image Index"])


def test_folds_are_disjoint_by_patient(folds):
    val_patients = [set(dm.split_table("val")["Patient ID"]) for dm in folds]
    for dm, patients in zip(folds, val_patients):
        assert not patients & set(dm.split_table("train")["Patient ID"])
    for i in range(FOLDS):
        for j in range(i + 1, FOLDS):
            assert not val_patients[i] & val_patients[j]
    sizes = sorted(len(p) for p in val_patients)
    assert sizes[-1] - sizes[0] <= 1  # patients dealt round-robin: balanced folds


def test_test_split_is_the_official_test_list_in_every_fold(folds, tiny_demo):
    official = _listed(tiny_demo, "test_list.txt")
    for dm in folds:
        assert set(dm.split_table("test")["Image Index"]) == official


def test_fold_overrides_reach_the_data_module(tiny_demo, tmp_path, folds):
    cfg = compose_config(tiny_overrides(tiny_demo, tmp_path) + ["data.fold=1", f"data.folds={FOLDS}"])
    dm = build_datamodule(cfg)
    assert set(dm.split_table("val")["Image Index"]) == set(folds[1].split_table("val")["Image Index"])


def test_inconsistent_fold_options_are_refused(tiny_demo, tmp_path):
    with pytest.raises(ConfigError, match="data.fold and data.folds go together"):
        CXRDataModule(source="nih", root=tiny_demo, cache_dir=tmp_path, fold=1)
    with pytest.raises(ConfigError, match=r"data.fold=3 data.folds=3: need folds >= 2 and 0 <= fold < folds"):
        CXRDataModule(source="nih", root=tiny_demo, cache_dir=tmp_path, fold=3, folds=3)
