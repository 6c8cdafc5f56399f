"""Adding a dataset takes one module: a source registered here, in this file alone, trains."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import compose_config, tiny_overrides

from cxr_lightning.data import sources
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import _REGISTRY, Source, register
from cxr_lightning.errors import ConfigError

TABLE = "toy_labels.csv"


class ToySource(Source):
    """A made-up publisher: ``toy_labels.csv`` with ``scan,person,words`` (``;``-separated findings)."""

    name = "toy_test_source"
    title = "a test-local source"
    harmonisation = {"fluid": ("Effusion",), "big heart": ("Cardiomegaly",), "clear": ("No Finding",),
                     "wet lung": ("Edema", "Effusion"), "smudge": ()}

    def read(self) -> common.SourceData:
        path = self.root / TABLE
        raw = common.read_csv(path, ("scan", "person", "words"), "toy table")
        words = raw["words"].fillna("").str.split(";")
        findings = pd.DataFrame(
            {f: words.map(lambda w, f=f: float(f in w)) for f in self.harmonisation}, index=raw.index
        )
        table = common.standard_table(
            raw, image=raw["scan"], patient=raw["person"].astype(int), visit=raw.groupby("person").cumcount(),
            age=pd.Series(np.nan, index=raw.index), sex=pd.Series(np.nan, index=raw.index, dtype=object),
            view=pd.Series(None, index=raw.index, dtype=object), path=self.root.as_posix() + "/" + raw["scan"],
            frontal=pd.Series(True, index=raw.index), findings=findings, official_split=None, source=path.name)
        return common.SourceData(table, path, list(self.harmonisation))


@pytest.fixture
def toy(tiny_demo, tmp_path) -> Path:
    register(ToySource)
    nih = pd.read_csv(tiny_demo / "Data_Entry_2017_v2020.csv")
    where = {p.name: p.relative_to(tiny_demo).as_posix() for p in tiny_demo.rglob("*.png")}
    vocabulary = {"Effusion": "fluid", "Cardiomegaly": "big heart", "Edema": "wet lung", "No Finding": "clear"}
    words = nih["Finding Labels"].map(lambda s: ";".join(vocabulary.get(f, "smudge") for f in s.split("|")))
    pd.DataFrame({"scan": nih["Image Index"].map(where), "person": nih["Patient ID"], "words": words}).to_csv(
        tiny_demo / TABLE, index=False)
    yield tiny_demo
    (tiny_demo / TABLE).unlink()
    _REGISTRY.pop(ToySource.name, None)


def test_a_source_registered_in_one_file_trains(toy, tmp_path):
    from cxr_lightning.checkpoints import checkpoint_hparams
    from cxr_lightning.tasks.train import train

    assert "toy_test_source" in sources.names()
    base = [o for o in tiny_overrides(toy, tmp_path) if not o.startswith(("data=", "data.image_size="))]
    cfg = compose_config(base + ["data=demo", "data.source=toy_test_source", f"data.root={toy}", "data.image_size=32",
                                 "trainer.limit_train_batches=1", "test_after_fit=false", "head=fusion"])
    metrics = train(cfg)
    # nih14 labels the toy source gives, in NIH order; "wet lung" counts for Edema and Effusion.
    assert checkpoint_hparams(metrics["best_checkpoint"])["label_names"] == ["Cardiomegaly", "Effusion", "Edema",
                                                                             "No Finding"]


def test_unknown_source_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"expected one of \[.*'chexpert'.*'csv'.*'padchest'"):
        sources.get("toy_typo")
