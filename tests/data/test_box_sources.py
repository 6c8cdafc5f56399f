"""VinDr-CXR (both layouts) and RSNA Pneumonia read as published: images (not reads or box rows)
as rows, the readers' vote, every reader's box, DICOM headers, and errors that name the row."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES

sys.path.insert(0, str(FIXTURES))
from make_box_sources import Read, RSNAImage, VinDrImage, write_dicom, write_rsna, write_vindr  # noqa: E402

from cxr_lightning.data import images  # noqa: E402
from cxr_lightning.data.sources import rsna_pneumonia, vindr_cxr  # noqa: E402
from cxr_lightning.errors import ConfigError, DataError  # noqa: E402

EFFUSION_R1 = ("Pleural effusion", 10.0, 20.0, 40.0, 60.0)
EFFUSION_R2 = ("Pleural effusion", 15.0, 25.0, 45.0, 70.0)
NODULE_R1 = ("Nodule/Mass", 50.0, 10.0, 60.0, 22.0)
FIBROSIS = ("Pulmonary fibrosis", 5.0, 5.0, 30.0, 35.0)


def vindr_images() -> list[VinDrImage]:
    """a: two of three readers box an effusion; b: one of three a nodule/mass; c: all normal;
    d: a test image (consensus) with fibrosis."""
    return [
        VinDrImage("a" * 32, [Read("R1", ["Pleural effusion"], [EFFUSION_R1]),
                              Read("R2", ["Pleural effusion"], [EFFUSION_R2]),
                              Read("R3", ["No finding"])], tags={"PatientAge": "045Y", "PatientSex": "F"}),
        VinDrImage("b" * 32, [Read("R4", ["Nodule/Mass"], [NODULE_R1]), Read("R5", ["No finding"]),
                              Read("R6", ["No finding"])], photometric="MONOCHROME1"),
        VinDrImage("c" * 32, [Read(r, ["No finding"]) for r in ("R1", "R4", "R7")]),
        VinDrImage("d" * 32, [Read("R_consensus", ["Pulmonary fibrosis"], [FIBROSIS])], split="test"),
    ]


@pytest.mark.parametrize("layout", ["physionet", "kaggle"])
@pytest.mark.parametrize("vote", ["majority", "any"])
def test_vindr_reads_images_as_rows_under_the_readers_vote(tmp_path, layout, vote):
    ims = vindr_images() if layout == "physionet" else vindr_images()[:3]  # Kaggle's test has no labels
    root = write_vindr(tmp_path / layout, ims, layout=layout)
    assert vindr_cxr.layout(root) == layout
    data = vindr_cxr.read(root, reader_vote=vote)
    table = data.table.set_index("Image Index")
    assert len(table) == len(ims)  # images, not reads or box rows
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    assert table.at[a, "finding:Pleural effusion"] == 1.0  # 2 of 3 readers
    assert table.at[b, "finding:Nodule/Mass"] == (1.0 if vote == "any" else 0.0)  # 1 of 3
    assert table.at[c, "finding:No finding"] == 1.0
    assert table.at[a, "finding:No finding"] == (1.0 if vote == "any" else 0.0)
    assert table.at[a, "Patient Age"] == 45 and table.at[a, "Patient Gender"] == "F"  # from the DICOM header
    assert np.isnan(table.at[b, "Patient Age"])
    assert table["path"].map(lambda p: Path(p).is_file()).all()
    if layout == "physionet":
        assert table.at["d" * 32, "official_split"] == "test"
        assert table.at["d" * 32, "finding:Pulmonary fibrosis"] == 1.0
        assert table["official_split"].isna().sum() == 3
        assert "finding:Pneumonia" in table.columns  # PhysioNet gives the global labels too
    else:
        assert "finding:Pneumonia" not in table.columns  # Kaggle's table: the 14 local findings only

    boxes = vindr_cxr.read_boxes(root, reader_vote=vote)
    # Every reader's box of a finding the vote calls positive, by concept.
    expected = {(a, "Effusion", "R1", EFFUSION_R1[1:]), (a, "Effusion", "R2", EFFUSION_R2[1:])}
    if vote == "any":
        expected.add((b, "Nodule or Mass", "R4", NODULE_R1[1:]))
    if layout == "physionet":
        expected.add(("d" * 32, "Fibrosis", "R_consensus", FIBROSIS[1:]))
    got = {(r["Image Index"], r["Finding Label"], r["Reader"], (r.x, r.y, r.x + r.w, r.y + r.h))
           for _, r in boxes.iterrows()}
    assert got == expected


def test_vindr_needs_only_its_label_tables(tmp_path):
    root = write_vindr(tmp_path / "v", vindr_images(), dicoms=False)
    data = vindr_cxr.read(root)
    assert len(data.table) == 4 and data.table["Patient Age"].isna().all()
    assert len(vindr_cxr.read_boxes(root)) == 3


def test_vindr_monochrome1_is_inverted(tmp_path):
    one = write_dicom(tmp_path / "m1.dicom", (40, 30), seed=3, photometric="MONOCHROME1")
    two = write_dicom(tmp_path / "m2.dicom", (40, 30), seed=3, photometric="MONOCHROME2")
    np.testing.assert_array_equal(images.read_image(one).astype(int), 255 - images.read_image(two).astype(int))
    assert images.read_dicom_header(one)["rows"] == 40 and images.read_dicom_header(one)["columns"] == 30


def test_vindr_errors_name_the_file_and_row(tmp_path):
    root = write_vindr(tmp_path / "v", vindr_images(), dicoms=False)
    with pytest.raises(ConfigError, match="reader_vote"):
        vindr_cxr.read(root, reader_vote="unanimous")
    boxes = root / "annotations" / "annotations_train.csv"
    lines = boxes.read_text().splitlines()
    lines[1] = lines[1].replace(",10.0,", ",wide,")
    boxes.write_text("\n".join(lines) + "\n")
    message = r"annotations_train.csv: 1 row\(s\) with a box that is not four numbers.*line 2"
    with pytest.raises(DataError, match=message):
        vindr_cxr.read_boxes(root)
    with pytest.raises(DataError, match="no VinDr-CXR label table.*image_labels_train.csv.*train.csv"):
        vindr_cxr.read(tmp_path)


def rsna_images() -> list[RSNAImage]:
    tags = {"PatientAge": "58", "PatientSex": "M", "ViewPosition": "AP"}
    return [
        RSNAImage("p1-opacity", "Lung Opacity", [(10, 12, 20, 30), (40, 10, 15, 25)], tags=tags),
        RSNAImage("p2-normal", "Normal"),
        RSNAImage("p3-other", "No Lung Opacity / Not Normal", tags={"ViewPosition": "PA"}),
    ]


@pytest.mark.parametrize("class_info", [True, False])
def test_rsna_reads_one_row_per_image_and_its_boxes(tmp_path, class_info):
    root = write_rsna(tmp_path / "r", rsna_images(), class_info=class_info)
    table = rsna_pneumonia.read(root).table.set_index("Image Index")
    assert sorted(table.index) == ["p1-opacity", "p2-normal", "p3-other"]  # 4 label rows, 3 images
    assert table["finding:Lung Opacity"].to_dict() == {"p1-opacity": 1.0, "p2-normal": 0.0, "p3-other": 0.0}
    if class_info:
        assert table["finding:Normal"].to_dict() == {"p1-opacity": 0.0, "p2-normal": 1.0, "p3-other": 0.0}
    else:
        assert "finding:Normal" not in table.columns  # No Finding is then unavailable, not guessed
    assert table.at["p1-opacity", "Patient Age"] == 58 and table.at["p1-opacity", "Patient Gender"] == "M"
    assert table.at["p1-opacity", "View Position"] == "AP" and table.at["p3-other", "View Position"] == "PA"
    boxes = rsna_pneumonia.read_boxes(root)
    assert boxes[["Image Index", "Finding Label", "x", "y", "w", "h"]].values.tolist() == [
        ["p1-opacity", "Pneumonia", 10, 12, 20, 30], ["p1-opacity", "Pneumonia", 40, 10, 15, 25]]
    assert rsna_pneumonia.HARMONISATION == {"Lung Opacity": ("Pneumonia",), "Normal": ("No Finding",)}


def test_rsna_mapping_and_errors(tmp_path):
    mapping = {"p1-opacity": "00000003_000.png", "p2-normal": "00000001_000.png"}
    root = write_rsna(tmp_path / "r", rsna_images(), mapping=mapping)
    mapping = rsna_pneumonia.read_mapping(root / rsna_pneumonia.MAPPING)
    assert mapping.to_dict() == {"p1-opacity": "00000003_000.png", "p2-normal": "00000001_000.png"}
    (tmp_path / "bad.json").write_text('{"img_id": "x"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        rsna_pneumonia.read_mapping(tmp_path / "bad.json")
    labels = root / rsna_pneumonia.LABELS
    labels.write_text(labels.read_text().replace(",0\n", ",2\n", 1))
    with pytest.raises(DataError, match=r"stage_2_train_labels.csv: 1 row\(s\) with a Target that is not 0 or 1"):
        rsna_pneumonia.read(root)


def test_vindr_boxes_scale_by_each_dicoms_size_and_keep_their_readers(tmp_path):
    from cxr_lightning.data.boxes import NO_READER, image_boxes

    root = write_vindr(tmp_path / "v", vindr_images())
    table = vindr_cxr.read(root).table.assign(source="vindr")
    boxes = vindr_cxr.read_boxes(root)
    got = image_boxes(table, boxes, ["Effusion", "Fibrosis", "Nodule or Mass"], image_size=64)
    assert got.count == 3 and got.by_source == {"vindr": {"Effusion": 2, "Fibrosis": 1}}
    a = list(table["Image Index"]).index("a" * 32)
    rows, cols = 96, 80  # every fixture image: not square
    for slot, (_, x0, y0, x1, y1) in enumerate((EFFUSION_R1, EFFUSION_R2)):
        np.testing.assert_allclose(got.boxes[a, slot], [x0 * 64 / cols, y0 * 64 / rows, x1 * 64 / cols, y1 * 64 / rows],
                                   rtol=1e-6)
        assert got.labels[a, slot] == 0
    assert got.readers[a, 0] != got.readers[a, 1] and (got.readers[a, :2] != NO_READER).all()


def test_demo_box_copies_move_training_boxes_into_vindr_and_rsna(tiny_demo, tmp_path):
    import shutil

    from cxr_lightning.data import cohort, nih
    from cxr_lightning.data.demo.box_copies import write_box_copies

    root = tmp_path / "demo"
    shutil.copytree(tiny_demo, root)
    before = nih.read_bbox_table(root / nih.BBOX_TABLE)
    test = set((root / nih.TEST_LIST).read_text().split())
    counts = write_box_copies(root, val_fraction=0.15, split_seed=0)
    after = nih.read_bbox_table(root / nih.BBOX_TABLE)
    assert after[nih.IMAGE].isin(test).all() and len(after) == (before[nih.IMAGE].isin(test)).sum()  # NIH-like
    assert counts["nih_test_boxes"] == len(after)
    mapping = rsna_pneumonia.read_mapping(root / "rsna_pneumonia" / rsna_pneumonia.MAPPING)
    assert set(mapping.index) == set(rsna_pneumonia.read(root / "rsna_pneumonia").table["Image Index"])
    assert not set(mapping.values) & test  # copies of train_val images only
    moved_pneumonia = before[~before[nih.IMAGE].isin(test) & (before["Finding Label"] == "Pneumonia")]
    assert len(rsna_pneumonia.read_boxes(root / "rsna_pneumonia")) == len(moved_pneumonia) == counts["rsna_boxes"]
    # VinDr: two readers draw every local box of a non-validation train_val image; the vote keeps both.
    table = nih.read_label_table(root / nih.LABEL_TABLE)
    split = cohort.split_by_patient(table, nih.read_split_lists(root), 0.15, 0.0, 0)
    train = set(table.loc[split == "train", nih.IMAGE])
    local = before[before[nih.IMAGE].isin(train) & (before["Finding Label"] != "Pneumonia")]
    vindr = vindr_cxr.read_boxes(root / "vindr_cxr")
    assert len(vindr) == 2 * len(local) == counts["vindr_boxes"] > 0
    assert set(vindr["Reader"]) == {"R1", "R2"}


@pytest.mark.parametrize("layout", ["physionet", "kaggle"])
def test_inspect_counts_images_and_boxes_from_the_label_tables_alone(tmp_path, layout):
    from cxr_lightning.data.spec import DataSpec
    from cxr_lightning.tasks.inspect import inspect_spec

    ims = vindr_images() if layout == "physionet" else vindr_images()[:3]
    vindr = write_vindr(tmp_path / "v", ims, layout=layout, dicoms=False)  # Kaggle: train.csv alone
    rsna = write_rsna(tmp_path / "r", rsna_images(), class_info=False, dicoms=False)  # the labels file alone
    record = inspect_spec(DataSpec.from_options(sources={"vindr": {"source": "vindr_cxr", "root": str(vindr)},
                                                         "rsna": {"source": "rsna_pneumonia", "root": str(rsna)}},
                                                label_space="union"))
    v, r = record["sources"]["vindr"], record["sources"]["rsna"]
    # Recount by hand: images (not reads, not box rows), and each label's boxes.
    assert v["rows"] == len(ims) and r["rows"] == 3
    expected = {"Effusion": 2} | ({"Fibrosis": 1} if layout == "physionet" else {})
    assert v["boxes"] == expected  # majority: the one-reader Nodule/Mass box is not kept
    assert r["boxes"] == {"Pneumonia": 2}
    assert r["labels"]["No Finding"]["unavailable"]  # no class info: not guessed


def test_nih_box_protocol_without_an_nih_source_is_refused_before_any_image_is_read(tmp_path):
    """data.boxes.folds folds NIH's boxed test patients: a run with no NIH source has none to fold."""
    from cxr_lightning.data.spec import DataSpec
    from cxr_lightning.data.tables import build_tables

    vindr = write_vindr(tmp_path / "v", vindr_images(), dicoms=False)  # no image on disk: refused first
    spec = DataSpec.from_options(source="vindr_cxr", root=str(vindr), boxes={"folds": 3, "fold": 0})
    with pytest.raises(ConfigError, match=r"data.boxes.folds is NIH's boxed-image protocol; data=vindr_cxr has no NIH"):
        build_tables(spec)


def test_box_sources_have_their_own_data_configs(tmp_path):
    """`data=vindr_cxr` and `data=rsna_pneumonia` compose and read their label tables through inspect."""
    from helpers import compose_config

    from cxr_lightning.tasks.inspect import inspect

    vindr = write_vindr(tmp_path / "v", vindr_images(), layout="physionet", dicoms=False)
    rsna = write_rsna(tmp_path / "r", rsna_images(), class_info=False, dicoms=False)
    for name, root, rows in (("vindr_cxr", vindr, len(vindr_images())), ("rsna_pneumonia", rsna, 3)):
        out = tmp_path / f"{name}.json"
        cfg = compose_config([f"data={name}", f"data.root={root}", f"output={out}", f"paths.output_dir={tmp_path}"],
                             "inspect")
        record = inspect(cfg)
        (only,) = record["sources"].values()
        assert only["source"] == name and only["rows"] == rows
        assert json.loads(out.read_text())["sources"] == record["sources"]
