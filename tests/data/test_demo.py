"""The demo generator writes NIH's exact layout, deterministically, with localised signs and
label statistics that carry the intended signal."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_lightning.cli import demo_main as main
from cxr_lightning.data import demo, nih
from cxr_lightning.errors import ConfigError
from cxr_lightning.labels import FINDINGS, NO_FINDING, encode_labels

SMALL = dict(patients=30, image_size=64, seed=0)

# NIH's files, byte for byte, and what pandas makes of their unquoted bracketed headers.
NIH_LABEL_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)
NIH_LABEL_COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
NIH_BBOX_COLUMNS = [
    "Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "Unnamed: 6", "Unnamed: 7", "Unnamed: 8"
]
NIH_BOX_LABELS = {
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax"
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _multi_hot(table: pd.DataFrame) -> pd.DataFrame:
    names = list(FINDINGS) + [NO_FINDING]
    return pd.DataFrame(encode_labels(table["Finding Labels"], names), columns=names, index=table.index)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 40 per folder so that ~90 images spill over into images_002, images_003.
    return demo.generate(tmp_path_factory.mktemp("demo") / "a", images_per_folder=40, **SMALL)


@pytest.fixture(scope="module")
def big_table() -> pd.DataFrame:
    return demo.sample_table(patients=2000, seed=1)


# ---------------------------------------------------------------------------------------------
# Layout


def test_layout_matches_nih(small_demo: Path) -> None:
    label_text = (small_demo / "Data_Entry_2017_v2020.csv").read_text()
    assert label_text.startswith(NIH_LABEL_HEADER)
    assert (small_demo / "BBox_List_2017.csv").read_text().startswith(NIH_BBOX_HEADER)
    raw = pd.read_csv(small_demo / "Data_Entry_2017_v2020.csv")
    assert list(raw.columns) == NIH_LABEL_COLUMNS
    assert (raw["OriginalImage[Width"] == 1024).all() and (raw["Height]"] == 1024).all()
    assert raw["Patient Age"].dtype.kind == "i" and set(raw["Patient Gender"]) <= {"M", "F"}
    assert set(raw["View Position"]) <= {"PA", "AP"}
    assert list(pd.read_csv(small_demo / "BBox_List_2017.csv").columns) == NIH_BBOX_COLUMNS

    names = raw["Image Index"]
    parsed = names.str.extract(r"^(\d{8})_(\d{3})\.png$").astype(int)
    assert (parsed[0] == raw["Patient ID"]).all()
    visits = raw.groupby("Patient ID")
    # Follow-up # counts a patient's visits 0..n-1 in table order; file numbers are the same set.
    assert (visits.cumcount() == raw["Follow-up #"]).all()
    files = pd.DataFrame({"patient": raw["Patient ID"], "number": parsed[1]}).sort_values(["patient", "number"])
    assert (files.groupby("patient").cumcount() == files["number"]).all()

    pngs = sorted(small_demo.glob("images_*/images/*.png"))
    assert sorted(p.name for p in pngs) == sorted(names)
    folders = pd.Series([p.parent.parent.name for p in pngs], index=[p.name for p in pngs]).sort_index()
    sizes = folders.value_counts().sort_index()
    assert list(sizes.index) == [f"images_{i:03d}" for i in range(1, len(sizes) + 1)] and len(sizes) >= 3
    assert (sizes.iloc[:-1] == 40).all() and sizes.iloc[-1] <= 40
    assert folders.is_monotonic_increasing  # NIH folders hold consecutive names
    with Image.open(pngs[0]) as img:
        assert img.mode == "L" and img.size == (64, 64)


def test_split_lists_are_patient_disjoint_and_cover_the_table(small_demo: Path) -> None:
    table = pd.read_csv(small_demo / "Data_Entry_2017_v2020.csv")
    train_val = (small_demo / "train_val_list.txt").read_text().splitlines()
    test = (small_demo / "test_list.txt").read_text().splitlines()
    assert train_val == sorted(train_val) and test == sorted(test)
    assert sorted(train_val + test) == sorted(table["Image Index"])
    patients = table.set_index("Image Index")["Patient ID"]
    assert not set(patients[train_val]) & set(patients[test])
    assert test


def test_follow_up_differs_from_file_number_for_a_few_patients(big_table: pd.DataFrame) -> None:
    file_number = big_table["Image Index"].str[9:12].astype(int)
    differs = (file_number != big_table["Follow-up #"]).groupby(big_table["Patient ID"]).any()
    multi_visit = big_table.groupby("Patient ID").size() > 1
    assert 0.02 < differs[multi_visit].mean() < 0.2
    assert not differs[~multi_visit].any()


def test_nih_loader_reads_the_demo(small_demo: Path) -> None:
    raw = pd.read_csv(small_demo / "Data_Entry_2017_v2020.csv")
    table = nih.read_label_table(small_demo / "Data_Entry_2017_v2020.csv")
    assert list(table["Image Index"]) == list(raw["Image Index"])
    assert (table["Patient Age"] == raw["Patient Age"]).all()
    # The 1024 the loader reads is what it rescales the 1024-space boxes by.
    assert (table["OriginalImage Width"] == 1024).all() and (table["OriginalImage Height"] == 1024).all()
    raw_boxes = pd.read_csv(small_demo / "BBox_List_2017.csv", usecols=range(6))
    boxes = nih.read_bbox_table(small_demo / "BBox_List_2017.csv")
    assert list(boxes["Finding Label"]) == list(raw_boxes["Finding Label"].replace({"Infiltrate": "Infiltration"}))
    assert np.allclose(boxes[["x", "y", "w", "h"]].to_numpy(), raw_boxes.iloc[:, 2:6].to_numpy())


def test_refuses_a_non_empty_output_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        demo.generate(tmp_path, **SMALL)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "cli"), "--patients", "4", "--image-size", "32", "--seed", "3"]) == 0
    assert "images of 4 patients" in capsys.readouterr().out
    assert (tmp_path / "cli" / "Data_Entry_2017_v2020.csv").exists()
    with pytest.raises(SystemExit) as exit_status:
        main(["--out", str(tmp_path / "cli"), "--patients", "4"])
    assert exit_status.value.code == 2
    assert "not an empty directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_bytes_whatever_the_workers(small_demo: Path, tmp_path: Path) -> None:
    again = demo.generate(tmp_path / "b", images_per_folder=40, workers=2, **SMALL)
    assert _files(again) == _files(small_demo)


def test_different_seed_gives_different_files(small_demo: Path, tmp_path: Path) -> None:
    other = _files(demo.generate(tmp_path / "c", images_per_folder=40, **{**SMALL, "seed": 1}))
    mine = _files(small_demo)
    assert other["Data_Entry_2017_v2020.csv"] != mine["Data_Entry_2017_v2020.csv"]
    shared = [k for k in mine if k.endswith(".png") and k in other]
    assert shared and all(other[k] != mine[k] for k in shared)


def test_images_false_writes_the_same_tables_without_pixels(small_demo: Path, tmp_path: Path) -> None:
    tables = demo.generate(tmp_path / "t", images=False, images_per_folder=40, **SMALL)
    assert not list(tables.rglob("*.png"))
    assert _files(tables) == {k: v for k, v in _files(small_demo).items() if not k.endswith(".png")}


# ---------------------------------------------------------------------------------------------
# Boxes


def test_boxes_lie_in_1024_space_on_findings_the_image_has(small_demo: Path) -> None:
    boxes = pd.read_csv(small_demo / "BBox_List_2017.csv", usecols=range(6))
    boxes.columns = ["image", "label", "x", "y", "w", "h"]
    assert len(boxes) > 0 and set(boxes["label"]) <= NIH_BOX_LABELS
    assert (boxes[["x", "y"]] >= 0).all().all() and (boxes[["w", "h"]] > 0).all().all()
    assert ((boxes["x"] + boxes["w"]) <= 1024).all() and ((boxes["y"] + boxes["h"]) <= 1024).all()
    # The PNGs are 64 px, yet boxes reach far beyond 64: they are in the original space.
    assert (boxes["x"] + boxes["w"]).max() > 256
    labels = pd.read_csv(small_demo / "Data_Entry_2017_v2020.csv").set_index("Image Index")["Finding Labels"]
    for image, label in zip(boxes["image"], boxes["label"]):
        assert label.replace("Infiltrate", "Infiltration") in labels[image].split("|")


def test_about_half_the_positives_of_box_classes_get_a_box() -> None:
    table = demo.sample_table(patients=150, seed=2)
    boxes = demo.sample_boxes(table, seed=2)
    positives = _multi_hot(table)[list(demo.BOX_FINDINGS)].to_numpy().sum()
    assert 0.35 < len(boxes) / positives < 0.65
    assert not boxes.duplicated(["Image Index", "Finding Label"]).any()


# ---------------------------------------------------------------------------------------------
# Signs


def _pixel_box(box: tuple[float, float, float, float], size: int) -> tuple[slice, slice]:
    x, y, w, h = (v * size / 1024 for v in box)
    # One pixel of slack for pixels whose centre falls just outside the box.
    return slice(max(int(y) - 1, 0), int(np.ceil(y + h)) + 1), slice(max(int(x) - 1, 0), int(np.ceil(x + w)) + 1)


@pytest.mark.parametrize("finding", FINDINGS)
@pytest.mark.parametrize("patient, view", [(3, "PA"), (11, "AP")])
def test_each_sign_is_localised_in_a_tight_box(finding: str, patient: int, view: str) -> None:
    size = 96
    plain = demo.draw_chest(size, 0, patient, 1, [], view).astype(int)
    marked = demo.draw_chest(size, 0, patient, 1, [finding], view).astype(int)
    diff = np.abs(marked - plain)
    box = demo.finding_box(0, patient, 1, finding, view)
    rows, cols = _pixel_box(box, size)
    assert (diff >= 8).sum() >= 3, f"{finding} is barely visible"
    assert diff[rows, cols].sum() >= 0.98 * diff.sum(), f"{finding} changes pixels outside its box"
    changed_rows, changed_cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    changed_area = (changed_rows[-1] + 1 - changed_rows[0]) * (changed_cols[-1] + 1 - changed_cols[0])
    assert changed_area >= 0.4 * box[2] * box[3] * (size / 1024) ** 2, f"{finding}'s box is loose"
    # Emphysema inflates both lungs and Edema hazes both hila; every other sign is focal.
    limit = {"Emphysema": 0.45, "Edema": 0.2}.get(finding, 0.12)
    assert box[2] * box[3] < limit * 1024**2, f"{finding}'s box is not localised"


def test_signs_differ_between_findings() -> None:
    plain = demo.draw_chest(64, 0, 5, 0, []).astype(int)
    signs = np.stack([(demo.draw_chest(64, 0, 5, 0, [f]).astype(int) - plain).ravel() for f in FINDINGS])
    distances = np.abs(signs[:, None, :] - signs[None, :, :]).sum(axis=2)
    assert (distances[~np.eye(len(FINDINGS), dtype=bool)] > 0).all()


def test_a_persisting_nodule_stays_in_place() -> None:
    first, later = (demo.finding_box(0, 8, visit, "Nodule") for visit in (0, 3))
    centres = [(x + w / 2, y + h / 2) for x, y, w, h in (first, later)]
    assert np.hypot(*np.subtract(*centres)) < 40  # px of 1024: same spot, a little jitter


def test_a_sign_is_drawn_the_same_at_every_size() -> None:
    # Boxes do not depend on the image size, so the 1024-space box fits a 64-px and a 128-px image.
    small = demo.draw_chest(64, 0, 4, 0, ["Mass"]).astype(float) - demo.draw_chest(64, 0, 4, 0, []).astype(float)
    large = demo.draw_chest(128, 0, 4, 0, ["Mass"]).astype(float) - demo.draw_chest(128, 0, 4, 0, []).astype(float)
    pooled = large.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), pooled.ravel())[0, 1] > 0.9


# ---------------------------------------------------------------------------------------------
# Label statistics (tables only: fast at 2,000 patients)


def test_label_frequencies_are_shaped_like_nih(big_table: pd.DataFrame) -> None:
    freq = _multi_hot(big_table).mean()
    assert 0.4 < freq[NO_FINDING] < 0.6
    findings = freq[list(FINDINGS)]
    assert findings.idxmax() == "Infiltration" and findings.idxmin() == "Hernia"
    assert findings.min() > 0.02  # rare classes oversampled
    counts = big_table.groupby("Patient ID").size()
    assert counts.min() == 1 and counts.max() == 6 and 2.5 < counts.mean() < 3.5


def test_findings_persist_between_visits(big_table: pd.DataFrame) -> None:
    y = _multi_hot(big_table)[list(FINDINGS)]
    previous = y.groupby(big_table["Patient ID"]).shift(1)
    has_prior = previous.notna().all(axis=1)
    now, before = y[has_prior], previous[has_prior].astype(bool)
    for finding in FINDINGS:
        after_positive = now.loc[before[finding], finding].mean()
        after_negative = now.loc[~before[finding], finding].mean()
        # PERSISTENCE is 0.4: the prior visit predicts, but less than the image's sign does.
        assert after_positive > 0.35 and after_positive > after_negative + 0.3, finding


def _risk_ratio(y: pd.DataFrame, exposed: pd.Series, finding: str) -> float:
    return y.loc[exposed, finding].mean() / y.loc[~exposed, finding].mean()


def test_demographics_shift_the_odds(big_table: pd.DataFrame) -> None:
    # Sicker and older patients are filmed AP more often, so every finding is commoner on AP
    # films; each effect is therefore measured against a finding the factor does not touch.
    y = _multi_hot(big_table)
    ap = big_table["View Position"] == "AP"
    for finding in ("Effusion", "Edema", "Atelectasis"):
        assert _risk_ratio(y, ap, finding) > 1.3 * _risk_ratio(y, ap, "Nodule"), finding
    old = big_table["Patient Age"] >= 55
    for finding in ("Emphysema", "Cardiomegaly"):
        assert _risk_ratio(y, old, finding) > 1.5 * _risk_ratio(y, old, "Infiltration"), finding
    male = big_table["Patient Gender"] == "M"
    assert _risk_ratio(y, male, "Pneumothorax") > 1.4 * _risk_ratio(y, male, "Nodule")
    assert _risk_ratio(y, male, "Hernia") < 0.7 * _risk_ratio(y, male, "Nodule")


def test_ages_grow_with_follow_up(big_table: pd.DataFrame) -> None:
    by_patient = big_table.groupby("Patient ID")["Patient Age"]
    assert (by_patient.diff().dropna() >= 0).all()
    assert (by_patient.diff().dropna() > 0).any()
    assert big_table["Patient Age"].between(1, 99).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_test_split_has_enough_positives_of_each_class(seed: int) -> None:
    table = demo.sample_table(seed=seed)
    test_ids = demo.split_test_patients(table, seed)
    assert 0.17 < len(test_ids) / table["Patient ID"].nunique() < 0.23
    positives = _multi_hot(table)[table["Patient ID"].isin(test_ids)][list(FINDINGS)].sum()
    assert positives.min() >= 8, positives.idxmin()


# ---------------------------------------------------------------------------------------------
# Cached generation


def test_ensure_demo_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = dict(patients=4, image_size=32, seed=5)
    first = demo.ensure_demo(tmp_path, workers=1, **params)
    assert re.fullmatch(r"demo-[0-9a-f]{10}", first.name) and first.parent == tmp_path
    assert (first / "Data_Entry_2017_v2020.csv").exists()
    before = _files(first)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a cached demo")

    monkeypatch.setattr(demo.write, "generate", refuse)
    assert demo.ensure_demo(tmp_path, **params) == first
    assert _files(first) == before
    assert not [p for p in tmp_path.iterdir() if p != first]  # no temporary folders left


def test_ensure_demo_never_reuses_an_interrupted_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_generate = demo.generate

    def interrupted(out: Path, **kwargs: object) -> None:
        real_generate(out, **{**kwargs, "images": False})
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.write, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(tmp_path, patients=3, image_size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo.write, "generate", real_generate)
    done = demo.ensure_demo(tmp_path, patients=3, image_size=32)
    assert list(done.rglob("*.png"))


def test_ensure_demo_separates_parameters_and_rejects_unknown_ones(tmp_path: Path) -> None:
    a = demo.ensure_demo(tmp_path, patients=3, image_size=32, seed=0)
    b = demo.ensure_demo(tmp_path, patients=3, image_size=32, seed=1)
    assert a != b
    with pytest.raises(ConfigError, match=r"\[.pateints.\] unknown"):
        demo.ensure_demo(tmp_path, pateints=3)
