"""Label spaces (``labels=nih14|chexpert14|union``) and the harmonisation of a source's findings into them.

Every source (:mod:`cxr_lightning.data.sources`) declares, beside its reader, how each of its
findings maps to *concepts*: the findings a radiologist would call the same whatever the dataset.
A finding maps to a concept only where it names the same finding or a documented subtype of it;
one finding may count for several concepts (PadChest's "hydropneumothorax" is a pneumothorax and
an effusion), several findings for one (PadChest's subtypes of atelectasis), and a finding with no
counterpart maps to none. A concept's code for an image is positive if any of its findings is,
else uncertain if any is, else negative.

A label space is the model's ordered output labels, each naming one concept:

- ``nih14``: NIH ChestX-ray14's 14 findings and No Finding (the default; 15 outputs);
- ``chexpert14``: the 14 CheXpert observations, native for CheXpert and MIMIC-CXR-JPG;
- ``union``: every concept that at least one source of the run gives, NIH's first.

A label whose concept a source does not give is NaN (masked) for that source's images: it never
counts as a negative. The checkpoint records the space's name and labels, so evaluate, predict,
explain and export rebuild the same mapping from it (:func:`from_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr_lightning.errors import ConfigError
from cxr_lightning.labels import ALL_LABELS, NO_FINDING

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
# CheXpert's five competition labels (Irvin et al. 2019): a headline subset wherever all are scored.
COMPETITION: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# The concepts, spelled as NIH spells them where NIH labels them. CheXpert's "No Finding" is "none
# of its pathologies" (support devices allowed), NIH's "none of its 14": the same reading of the
# same image for the findings both label, so one concept.
CONCEPTS: tuple[str, ...] = ALL_LABELS + (
    "Enlarged Cardiomediastinum",
    "Lung Opacity",
    "Lung Lesion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
_CHEXPERT_SPELLING = {"Pleural Effusion": "Effusion"}  # chexpert14 label -> concept
UNION = "union"


@dataclass(frozen=True)
class LabelSpace:
    """The model's output ``labels`` in order, and the concept each one names."""

    name: str
    labels: tuple[str, ...]
    concepts: tuple[str, ...]

    def without_no_finding(self) -> LabelSpace:
        keep = [i for i, c in enumerate(self.concepts) if c != NO_FINDING]
        return LabelSpace(self.name, tuple(self.labels[i] for i in keep), tuple(self.concepts[i] for i in keep))

    def competition_labels(self) -> list[str]:
        """CheXpert's five competition labels as this space spells them (those it has)."""
        concept_of = {c: label for label, c in zip(self.labels, self.concepts)}
        return [concept_of[c] for c in (_CHEXPERT_SPELLING.get(n, n) for n in COMPETITION) if c in concept_of]


NAMED_SPACES: dict[str, LabelSpace] = {
    "nih14": LabelSpace("nih14", ALL_LABELS, ALL_LABELS),
    "chexpert14": LabelSpace(
        "chexpert14", CHEXPERT_OBSERVATIONS, tuple(_CHEXPERT_SPELLING.get(n, n) for n in CHEXPERT_OBSERVATIONS)
    ),
}
SPACE_NAMES = (*NAMED_SPACES, UNION)


def check_name(name: str) -> str:
    if name not in SPACE_NAMES:
        raise ConfigError(f"labels={name!r}: expected one of {list(SPACE_NAMES)} (the label space of the run).")
    return name


def resolve(name: str, given: Iterable[Iterable[str]] = (), drop_no_finding: bool = False) -> LabelSpace:
    """The space ``name``; for ``union``, the concepts that at least one of ``given`` (each source's
    concepts) holds: the known concepts in :data:`CONCEPTS` order, then a lab's own, as they come."""
    check_name(name)
    if name in NAMED_SPACES:
        space = NAMED_SPACES[name]
    else:
        seen: list[str] = []
        for concepts in given:
            seen += [c for c in concepts if c not in seen]
        ordered = [c for c in CONCEPTS if c in seen] + [c for c in seen if c not in CONCEPTS]
        if not ordered:
            raise ConfigError("labels=union: the run's sources give no label at all.")
        space = LabelSpace(UNION, tuple(ordered), tuple(ordered))
    return space.without_no_finding() if drop_no_finding else space


