"""cxr_lightning/inputs.py: files a user hands in become the same model input for predict and
explain, with demographics from a CSV or the DICOM header."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import write_dicom
from PIL import Image

from cxr_lightning.errors import DataError
from cxr_lightning.explain.inputs import UnknownMetadataWarning, load_named
from cxr_lightning.inputs import ImageFiles, collect_inputs, file_metadata, read_demographics_csv, relative_key

META = ["age", "age_missing", "sex_male", "view_ap", "prior:Effusion", "has_prior"]
AGE_FILL, SIZE = 50.0, 32


@pytest.fixture
def files(tmp_path):
    """A DICOM of a 61-year-old man (AP), a PNG without demographics, a lateral DICOM."""
    raw = (np.arange(48 * 40).reshape(48, 40) % 4096).astype(np.uint16)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    dicom = write_dicom(
        folder / "sub" / "a.dcm", raw, "MONOCHROME2", PatientAge="061Y", PatientSex="M", ViewPosition="AP"
    )
    png = folder / "b.png"
    Image.fromarray((raw // 16).astype(np.uint8)).save(png)
    lateral = write_dicom(folder / "c.dcm", raw, "MONOCHROME2", ViewPosition="LL")
    return folder, dicom, png, lateral


def test_demographics_from_the_dicom_header_and_the_csv(files, tmp_path):
    folder, dicom, png, lateral = files
    root, found = collect_inputs(folder)
    assert root == folder and found == sorted([dicom, png, lateral])
    keys = [relative_key(f, root) for f in found]
    assert keys == ["b.png", "c.dcm", "sub/a.dcm"]
    csv_path = tmp_path / "demo.csv"
    csv_path.write_text("file,age,sex,view\nb.png,30,F,PA\n")
    demographics, meta, refused = file_metadata(found, keys, read_demographics_csv(csv_path), META, AGE_FILL)
    assert list(refused) == [str(lateral)] and "lateral" in refused[str(lateral)]
    # b.png from the CSV, a.dcm from its header; the training encoding, computed by hand.
    expected = np.array([[0.30, 0, 0, 0, 0, 0], [0.61, 0, 1, 1, 0, 0]], np.float32)
    np.testing.assert_allclose(meta, expected, rtol=1e-6)
    assert demographics.loc[str(dicom)].tolist() == [61.0, "M", "AP"]


def test_explain_reads_the_same_metadata_and_pixels_as_predict(files):
    _, dicom, png, lateral = files
    with pytest.warns(UnknownMetadataWarning, match="b.png"):
        shown = load_named([str(dicom), str(png)], SIZE, META, None, AGE_FILL)
    _, predict_meta, _ = file_metadata([dicom, png], [dicom.name, png.name], None, META, AGE_FILL)
    np.testing.assert_array_equal(shown.meta.numpy(), predict_meta)
    # unknown sex and view sit halfway between their codes; the age is the training median, flagged
    np.testing.assert_allclose(predict_meta[1], [AGE_FILL / 100, 1, 0.5, 0.5, 0, 0])
    pixels = ImageFiles([str(dicom), str(png)], predict_meta, SIZE)
    for i in range(2):
        assert np.array_equal(shown.images[i].numpy(), pixels[i]["image"].numpy())
    # A DICOM's demographics feed explain too: a lateral film is refused as predict refuses it.
    with pytest.raises(DataError, match="c.dcm.*lateral"):
        load_named([str(lateral)], SIZE, META, None, AGE_FILL)
    csv = pd.DataFrame({"age": [40.0], "sex": ["F"], "view": ["PA"]}, index=[png.name])
    (meta,) = load_named([str(png)], SIZE, META, None, AGE_FILL, csv).meta.numpy()
    np.testing.assert_allclose(meta, [0.40, 0, 0, 0, 0, 0], rtol=1e-6)


def test_an_undecodable_file_is_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    item = ImageFiles([str(broken)], np.zeros((1, 2), np.float32), SIZE)[0]
    assert "broken.png" in item["error"] and item["image"].shape == (1, SIZE, SIZE)
    with pytest.raises(DataError, match="broken.png"), pytest.warns(UnknownMetadataWarning):
        load_named([str(broken)], SIZE, META, None, AGE_FILL)
