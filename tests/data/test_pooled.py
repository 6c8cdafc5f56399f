"""Pooled training (data=pooled) and a lab's own table (data=csv), on tiny fixtures: patient splits
per source, masked labels a source lacks, per-source test figures, source-weighted sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures import make_external as mx
from helpers import compose_config, tiny_overrides

from cxr_lightning.checkpoints import checkpoint_hparams
from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.data.spec import DataSpec
from cxr_lightning.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def _sources(tiny_demo: Path, chexpert: Path, weight: float = 0.5) -> dict:
    return {
        "nih": {"source": "nih", "root": str(tiny_demo)},
        "chexpert": {"source": "chexpert", "root": str(chexpert), "uncertain": "ignore", "weight": weight},
    }


def _quick(overrides: list[str], root: Path, out: Path) -> list[str]:
    base = [o for o in tiny_overrides(root, out) if not o.startswith(("data=", "data.root=", "data.image_size="))]
    return base + overrides + ["data.image_size=32", "trainer.limit_train_batches=1", "head=fusion", "+n_boot=20"]


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> Path:
    return mx.write_chexpert(tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small")


def test_pooled_demo_and_chexpert_train_with_per_source_test_figures(tiny_demo, chexpert, tmp_path):
    from cxr_lightning.tasks.train import train

    sources = "{nih: {source: nih, root: %s}, chexpert: {source: chexpert, root: %s, weight: 0.5}}" % (
        tiny_demo,
        chexpert,
    )
    cfg = compose_config(
        _quick(
            ["data=pooled", f"data.sources={sources}", "labels=union", "data.test_fraction=0.2"], tiny_demo, tmp_path
        )
    )
    metrics = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written["per_source"]) == {"nih", "chexpert"}
    nih, chex = written["per_source"]["nih"], written["per_source"]["chexpert"]
    assert "Mass" in nih["labels"] and "Mass" not in chex["labels"]
    assert "Lung Opacity" in chex["labels"] and "Lung Opacity" not in nih["labels"]
    assert chex["n_patients"] == len({r[0] for r in mx.CHEXPERT_VALID}) or chex["n_images"] > 0
    hparams = checkpoint_hparams(metrics["best_checkpoint"])
    assert hparams["label_space"] == "union" and "Lung Opacity" in hparams["label_names"]
    assert hparams["sampler"]["source_weights"] == {"nih": 1.0, "chexpert": 0.5}
    # compare shows each source's figure beside the pooled one.
    from cxr_lightning.tasks.compare import read_runs, report_tables, summarize

    runs = read_runs(tmp_path)
    assert runs.loc[0, "test.source_auroc.nih"] == pytest.approx(nih["auroc_mean"], nan_ok=True)
    titles = [t[0] for t in report_tables(runs, summarize(runs), ["backbone"])]
    assert "Test mean AUROC per source (pooled runs)" in titles


def test_pooled_splits_prefix_patients_and_mask_what_a_source_lacks(tiny_demo, chexpert, tmp_path):
    dm = CXRDataModule(
        DataSpec.from_options(
            sources=_sources(tiny_demo, chexpert),
            label_space="union",
            image_size=32,
            num_workers=0,
            cache_dir=tmp_path,
            test_fraction=0.2,
        )
    )
    dm.setup()
    tables = [dm.split_table(s).assign(split=s) for s in ("train", "val", "test")]
    every = pd.concat(tables, ignore_index=True)
    assert every.groupby("Patient ID")["split"].nunique().max() == 1  # no patient in two splits
    assert every["Patient ID"].str.match(r"^(nih|chexpert):").all()
    # CheXpert's val split is its valid.csv; NIH's test split is its test_list.txt.
    val = dm.split_table("val")
    assert set(val.loc[val["source"] == "chexpert", "Patient ID"]) == {f"chexpert:{r[0]}" for r in mx.CHEXPERT_VALID}
    test_list = set((tiny_demo / "test_list.txt").read_text().split())
    test = dm.split_table("test")
    assert set(test.loc[test["source"] == "nih", "Image Index"]) == test_list
    chex = every[every["source"] == "chexpert"]
    assert chex["label:Mass"].isna().all() and chex["label:Infiltration"].isna().all()
    assert every.loc[every["source"] == "nih", "label:Lung Opacity"].isna().all()
    assert chex["label:Lung Opacity"].notna().any()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0)])
def test_pooled_sampler_shares_follow_the_weights(tiny_demo, chexpert, tmp_path, weights):
    sources = _sources(tiny_demo, chexpert)
    sources["nih"]["weight"], sources["chexpert"]["weight"] = weights
    dm = CXRDataModule(
        DataSpec.from_options(sources=sources, image_size=32, num_workers=0, cache_dir=tmp_path, test_fraction=0.2)
    )
    dm.setup()
    train = dm.split_table("train")
    share = weights[1] / sum(weights)
    expected = dm._train_weights()
    assert expected[train["source"].to_numpy() == "chexpert"].sum() == pytest.approx(share * len(train))
    sampler = dm.train_sampler()
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    from_chexpert = np.mean(train["source"].to_numpy()[drawn] == "chexpert")
    assert from_chexpert == pytest.approx(share, abs=0.02)


def test_pooled_needs_sources_and_positive_weights(tiny_demo, chexpert):
    with pytest.raises(ConfigError, match="data.sources"):
        DataSpec.from_options(source="pooled")
    bad = _sources(tiny_demo, chexpert)
    bad["chexpert"]["weight"] = 0
    with pytest.raises(ConfigError, match="weight"):
        DataSpec.from_options(sources=bad)


# --- data=csv ------------------------------------------------------------------------------------
def _own_table(tiny_demo: Path, style: str) -> tuple[Path, pd.DataFrame]:
    nih = pd.read_csv(tiny_demo / "Data_Entry_2017_v2020.csv")
    where = {p.name: p.relative_to(tiny_demo).as_posix() for p in tiny_demo.rglob("*.png")}
    own = pd.DataFrame(
        {
            "file": nih["Image Index"].map(where),
            "subject": "s" + nih["Patient ID"].astype(str),
            "visit_date": pd.to_datetime("2020-01-01") + pd.to_timedelta(nih["Follow-up #"] * 30, unit="D"),
            "age_years": nih["Patient Age"],
            "sex": nih["Patient Gender"].map({"M": "Male", "F": "Female"}),
            "projection": nih["View Position"],
        }
    )
    if style == "labels":
        own["findings"] = nih["Finding Labels"].str.replace("Effusion", "pleural fluid")
    else:
        for name in ("Effusion", "Cardiomegaly", "Atelectasis"):
            has = nih["Finding Labels"].str.contains(name)
            own[name.lower()] = np.where(has, "1", "")
        own.loc[::7, "effusion"] = "-1"
    path = tiny_demo.parent / f"own_{style}.csv"
    own.to_csv(path, index=False)
    return path, own


@pytest.mark.parametrize("style", ["labels", "label_columns"])
def test_own_csv_trains_in_both_label_styles(tiny_demo, tmp_path, style):
    from cxr_lightning.tasks.train import train

    table, own = _own_table(tiny_demo, style)
    columns = [
        "data.columns.image=file",
        "data.columns.patient=subject",
        "data.columns.visit=visit_date",
        "data.columns.age=age_years",
        "data.columns.sex=sex",
        "data.columns.view=projection",
    ]
    if style == "labels":
        labels = ["data.columns.labels=findings", "data.label_map={pleural fluid: Effusion}"]
    else:
        labels = [
            "data.columns.label_columns=[effusion,cardiomegaly,atelectasis]",
            "data.label_map={effusion: Effusion, cardiomegaly: Cardiomegaly, atelectasis: Atelectasis}",
        ]
    cfg = compose_config(
        _quick(
            ["data=csv", f"data.root={tiny_demo}", f"data.table={table}", *columns, *labels, "test_after_fit=false"],
            tiny_demo,
            tmp_path,
        )
    )
    metrics = train(cfg)
    names = checkpoint_hparams(metrics["best_checkpoint"])["label_names"]
    if style == "labels":
        assert "Effusion" in names and "pleural fluid" not in names and len(names) == 15
    else:
        assert names == ["Atelectasis", "Cardiomegaly", "Effusion"]
    val = set((tmp_path / "val_patients.txt").read_text().split())
    assert val and val <= set(own["subject"])


def test_own_csv_errors_name_the_file_row_and_key(tiny_demo, tmp_path):
    from cxr_lightning.data.tables import build_tables

    table, own = _own_table(tiny_demo, "labels")
    opts = {
        "source": "csv",
        "root": tiny_demo,
        "columns": {"image": "file", "patient": "subject", "labels": "findings"},
    }
    with pytest.raises(ConfigError, match="data.table"):
        DataSpec.from_options(**opts).sources[0].create()
    bad = own.copy()
    bad.loc[3, "file"] = "../../etc/passwd"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(
        DataError, match=r"bad\.csv: 1 row\(s\) with an 'file' that is absolute or leaves data.root.*line 5"
    ):
        build_tables(DataSpec.from_options(**opts, table=str(tmp_path / "bad.csv")))
    with pytest.raises(ConfigError, match="exactly one of data.columns.labels"):
        DataSpec.from_options(**{**opts, "columns": {"image": "file", "patient": "subject"}}, table=str(table)).sources[
            0
        ].create()
    missing = own.copy()
    missing.loc[0, "file"] = "images_001/images/absent.png"
    missing.to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(DataError, match="1 of .* not found.*on_missing=skip"):
        build_tables(DataSpec.from_options(**opts, table=str(tmp_path / "missing.csv")))
    tables = build_tables(DataSpec.from_options(**opts, table=str(tmp_path / "missing.csv"), on_missing="skip"))
    assert "images_001/images/absent.png" not in set(pd.concat(tables.tables.values())["Image Index"])


def test_pooled_image_cache_is_one_per_source(tiny_demo, chexpert, tmp_path):
    from cxr_lightning.data.cache import SourceCaches, cache_root

    spec = DataSpec.from_options(sources=_sources(tiny_demo, chexpert), image_size=32, num_workers=0,
                                 cache_dir=tmp_path, test_fraction=0.2, cache=True)
    dm = CXRDataModule(spec)
    dm.prepare_data()
    assert isinstance(dm.image_cache, SourceCaches)
    for root in (tiny_demo, chexpert):
        assert (cache_root(tmp_path, root) / "32px").is_dir()
    cached = CXRDataModule(spec).dataset("val")  # opens the caches prepare_data built
    plain = CXRDataModule(spec.replace(cache=False)).dataset("val")
    for i in (0, len(plain) - 1):
        assert np.array_equal(cached[i]["image"].numpy(), plain[i]["image"].numpy())


def test_own_parquet_table_reads_as_its_csv(tiny_demo, tmp_path):
    from cxr_lightning.data.tables import build_tables

    pytest.importorskip("pyarrow")
    table, own = _own_table(tiny_demo, "labels")
    own.to_parquet(tmp_path / "own.parquet", index=False)
    opts = {
        "source": "csv",
        "root": tiny_demo,
        "columns": {"image": "file", "patient": "subject", "labels": "findings"},
        "label_map": {"pleural fluid": "Effusion"},
    }
    from_csv = build_tables(DataSpec.from_options(**opts, table=str(table)))
    from_parquet = build_tables(DataSpec.from_options(**opts, table=str(tmp_path / "own.parquet")))
    assert from_csv.tables.keys() == from_parquet.tables.keys()
    for split, frame in from_csv.tables.items():
        other = from_parquet.tables[split]
        assert len(frame) > 0 or split != "train"
        assert list(frame["Image Index"]) == list(other["Image Index"])
        numbers = frame.select_dtypes("number").columns
        assert len(numbers) > 5  # labels, age, the prior visit's findings
        pd.testing.assert_frame_equal(
            frame[numbers].reset_index(drop=True), other[numbers].reset_index(drop=True), check_dtype=False
        )
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet is not a readable Parquet file"):
        build_tables(DataSpec.from_options(**opts, table=str(tmp_path / "broken.parquet")))
