"""No leakage across pooled sources that hold the same images.

RSNA Pneumonia's images are NIH ChestX-ray14 images under new ids, and Google's expert labels
(``nih_google``) are NIH images under their own names. Pooled with NIH (or with each other), one
X-ray can then sit in one source's training split and, as its twin, in another's validation or
test split. Every row of these sources is traced to its NIH image (``Image Index``: NIH's own
name; for RSNA, RSNA's mapping file ``pneumonia-challenge-dataset-mappings_2018.json``) and so to
its NIH patient; a training image whose NIH patient has an image in a validation or test split of
the run, in any source, is left out of training and counted. Pooling RSNA with an NIH source
without the mapping file is refused: its twins could not be found.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lightning.data import nih
from cxr_lightning.data.sources import rsna_pneumonia
from cxr_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# Sources whose images are NIH images, by how a row names its NIH twin.
NIH_NAMED = ("nih", "demo", "nih_google")  # Image Index is NIH's own name
MAPPED = ("rsna_pneumonia",)  # through the publisher's mapping file
TWIN = "nih_twin"
LEFT_OUT = "left out of training: NIH twin in a validation or test split"
JOINED = "moved to training: NIH twin in the training split"


def mapping_file(root: Path | None, options: Mapping | None = None) -> Path | None:
    """The RSNA mapping file of a source: ``options["mapping"]`` when given, else the published
    name in its root; None when there is none."""
    given = (options or {}).get("mapping")
    path = Path(given).expanduser() if given else (Path(root) / rsna_pneumonia.MAPPING if root else None)
    return path if path is not None and path.is_file() else None


def check_pooling(kinds: Mapping[str, str], roots: Mapping[str, Path | None],
                  options: Mapping[str, Mapping] | None = None) -> dict[str, Path]:
    """The mapping file of every RSNA source pooled with an NIH-image source (``kinds``: run name ->
    registered source); ConfigError naming the file when one is missing."""
    options = options or {}
    nih_sources = sorted(n for n, k in kinds.items() if k in NIH_NAMED)
    found: dict[str, Path] = {}
    for name, kind in kinds.items():
        if kind not in MAPPED:
            continue
        path = mapping_file(roots.get(name), options.get(name))
        if path is not None:
            found[name] = path
        elif nih_sources:
            raise ConfigError(
                f"data.sources.{name} (rsna_pneumonia) is pooled with {nih_sources}, whose images it shares under "
                f"other ids; without RSNA's mapping file {rsna_pneumonia.MAPPING} an RSNA training image could be "
                f"a validation or test image's twin. Put the file in data.sources.{name}.root (download it from "
                f"{rsna_pneumonia.MAPPING_URL}) or name it with data.sources.{name}.mapping=FILE."
            )
    return found


def nih_twins(table: pd.DataFrame, kinds: Mapping[str, str], mappings: Mapping[str, Path],
              source_col: str = "source") -> pd.Series:
    """The NIH ``Image Index`` of each row of ``table`` (NaN where it is no NIH image or unmapped)."""
    out = pd.Series(np.nan, index=table.index, dtype=object)
    for name, kind in kinds.items():
        mine = table[source_col] == name
        if kind in NIH_NAMED:
            out[mine] = table.loc[mine, nih.IMAGE]
        elif kind in MAPPED and name in mappings:
            mapping = rsna_pneumonia.read_mapping(mappings[name])
            out[mine] = table.loc[mine, nih.IMAGE].map(mapping)
    return out


def leave_out_twins(table: pd.DataFrame, twins: pd.Series, kinds: Mapping[str, str], split_col: str = "split",
                    source_col: str = "source") -> tuple[pd.DataFrame, dict[str, int]]:
    """``table`` with no image in training whose NIH patient (from its twin's name) validates or is
    tested, and no evaluated twin of an NIH training patient; and the rows changed, per reason.

    The NIH-named sources' splits decide (NIH's by patient, Google's val/test sets): a training row
    of another source (RSNA) whose NIH patient is held out there leaves training; an RSNA
    validation or test row whose NIH patient trains there joins training instead, so no image is
    evaluated after being trained on. An NIH training row whose patient is in Google's sets leaves
    training too."""
    patient = twins.astype(object).where(twins.notna(), "").astype(str).str.extract(r"^(\d{8})_")[0]
    anchor = table[source_col].map(lambda n: kinds.get(n) in NIH_NAMED).astype(bool)
    split = table[split_col]
    known = patient.notna()
    held = set(patient[anchor & known & split.isin(("val", "test"))])
    trains = set(patient[anchor & known & (split == "train")]) - held
    leaks = (split == "train") & known & patient.isin(held)
    joins = ~anchor & known & split.isin(("val", "test")) & patient.isin(trains)
    counts = {f"{k}: {LEFT_OUT}": int(v) for k, v in table.loc[leaks, source_col].value_counts().items()}
    counts |= {f"{k}: {JOINED}": int(v) for k, v in table.loc[joins, source_col].value_counts().items()}
    if counts:
        log.info("NIH twins across sources: %s", counts)
    out = table.copy()
    out.loc[joins, split_col] = "train"
    out = out.loc[~leaks]
    out.attrs.update(table.attrs)
    return out, counts
