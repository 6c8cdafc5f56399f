"""The demo's boxed training images as box sources: VinDr-CXR and RSNA Pneumonia copies.

Real NIH ships its boxes on test images only, so box-guided training needs a second source. For
the box study on the demo (``python -m cxr_lightning.demo --out DIR --box-sources``),
:func:`write_box_copies` makes the demo look like that: ``BBox_List_2017.csv`` keeps the boxes of
``test_list.txt`` images only, and the boxes of the ``train_val_list.txt`` images move to copies of
those images in the two box datasets' published layouts:

- ``DIR/rsna_pneumonia/``: the train_val images with a Pneumonia box, as RSNA's stage 2 files
  (Target 1 with the boxes, class "Lung Opacity"), the other boxed ones as "No Lung Opacity / Not
  Normal", DICOMs, and RSNA's mapping file linking each copy to its demo (NIH-layout) image, as
  RSNA's images are NIH's;
- ``DIR/vindr_cxr/``: the boxed train_val images in VinDr-CXR's PhysioNet layout (its local
  findings boxed; Pneumonia, a diagnosis in VinDr, an image label only), read by three
  radiologists of whom two draw the boxes (the majority vote keeps them) and one marks nothing.

These copies are demo data, not evidence: the same synthetic chests under other file names. The
demo's validation patients are drawn from train_val when a run starts, so some copies are twins of
validation images: the RSNA ones are left out of training by the leakage rule (its mapping file),
and the VinDr ones, which VinDr cannot link, are skipped here by the same draw the demo's NIH
split makes (``val_fraction``, ``split_seed``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_lightning.data import cohort, nih
from cxr_lightning.files import write_text

RSNA_DIR, VINDR_DIR = "rsna_pneumonia", "vindr_cxr"
# NIH labels -> VinDr-CXR's class names (Mass and Nodule share VinDr's one class).
_VINDR_NAMES = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural effusion",
                "Infiltration": "Infiltration", "Mass": "Nodule/Mass", "Nodule": "Nodule/Mass",
                "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
                "Edema": "Edema", "Emphysema": "Emphysema", "Fibrosis": "Pulmonary fibrosis",
                "Pleural_Thickening": "Pleural thickening", "Hernia": "Other diseases"}
_VINDR_COLUMNS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
)


def write_box_copies(root: Path, val_fraction: float = 0.15, split_seed: int = 0) -> dict[str, int]:
    """Move the boxes of ``root``'s train_val images into VinDr-CXR and RSNA copies (module
    docstring); returns how many images and boxes each copy holds."""
    root = Path(root)
    table = nih.read_label_table(root / nih.LABEL_TABLE)
    boxes = nih.read_bbox_table(root / nih.BBOX_TABLE)
    test = set((root / nih.TEST_LIST).read_text().split())
    on_test = boxes[nih.IMAGE].isin(test)
    kept, moved = boxes[on_test], boxes[~on_test]
    path_of = nih.attach_paths(table, root).set_index(nih.IMAGE)["path"]
    split = cohort.split_by_patient(table, nih.read_split_lists(root), val_fraction, 0.0, split_seed)
    in_val = set(table.loc[split == "val", nih.IMAGE])
    findings = table.set_index(nih.IMAGE)[nih.FINDING_LABELS].str.split("|")
    has_pneumonia = {n for n, f in findings.items() if "Pneumonia" in f}
    boxed_pneumonia = set(moved.loc[moved["Finding Label"] == "Pneumonia", nih.IMAGE])
    # RSNA's Target says whether there is pneumonia: an image with it but without its box cannot be said so.
    rsna = set(moved[nih.IMAGE]) - (has_pneumonia - boxed_pneumonia)
    vindr = set(moved[nih.IMAGE]) - in_val
    # VinDr-CXR boxes its local findings only; its Pneumonia is an image-level diagnosis.
    local = moved["Finding Label"] != "Pneumonia"
    counts = {
        **_write_rsna(root / RSNA_DIR, moved[moved[nih.IMAGE].isin(rsna)], boxed_pneumonia, path_of),
        **_write_vindr(root / VINDR_DIR, moved[moved[nih.IMAGE].isin(vindr) & local], findings, path_of),
    }
    spelled = kept.assign(**{"Finding Label": kept["Finding Label"].replace({"Infiltration": "Infiltrate"})})
    body = spelled.to_csv(header=False, index=False, lineterminator="\n", float_format="%.15g")
    write_text(root / nih.BBOX_TABLE, nih.BBOX_TABLE_HEADER + "\n" + body)
    counts["nih_test_boxes"] = len(kept)
    return counts


def _copy_id(name: str, kind: str) -> str:
    return hashlib.sha256(f"{kind}:{name}".encode()).hexdigest()[:32]


def _write_rsna(out: Path, moved: pd.DataFrame, pneumonia: set[str], path_of: pd.Series) -> dict[str, int]:
    labels, info, mapping = ["patientId,x,y,width,height,Target"], ["patientId,class"], []
    n_boxes = 0
    for name in sorted(set(moved[nih.IMAGE])):
        pid = _copy_id(name, "rsna")
        pixels = np.asarray(Image.open(path_of[name]).convert("L"))
        scale = pixels.shape[0] / nih.ORIGINAL_SIZE
        mine = moved[(moved[nih.IMAGE] == name) & (moved["Finding Label"] == "Pneumonia")]
        if name in pneumonia:
            for b in mine.itertuples(index=False):
                labels.append(f"{pid},{b.x * scale:.1f},{b.y * scale:.1f},{b.w * scale:.1f},{b.h * scale:.1f},1")
                info.append(f"{pid},Lung Opacity")
                n_boxes += 1
        else:
            labels.append(f"{pid},,,,,0")
            info.append(f"{pid},No Lung Opacity / Not Normal")
        mapping.append({"img_id": name.removesuffix(".png"), "subset_img_id": pid})
        _write_dicom(out / "stage_2_train_images" / f"{pid}.dcm", pixels, bits=8)
    write_text(out / "stage_2_train_labels.csv", "\n".join(labels) + "\n")
    write_text(out / "stage_2_detailed_class_info.csv", "\n".join(info) + "\n")
    write_text(out / "pneumonia-challenge-dataset-mappings_2018.json", json.dumps(mapping, indent=1))
    return {"rsna_images": len(mapping), "rsna_boxes": n_boxes}


def _write_vindr(out: Path, moved: pd.DataFrame, findings: pd.Series, path_of: pd.Series) -> dict[str, int]:
    header = "image_id,rad_id," + ",".join(_VINDR_COLUMNS)
    labels, annotations = [header], ["image_id,rad_id,class_name,x_min,y_min,x_max,y_max"]
    n_boxes = 0
    for name in sorted(set(moved[nih.IMAGE])):
        image_id = _copy_id(name, "vindr")
        pixels = np.asarray(Image.open(path_of[name]).convert("L"))
        scale = pixels.shape[0] / nih.ORIGINAL_SIZE
        mine = moved[moved[nih.IMAGE] == name]
        classes = {_VINDR_NAMES[f] for f in findings[name] if f in _VINDR_NAMES}
        for reader, draws in (("R1", True), ("R2", True), ("R3", False)):
            marks = [int(draws and c in classes) for c in _VINDR_COLUMNS[:-1]] + [int(not (draws and classes))]
            labels.append(f"{image_id},{reader}," + ",".join(map(str, marks)))
            for finding, x, y, w, h in (
                mine[["Finding Label", "x", "y", "w", "h"]].itertuples(index=False) if draws else ()
            ):
                x0, y0, x1, y1 = x * scale, y * scale, (x + w) * scale, (y + h) * scale
                annotations.append(f"{image_id},{reader},{_VINDR_NAMES[finding]},{x0:.1f},{y0:.1f},{x1:.1f},{y1:.1f}")
                n_boxes += 1
            if not draws:
                annotations.append(f"{image_id},{reader},No finding,,,,")
        _write_dicom(out / "train" / f"{image_id}.dicom", pixels, bits=12)
    write_text(out / "annotations" / "image_labels_train.csv", "\n".join(labels) + "\n")
    write_text(out / "annotations" / "annotations_train.csv", "\n".join(annotations) + "\n")
    return {"vindr_images": (len(labels) - 1) // 3, "vindr_boxes": n_boxes}


def _write_dicom(path: Path, pixels: np.ndarray, bits: int) -> None:
    """``pixels`` (uint8) as a ``bits``-bit MONOCHROME2 DICOM radiograph, as pydicom writes it."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (pixels.astype("<u2") * 16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
