"""The ChestX-ray14 label vocabulary and the parsing of NIH's ``"A|B"`` finding strings."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cxr_lightning.errors import DataError

# Order of the NIH paper (Wang et al. 2017); "No Finding" last so that dropping it keeps indices.
FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
ALL_LABELS: tuple[str, ...] = FINDINGS + (NO_FINDING,)


def label_names(drop_no_finding: bool = False) -> list[str]:
    """The model's output labels, in order."""
    return list(FINDINGS if drop_no_finding else ALL_LABELS)


def encode_labels(
    findings: pd.Series,
    names: Sequence[str] = ALL_LABELS,
    source: str = "label table",
    aliases: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Multi-hot encode ``"A|B"`` strings into a ``(len(findings), len(names))`` float32 array.

    ``aliases`` maps the spellings of some other file (e.g. ``nih.BBOX_SPELLINGS``) to these names.

    Unknown names raise :class:`DataError` naming them and a few rows where they occur, so a typo
    in a label table is never silently read as "negative for everything".
    """
    # Encode the few hundred distinct strings, not the 112k rows, then index back.
    codes, uniques = pd.factorize(findings.fillna("").astype(str))
    dummies = pd.Series(uniques).str.get_dummies(sep="|")
    spelled = [c.strip() for c in dummies.columns]
    dummies.columns = [aliases.get(c, c) for c in spelled] if aliases else spelled
    if dummies.columns.duplicated().any():
        dummies = dummies.T.groupby(level=0).max().T
    unknown = sorted(set(dummies.columns) - set(ALL_LABELS) - {""})
    if unknown:
        mask = dummies[unknown].any(axis=1).to_numpy()[codes]
        rows = list(findings.index[mask][:5])
        raise DataError(
            f"{source}: unknown finding name(s) {unknown} (first rows: {rows}). "
            f"Known names are {list(ALL_LABELS)}; fix the spelling or the file."
        )
    return dummies.reindex(columns=list(names), fill_value=0).to_numpy(dtype=np.float32)[codes]
