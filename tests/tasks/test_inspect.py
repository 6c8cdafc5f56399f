"""inspect: counts from the label tables alone, equal to an independent recount of each fixture."""

from __future__ import annotations

import ast
import json

import pandas as pd
import pytest
from fixtures import make_external as mx
from helpers import compose_config

from cxr_lightning.tasks.inspect import inspect

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def _inspect(tmp_path, overrides):
    out = tmp_path / "inspect.json"
    record = inspect(compose_config(overrides + [f"output={out}", f"paths.output_dir={tmp_path}"], "inspect"))
    assert json.loads(out.read_text()) == record
    return record


def test_chexpert_counts_equal_a_recount_of_its_rows(tmp_path, capsys):
    root = mx.write_chexpert(tmp_path / "CheXpert-v1.0-small")
    for image in root.rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")  # no image is opened
    record = _inspect(tmp_path, ["data=chexpert", f"data.root={root}", "data.test_fraction=0.2"])
    src = record["sources"]["chexpert"]
    rows = mx.CHEXPERT_TRAIN + mx.CHEXPERT_VALID
    frontal = [r for r in rows if r[5] == "Frontal"]
    assert src["source"] == "chexpert" and src["rows"] == len(rows) and src["frontal"] == len(frontal)
    assert src["patients"] == len({r[0] for r in rows})
    assert src["splits"]["val"] == sum(r in mx.CHEXPERT_VALID for r in frontal)
    assert sum(src["splits"].values()) == len(frontal)
    assert src["left_out"] == {"view LATERAL": len(rows) - len(frontal)}
    for label, observation in (("Effusion", "Pleural Effusion"), ("Cardiomegaly", "Cardiomegaly"), ("Edema", "Edema")):
        codes = [r[7].get(observation, "") for r in rows]
        assert src["labels"][label] == {
            "positive": codes.count("1.0"),
            "uncertain": codes.count("-1.0"),
            "negative": len(codes) - codes.count("1.0") - codes.count("-1.0"),
            "unavailable": False,
        }, label
    assert src["labels"]["Mass"]["unavailable"] is True
    assert src["boxes"] == {}
    assert "Effusion" in capsys.readouterr().out


def test_padchest_two_parent_finding_counts_for_both_labels(tmp_path):
    root = tmp_path / "padchest"
    mx.write_padchest(root)
    frame = pd.read_csv(root / PADCHEST_CSV, dtype=str, keep_default_na=False)
    frame.loc[frame["ImageID"] == "p8_a.png", "Labels"] = "['hydropneumothorax', 'infiltrates']"
    frame.to_csv(root / PADCHEST_CSV, index=False)
    record = _inspect(
        tmp_path, ["data=padchest", f"data.root={root}", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    )
    src = record["sources"]["padchest"]
    labelled = frame[frame["Labels"] != ""]
    lists = [set(ast.literal_eval(v)) for v in labelled["Labels"]]
    assert src["rows"] == len(labelled) and src["left_out"]["no Labels"] == len(frame) - len(labelled)
    assert src["frontal"] == int(labelled["Projection"].isin(["PA", "AP", "AP_horizontal"]).sum())
    effusion = {"pleural effusion", "loculated pleural effusion", "loculated fissural effusion", "hydropneumothorax"}
    assert src["labels"]["Effusion"]["positive"] == sum(bool(found & effusion) for found in lists)
    assert src["labels"]["Pneumothorax"]["positive"] == sum(
        bool(found & {"pneumothorax", "hydropneumothorax"}) for found in lists
    )
    assert src["labels"]["Effusion"]["negative"] == len(lists) - src["labels"]["Effusion"]["positive"]
    assert all(c["uncertain"] == 0 for c in src["labels"].values())


def test_pooled_inspect_names_each_source_and_masks_what_it_lacks(tmp_path, tiny_demo):
    chexpert = mx.write_chexpert(tmp_path / "CheXpert-v1.0-small")
    sources = (
        f"{{nih: {{source: nih, root: {tiny_demo}}}, chexpert: {{source: chexpert, root: {chexpert}, weight: 0.5}}}}"
    )
    record = _inspect(tmp_path, ["data=pooled", f"data.sources={sources}", "labels=union"])
    assert set(record["sources"]) == {"nih", "chexpert"}
    assert "Lung Opacity" in record["labels"] and "Mass" in record["labels"]
    assert record["sources"]["nih"]["labels"]["Lung Opacity"]["unavailable"] is True
    assert record["sources"]["chexpert"]["labels"]["Mass"]["unavailable"] is True
    nih_rows = pd.read_csv(tiny_demo / "Data_Entry_2017_v2020.csv")
    assert record["sources"]["nih"]["rows"] == len(nih_rows)
    assert record["sources"]["nih"]["patients"] == nih_rows["Patient ID"].nunique()
    boxes = pd.read_csv(tiny_demo / "BBox_List_2017.csv")
    spelled = boxes["Finding Label"].replace({"Infiltrate": "Infiltration"})
    assert record["sources"]["nih"]["boxes"] == {k: int(v) for k, v in spelled.value_counts().items()}


@pytest.mark.parametrize("bad", ["data.sources={}", "data.sources={x: {root: /tmp}}"])
def test_pooled_without_sources_is_a_named_error(tmp_path, bad):
    from cxr_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="data.sources"):
        inspect(compose_config(["data=pooled", bad, f"output={tmp_path}/i.json"], "inspect"))


def test_inspect_command_writes_its_file_and_names_bad_options(tmp_path, capsys):
    import subprocess
    import sys

    root = mx.write_chexpert(tmp_path / "CheXpert-v1.0-small")
    out = tmp_path / "look.json"
    done = subprocess.run([sys.executable, "-m", "cxr_lightning.inspect", "data=chexpert", f"data.root={root}",
                           "labels=chexpert14", f"output={out}", f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["label_space"] == "chexpert14" and "Lung Opacity" in record["sources"]["chexpert"]["labels"]
    assert "Lung Opacity" in done.stdout
    from cxr_lightning.cli import run_task

    with pytest.raises(SystemExit) as exit_status:
        run_task(inspect, compose_config(["data=csv", f"data.root={root}", f"output={tmp_path}/bad.json"], "inspect"))
    assert exit_status.value.code == 2
    assert "error: ConfigError: data=csv needs data.table" in capsys.readouterr().err
