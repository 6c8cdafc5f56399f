"""The one harmonisation table: each external dataset's findings -> the NIH ChestX-ray14 names.

A source finding maps to an NIH label only where it names the same finding (or a documented
subtype of it, e.g. PadChest's "loculated pleural effusion" is an Effusion). A finding that is
broader, narrower in an unknown way, or a union of NIH labels has no counterpart and maps to
nothing: the NIH labels that no finding of a source maps to are reported as *unavailable* for it,
never guessed from a neighbour. The README's harmonisation table is rendered from
:data:`HARMONISATION` by :func:`markdown_table`.
"""
from __future__ import annotations

from collections.abc import Mapping

from cxr_lightning.labels import ALL_LABELS

# The 14 CheXpert observations (CheXpert and MIMIC-CXR-JPG, whose labels come from the same labeller).
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
_CHEXPERT: dict[str, str | None] = {
    # CheXpert's "No Finding" is "none of its pathologies" (support devices allowed), NIH's is
    # "none of its 14": the same reading of the same image for the findings both label.
    "No Finding": "No Finding",
    "Enlarged Cardiomediastinum": None,  # NIH labels the heart (Cardiomegaly), not the mediastinum
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": None,  # any opacity: broader than Infiltration, Consolidation or Pneumonia alone
    "Lung Lesion": None,  # nodule OR mass: a positive is not known to be either NIH label
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Effusion",
    "Pleural Other": None,  # thickening, fibrosis, plaques...: broader than Pleural_Thickening
    "Fracture": None,  # not an NIH label
    "Support Devices": None,  # not an NIH label
}

# PadChest's findings are lower-case strings in a list; each NIH label lists the exact strings
# (itself and PadChest's subtypes of it) that count as positive for it.
_PADCHEST: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis", "atelectasis basal"),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
    "Infiltration": ("infiltrates",),
    "Mass": ("mass", "pulmonary mass"),  # not breast, mediastinal, pleural or soft-tissue masses
    "Nodule": ("nodule", "multiple nodules"),  # not pseudonodule, nor calcified granuloma
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Consolidation": ("consolidation",),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),  # not subcutaneous emphysema
    "Fibrosis": ("pulmonary fibrosis",),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Hernia": ("hiatal hernia",),
    "No Finding": ("normal",),
}

# Google's 2019 expert labels of NIH images (Majkowska et al., Radiology 2020).
GOOGLE_FINDINGS: tuple[str, ...] = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
_GOOGLE: dict[str, str | None] = {
    "Fracture": None,  # not an NIH label
    "Pneumothorax": "Pneumothorax",
    "Airspace opacity": None,  # any airspace opacity: broader than Consolidation, Infiltration or Pneumonia
    "Nodule or mass": None,  # the union of two NIH labels: a positive is not known to be either
}

# source -> {source finding -> NIH label or None}
HARMONISATION: dict[str, dict[str, str | None]] = {
    "chexpert": _CHEXPERT,
    "mimic_cxr": _CHEXPERT,
    "padchest": {finding: nih for nih, findings in _PADCHEST.items() for finding in findings},
    "nih_google": _GOOGLE,
}
NATIVE_SOURCES = ("nih", "demo")


def mapping(source: str) -> dict[str, str]:
    """``{source finding: NIH label}`` for the findings of ``source`` that have a counterpart."""
    if source in NATIVE_SOURCES:
        return {name: name for name in ALL_LABELS}
    return {finding: nih for finding, nih in HARMONISATION[source].items() if nih is not None}


def available_labels(source: str) -> list[str]:
    """The NIH labels ``source`` gives, in NIH order; the others are unavailable for it."""
    mapped = set(mapping(source).values())
    return [name for name in ALL_LABELS if name in mapped]


def unavailable_labels(source: str, label_names: list[str] | tuple[str, ...]) -> list[str]:
    """Those of ``label_names`` that ``source`` cannot score."""
    available = set(available_labels(source))
    return [name for name in label_names if name not in available]


def markdown_table(sources: Mapping[str, Mapping[str, str | None]] | None = None) -> str:
    """One row per NIH label, one column per external source: the source findings that map to it."""
    sources = dict(HARMONISATION if sources is None else sources)
    header = "| NIH label | " + " | ".join(sources) + " |"
    lines = [header, "|" + " --- |" * (len(sources) + 1)]
    for name in ALL_LABELS:
        cells = []
        for table in sources.values():
            found = [finding for finding, nih in table.items() if nih == name]
            cells.append(", ".join(f'"{f}"' for f in found) if found else "unavailable")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    unmapped = {source: [f for f, nih in table.items() if nih is None] for source, table in sources.items()}
    lines.append("| *(no NIH counterpart)* | " + " | ".join(
        ", ".join(f'"{f}"' for f in found) or "every other finding" for found in unmapped.values()) + " |")
    return "\n".join(lines) + "\n"
