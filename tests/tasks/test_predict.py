"""Prediction on new files: every format gives the training pixels, metadata is built as in training,
bad and lateral files are named while the others are still predicted."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, compose_config, fit_tiny, write_dicom
from PIL import Image

from cxr_lightning.calibration import Calibration
from cxr_lightning.checkpoints import load_model
from cxr_lightning.data.cohort import new_patient_metadata
from cxr_lightning.errors import DataError
from cxr_lightning.operating_point import save_calibration, save_thresholds
from cxr_lightning.run_dir import calibration_path
from cxr_lightning.tasks.build import datamodule_for
from cxr_lightning.tasks.evaluate import predict_split
from cxr_lightning.tasks.predict import predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    return fit_tiny(tiny_demo, tmp_path_factory.mktemp("run"), head="fusion_residual")


@pytest.fixture(scope="module")
def model(fitted):
    return load_model(fitted[1])


@pytest.fixture()
def gray(tiny_demo) -> np.ndarray:
    """A demo X-ray (64 px) stretched to the full 0..255 range, so DICOM min-max scaling keeps it."""
    pixels = np.asarray(Image.open(next((tiny_demo / "images_001" / "images").glob("*.png"))).convert("L")).copy()
    pixels[0, 0], pixels[0, 1] = 0, 255
    return pixels


def run_predict(ckpt: Path, input_path: Path, output: Path, *extra: str):
    overrides = [f"ckpt_path={ckpt}", f"input={input_path}", f"output={output}", "batch_size=4", *extra]
    return predict(compose_config(overrides, config_name="predict"))


def write_all_formats(folder: Path, gray: np.ndarray) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    files = {
        "png_L": folder / "gray.png",
        "png_16bit": folder / "gray16.png",
        "png_RGB": folder / "rgb.png",
        "png_RGBA": folder / "rgba.png",
        "jpeg": folder / "photo.jpg",
        "dicom_MONOCHROME2": folder / "mono2.dcm",
        "dicom_MONOCHROME1": folder / "mono1.dcm",
    }
    Image.fromarray(gray).save(files["png_L"])
    Image.fromarray(gray.astype(np.uint16) * 257).save(files["png_16bit"])  # 255 -> 65535
    Image.fromarray(rgb).save(files["png_RGB"])
    Image.fromarray(np.dstack([rgb, np.full_like(gray, 200)])).save(files["png_RGBA"])
    Image.fromarray(gray).save(files["jpeg"], quality=100, subsampling=0)
    stored = gray.astype(np.uint16) * 16  # 12-bit detector values
    write_dicom(files["dicom_MONOCHROME2"], stored, "MONOCHROME2")
    write_dicom(files["dicom_MONOCHROME1"], 4080 - stored, "MONOCHROME1")  # bright bone stored low
    return files


def test_every_format_of_the_same_pixels_gives_the_same_prediction(fitted, gray, tmp_path):
    _, ckpt = fitted
    files = write_all_formats(tmp_path / "in", gray)
    Image.fromarray(255 - gray).save(tmp_path / "in" / "negative.png")  # what a missed inversion would see
    run = run_predict(ckpt, tmp_path / "in", tmp_path / "preds.csv")
    assert not run.failures
    table = pd.read_csv(tmp_path / "preds.csv").set_index("file")
    labels = list(load_model(ckpt).hparams.label_names)
    assert list(table.columns[: len(labels)]) == labels
    probs = table[labels]
    reference = probs.loc[str(files["png_L"])].to_numpy()
    negative = probs.loc[str(tmp_path / "in" / "negative.png")].to_numpy()
    # The model must tell the two apart, or the comparisons below could not fail.
    assert np.abs(negative - reference).max() > 1e-4
    for kind, path in files.items():
        tolerance = 1e-4 if kind == "jpeg" else 1e-6
        np.testing.assert_allclose(probs.loc[str(path)].to_numpy(), reference, atol=tolerance, err_msg=kind)


def test_predictions_match_the_evaluation_path_for_first_visits(fitted, model, tmp_path):
    """Metadata from a demographics CSV is encoded exactly as training encodes the label table."""
    dm = datamodule_for(model, {"num_workers": 0})
    probs, table = predict_split(model, dm, "test")
    first = (table["meta:has_prior"] == 0).to_numpy()
    assert first.sum() >= 3
    table, probs = table[first], probs[first]
    pd.DataFrame(
        {
            "Image Index": table["Image Index"],
            "age": table["Patient Age"],
            "sex": table["Patient Gender"].str.lower(),
            "view": table["View Position"],
        }
    ).to_csv(tmp_path / "demographics.csv", index=False)
    folder = tmp_path / "in"
    folder.mkdir()
    for path in table["path"]:
        (folder / Path(path).name).symlink_to(path)
    run = run_predict(fitted[1], folder, tmp_path / "p.csv", f"demographics={tmp_path / 'demographics.csv'}")
    got = run.predictions.set_index(run.predictions["file"].map(lambda f: Path(f).name))
    expected = pd.DataFrame(probs, index=table["Image Index"].to_numpy(), columns=model.hparams.label_names)
    np.testing.assert_allclose(got.loc[expected.index, expected.columns].to_numpy(), expected.to_numpy(), atol=1e-6)
    assert (got.loc[expected.index, "sex"].to_numpy() == table["Patient Gender"].to_numpy()).all()


def test_dicom_header_demographics_equal_the_same_values_from_csv(fitted, gray, tmp_path):
    _, ckpt = fitted
    folder = tmp_path / "in"
    folder.mkdir()
    write_dicom(folder / "tagged.dcm", gray.astype(np.uint16) * 16, "MONOCHROME2",
                PatientAge="067Y", PatientSex="M", ViewPosition="AP")
    Image.fromarray(gray).save(folder / "plain.png")
    Image.fromarray(gray).save(folder / "unknown.png")
    (tmp_path / "demo.csv").write_text("file,age,sex,view\nplain.png,67,M,AP\n")
    run = run_predict(ckpt, folder, tmp_path / "p.csv", f"demographics={tmp_path / 'demo.csv'}")
    probs = run.predictions.set_index("file")[load_model(ckpt).hparams.label_names]
    tagged, plain, unknown = (probs.loc[str(folder / n)].to_numpy() for n in ("tagged.dcm", "plain.png", "unknown.png"))
    np.testing.assert_allclose(tagged, plain, atol=1e-6)
    assert np.abs(unknown - plain).max() > 1e-6  # the demographics did reach the model
    used = run.predictions.set_index("file").loc[str(folder / "tagged.dcm")]
    assert (used["age"], used["sex"], used["view"]) == (67.0, "M", "AP")


def test_new_patient_metadata_follows_training_encoding_and_checkpoint_order():
    demographics = pd.DataFrame(
        {"age": [40.0, np.nan, 130.0], "sex": ["F", "M", None], "view": ["AP", None, "PA"]},
        index=["a.png", "b.png", "c.png"],
    )
    names = ["view_ap", "age", "prior:Effusion", "sex_male", "age_missing", "has_prior"]
    got = new_patient_metadata(demographics, names, age_fill=52.0)
    expected = np.array(
        [
            [1.0, 0.40, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.52, 0.0, 1.0, 1.0, 0.0],  # unknown view: halfway; missing age: training median
            [0.0, 0.52, 0.0, 0.5, 1.0, 0.0],  # age > 100 is missing, as in the NIH table
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(got, expected, atol=1e-7)


def test_findings_use_the_thresholds_saved_by_evaluate(fitted, gray, tmp_path):
    _, ckpt = fitted
    labels = list(load_model(ckpt).hparams.label_names)
    Image.fromarray(gray).save(tmp_path / "x.png")
    with pytest.warns(UserWarning, match="No thresholds file"):
        first = run_predict(ckpt, tmp_path / "x.png", tmp_path / "a.csv")
    p = first.predictions.loc[0, labels].to_numpy(dtype=float)
    assert first.predictions.loc[0, "findings"] == "|".join(n for n, v in zip(labels, p) if v >= 0.5)
    # Thresholds just below the probability for even labels, just above for odd ones.
    thresholds = np.where(np.arange(len(labels)) % 2 == 0, p - 1e-4, p + 1e-4)
    try:
        save_thresholds(ckpt, labels, thresholds, "f1", n_images=1)
        second = run_predict(ckpt, tmp_path / "x.png", tmp_path / "b.csv")
    finally:
        ckpt.with_name(ckpt.stem + ".thresholds.json").unlink()
    assert second.thresholds_file is not None
    assert second.predictions.loc[0, "findings"] == "|".join(labels[::2])
    assert pd.read_csv(tmp_path / "b.csv").loc[0, "findings"] == "|".join(labels[::2])


def test_probability_columns_are_calibrated_and_raw_ones_come_on_request(fitted, gray, tmp_path):
    _, ckpt = fitted
    labels = list(load_model(ckpt).hparams.label_names)
    Image.fromarray(gray).save(tmp_path / "x.png")
    with pytest.warns(UserWarning, match="No calibration file"):
        raw = (
            run_predict(ckpt, tmp_path / "x.png", tmp_path / "raw.csv").predictions.loc[0, labels].to_numpy(dtype=float)
        )
    # a known Platt map per label: sigmoid(0.5 * logit(p) - 1), the identity for the first label
    params = {n: {"slope": 0.5, "intercept": -1.0} for n in labels[1:]} | {labels[0]: {}}
    calibration = Calibration("platt", labels, params, n_images=10, unfitted=[labels[0]])
    logit = np.log(raw) - np.log1p(-raw)
    expected = np.r_[raw[0], 1 / (1 + np.exp(-(0.5 * logit[1:] - 1.0)))]
    thresholds = expected - 1e-6  # every label called, on the calibrated scale
    try:
        save_calibration(ckpt, calibration)
        save_thresholds(ckpt, labels, thresholds, "f1", n_images=10, calibration=calibration)
        run = run_predict(ckpt, tmp_path / "x.png", tmp_path / "cal.csv", "raw_probabilities=true")
    finally:
        calibration_path(ckpt).unlink()
        ckpt.with_name(ckpt.stem + ".thresholds.json").unlink()
    written = pd.read_csv(tmp_path / "cal.csv")
    np.testing.assert_allclose(written.loc[0, labels].to_numpy(dtype=float), expected, rtol=1e-6)
    np.testing.assert_allclose(written.loc[0, [f"raw:{n}" for n in labels]].to_numpy(dtype=float), raw, rtol=1e-6)
    assert run.predictions.loc[0, "findings"] == "|".join(labels)
    plain = run_predict(ckpt, tmp_path / "x.png", tmp_path / "plain.csv").predictions
    assert not [c for c in plain.columns if c.startswith("raw:")]


def predict_command(ckpt: Path, folder: Path, output: Path, hydra_dir: Path) -> subprocess.CompletedProcess:
    """``python -m cxr_lightning.predict`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_lightning.predict", f"ckpt_path={ckpt}", f"input={folder}",
         f"output={output}", f"hydra.run.dir={hydra_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_corrupt_and_lateral_files_are_named_others_predicted_exit_status_one(fitted, gray, tmp_path):
    """The real command line: the summary names each failure, the CSV holds the rest, exit status 1."""
    _, ckpt = fitted
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("good1.png", "good2.png"):
        Image.fromarray(gray).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    write_dicom(folder / "side.dcm", gray.astype(np.uint16) * 16, "MONOCHROME2", ViewPosition="LL")
    output = tmp_path / "preds.csv"
    done = predict_command(ckpt, folder, output, tmp_path / "hydra")
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "2 file(s) could not be predicted" in log
    assert "broken.png" in log and "corrupt or truncated" in log
    assert "side.dcm" in log and "LL is a lateral view" in log
    written = pd.read_csv(output)
    assert sorted(Path(f).name for f in written["file"]) == ["good1.png", "good2.png"]

    # every file refused: nothing written, one error line, the error status
    for name in ("good1.png", "good2.png"):
        (folder / name).unlink()
    none = tmp_path / "none.csv"
    done = predict_command(ckpt, folder, none, tmp_path / "hydra2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("error:") == 1 and "none of the 2 file(s) could be predicted" in done.stderr
    assert "broken.png" in done.stderr and not none.exists() and "Predicted 0" not in done.stdout + done.stderr


def test_cam_overlays_for_the_top_labels_of_every_image(fitted, gray, tmp_path):
    _, ckpt = fitted
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(gray).save(folder / "a.png")
    Image.fromarray(gray[::-1].copy()).save(folder / "sub" / "b.png")
    run = run_predict(ckpt, folder, tmp_path / "out" / "p.csv", "cam=true", "cam_top_k=2")
    assert len(run.cam_files) == 4
    assert {p.parent for p in run.cam_files} == {tmp_path / "out" / "cams"}
    assert sum(p.name.startswith("sub__b_") for p in run.cam_files) == 2
    for path in run.cam_files:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_demographics_csv_names_the_line(fitted, gray, tmp_path):
    _, ckpt = fitted
    Image.fromarray(gray).save(tmp_path / "x.png")
    (tmp_path / "d.csv").write_text("file,age,sex\nx.png,40,F\ny.png,50,unknown\n")
    with pytest.raises(DataError, match=r"sex must be M or F.*line\(s\) \[3\]"):
        run_predict(ckpt, tmp_path / "x.png", tmp_path / "p.csv", f"demographics={tmp_path / 'd.csv'}")
    with pytest.raises(DataError, match="does not exist"):
        run_predict(ckpt, tmp_path / "nothing_here", tmp_path / "p.csv")


def test_predict_warns_about_wrongly_scaled_inputs_and_still_predicts_them(fitted, gray, tmp_path, caplog):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "normal.png")
    Image.fromarray(np.full_like(gray, 7)).save(folder / "constant.png")
    Image.fromarray(np.where(gray > 128, 255, 0).astype(np.uint8)).save(folder / "binary.png")
    Image.fromarray((gray // 16 + 60).astype(np.uint8)).save(folder / "narrow.png")
    run = run_predict(fitted[1], folder, tmp_path / "preds.csv")
    assert len(run.predictions) == 4 and not run.failures
    assert sorted(Path(p).name for p in run.scaling_warnings) == ["binary.png", "constant.png", "narrow.png"]
    why = {Path(p).name: w for p, w in run.scaling_warnings.items()}
    assert "constant" in why["constant.png"] and "binary" in why["binary.png"] and "window" in why["narrow.png"]
    assert "constant.png looks wrongly scaled" in caplog.text


def test_without_a_demographics_file_predict_says_once_what_the_model_assumes(fitted, gray, tmp_path):
    _, ckpt = fitted
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(gray).save(folder / name)
    age = load_model(ckpt).hparams.age_fill
    with pytest.warns(UserWarning, match=rf"no demographics=FILE given.*assumes age {age:.0f} \(the training median") \
            as caught:
        run_predict(ckpt, folder, tmp_path / "p.csv")
    assert len([w for w in caught if "no demographics=FILE" in str(w.message)]) == 1  # once, not per file
    (tmp_path / "demo.csv").write_text("file,age,sex,view\na.png,67,M,AP\nb.png,50,F,PA\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_predict(ckpt, folder, tmp_path / "q.csv", f"demographics={tmp_path / 'demo.csv'}")
    assert not [w for w in seen if "no demographics=FILE" in str(w.message)]  # with the file: no such warning