def from_checkpoint(name: str | None, label_names: Sequence[str]) -> LabelSpace:
    """The space a checkpoint was trained in, from its recorded name (``nih14`` for checkpoints that
    predate label spaces) and its output labels."""
    name = check_name(name or "nih14")
    labels = tuple(str(n) for n in label_names)
    if name == UNION:
        return LabelSpace(UNION, labels, labels)
    space = NAMED_SPACES[name]
    concept_of = dict(zip(space.labels, space.concepts))
    unknown = [n for n in labels if n not in concept_of]
    if unknown:
        raise ConfigError(f"labels {unknown} are not in the {name} label space {list(space.labels)}.")
    return LabelSpace(name, labels, tuple(concept_of[n] for n in labels))


def concept_of_label(name: str) -> str:
    """The concept a label name spells in any named space ("Pleural Effusion" -> "Effusion"); a
    name no space knows is a concept of its own (a lab's label, under ``union``)."""
    return name if name in CONCEPTS else _CHEXPERT_SPELLING.get(name, name)


# --- harmonisation -------------------------------------------------------------------------------
Harmonisation = Mapping[str, tuple[str, ...]]


def given_concepts(harmonisation: Harmonisation) -> list[str]:
    """The concepts a source with ``harmonisation`` gives, known ones in :data:`CONCEPTS` order."""
    given = {c for concepts in harmonisation.values() for c in concepts}
    return [c for c in CONCEPTS if c in given] + sorted(given - set(CONCEPTS))


def concept_codes(findings: pd.DataFrame, harmonisation: Harmonisation) -> pd.DataFrame:
    """``(N, concepts)`` codes from a source's ``(N, findings)`` codes (1 positive, 0 negative, -1
    uncertain, NaN not given): per concept, positive if any of its findings is, else uncertain if
    any is, else negative if any is negative, else NaN."""
    out: dict[str, np.ndarray] = {}
    for concept in given_concepts(harmonisation):
        sources = [f for f, concepts in harmonisation.items() if concept in concepts and f in findings.columns]
        if not sources:
            continue
        values = findings[sources].to_numpy(dtype=float)
        code = np.full(len(findings), np.nan)
        code[(values == 0).any(axis=1)] = 0.0
        code[(values == -1).any(axis=1)] = -1.0
        code[(values == 1).any(axis=1)] = 1.0
        out[concept] = code
    return pd.DataFrame(out, index=findings.index)


def mapped(harmonisation: Harmonisation) -> dict[str, tuple[str, ...]]:
    """``{finding: concepts}`` for the findings that have a counterpart."""
    return {f: tuple(c) for f, c in harmonisation.items() if c}


def markdown_table(harmonisations: Mapping[str, Harmonisation]) -> str:
    """One row per concept, one column per source: the source findings that count for it."""
    header = "| Concept (nih14 / chexpert14 label) | " + " | ".join(harmonisations) + " |"
    lines = [header, "|" + " --- |" * (len(harmonisations) + 1)]
    chexpert_label = {
        c: label for label, c in zip(NAMED_SPACES["chexpert14"].labels, NAMED_SPACES["chexpert14"].concepts)
    }
    for concept in CONCEPTS:
        cells = []
        for table in harmonisations.values():
            found = [f for f, concepts in table.items() if concept in concepts]
            cells.append(", ".join(f'"{f}"' for f in found) if found else "unavailable")
        names = f"{concept if concept in ALL_LABELS else '-'} / {chexpert_label.get(concept, '-')}"
        lines.append(f"| {names} | " + " | ".join(cells) + " |")
    unmapped = [[f for f, c in table.items() if not c] for table in harmonisations.values()]
    lines.append(
        "| *(no counterpart)* | "
        + " | ".join(", ".join(f'"{f}"' for f in found) or "every other finding" for found in unmapped)
        + " |"
    )
    return "\n".join(lines) + "\n"
