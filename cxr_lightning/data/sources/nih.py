"""NIH ChestX-ray14 (``data=nih``) and the generated demo in its layout (``data=demo``).

The file formats (label tables, split lists, box table, image folders) are read by
:mod:`cxr_lightning.data.nih`; here they become a source: every NIH label is its own concept,
all images are frontal, and NIH's official lists split the patients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning import labels
from cxr_lightning.data import cohort, nih
from cxr_lightning.data.sources import common
from cxr_lightning.data.sources.base import Source, register

HARMONISATION = {name: (name,) for name in labels.ALL_LABELS}


def read_nih(root: Path, label_table: str = "auto") -> common.SourceData:
    """NIH's label table (any of its formats) in the standard table: every NIH label, all frontal."""
    path = nih.find_label_table(root) if label_table == "auto" else Path(root) / label_table
    table = nih.read_label_table(path)
    names = labels.label_names()
    encoded = labels.encode_labels(table[nih.FINDING_LABELS], names, source=path.name)
    table[[common.FINDING_PREFIX + n for n in names]] = encoded.astype(float)
    table[common.FRONTAL] = True  # NIH released frontal views only
    table[common.OFFICIAL_SPLIT] = np.nan
    return common.SourceData(table, path, names)


@register
class NIH(Source):
    name = "nih"
    title = "NIH ChestX-ray14"
    harmonisation = HARMONISATION
    nih_layout = True
    hint = (
        f"the folder holding the NIH download ({nih.LABEL_TABLE}, {nih.TRAIN_VAL_LIST}, {nih.TEST_LIST}, "
        f"{nih.BBOX_TABLE}, images_001/ ... images_012/)"
    )

    def read(self) -> common.SourceData:
        return read_nih(self.root, self.label_table)

    def attach_paths(self, table: pd.DataFrame, on_missing: str) -> pd.DataFrame:
        return nih.attach_paths(table, self.root, on_missing)

    def split(self, table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
        return cohort.split_by_patient(table, nih.read_split_lists(self.root), val_fraction, test_fraction, seed)

    def read_boxes(self) -> pd.DataFrame | None:
        path = self.root / nih.BBOX_TABLE
        return nih.read_bbox_table(path) if path.exists() else None


@register
class Demo(NIH):
    name = "demo"
    title = "the generated demo (NIH layout; a demo, not evidence)"
