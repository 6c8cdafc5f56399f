"""The inspect task behind ``python -m cxr_lightning.inspect data=... [labels=...] [output=PATH]``.

The look at a dataset a researcher takes before a week of GPU time: it reads the label tables
only (no image is opened unless ``data.verify_images=true``) through the same readers,
harmonisation and splits as a training run with the same ``data=...`` options, prints a
per-split table and writes ``inspect.json``::

    {"label_space": "nih14", "labels": [...],
     "sources": {"<name>": {"source": "chexpert", "rows": 0, "frontal": 0, "patients": 0,
         "splits": {"train": 0, "val": 0, "test": 0},
         "labels": {"<label>": {"positive": 0, "negative": 0, "uncertain": 0, "unavailable": false}},
         "boxes": {"<label>": 0}, "left_out": {"<reason>": 0}}}}

``rows``, ``patients`` and the label counts cover every image of the tables, frontal and lateral
alike (the codes as published: ``uncertain`` counts the labeller's -1 whatever ``data.uncertain``
makes of it); ``frontal`` is how many a run would keep and ``splits`` how it splits them.
``boxes`` counts a box source's boxes per label (empty for a source without boxes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from cxr_lightning import files
from cxr_lightning.data import label_spaces, nih
from cxr_lightning.data.spec import SPLITS, DataSpec, SourceSpec
from cxr_lightning.data.tables import assign_splits, concept_codes, find_images, frontal_views
from cxr_lightning.errors import DataError
from cxr_lightning.tasks.build import data_spec

log = logging.getLogger(__name__)
INSPECT_FILE = "inspect.json"


def inspect(cfg: DictConfig) -> dict[str, Any]:
    """Count what ``cfg.data`` holds, print the table and write ``cfg.output`` (default
    ``inspect.json`` in the run directory); returns the written record."""
    spec = data_spec(cfg.data)
    record = inspect_spec(spec)
    out = Path(cfg.get("output") or Path(cfg.paths.output_dir) / INSPECT_FILE)
    files.write_json(out, record)
    print(render(record))
    print(f"wrote {out}")
    return record


def inspect_spec(spec: DataSpec) -> dict[str, Any]:
    """The inspect record of every source of ``spec`` (see the module docstring)."""
    readers = [s.create(_root(spec, s)) for s in spec.sources]
    # Every label of the space, those no source gives included (flagged unavailable): what the
    # space would lose on this data.
    space = label_spaces.resolve(spec.label_space, [r.concepts() for r in readers], spec.drop_no_finding)
    record: dict[str, Any] = {"label_space": space.name, "labels": list(space.labels), "sources": {}}
    for s, reader in zip(spec.sources, readers):
        record["sources"][s.name] = inspect_source(spec, s, reader, space)
    return record


def inspect_source(spec: DataSpec, s: SourceSpec, reader: Any, space: Any) -> dict[str, Any]:
    data = reader.read()
    full = data.table
    concepts = concept_codes(full, reader)
    labels: dict[str, dict[str, Any]] = {}
    for label, concept in zip(space.labels, space.concepts):
        if concept not in concepts.columns:
            labels[label] = {"positive": 0, "negative": 0, "uncertain": 0, "unavailable": True}
            continue
        codes = concepts[concept].to_numpy(dtype=float)
        labels[label] = {
            "positive": int((codes == 1).sum()),
            "negative": int((codes == 0).sum()),
            "uncertain": int((codes == -1).sum()),
            "unavailable": False,
        }
    frontal, left_out = frontal_views(full, s.name, dict(data.left_out))
    frontal["split"] = assign_splits(frontal, reader, spec)
    if spec.verify_images:
        kept = find_images(frontal, reader, spec.replace(on_missing="skip"))
        dropped = len(frontal) - len(kept)
        if dropped:
            left_out["missing or unreadable image"] = dropped
        frontal = kept
    splits = frontal["split"].value_counts()
    return {
        "source": s.source,
        "rows": int(len(full)),
        "frontal": int(len(frontal)),
        "patients": int(full[nih.PATIENT].nunique()),
        "splits": {split: int(splits.get(split, 0)) for split in SPLITS},
        "labels": labels,
        "boxes": box_counts(reader.read_boxes(), space),
        "left_out": {str(k): int(v) for k, v in left_out.items()},
    }


BOX_LABEL = nih.BOX_FINDING  # the box-table column every source's read_boxes() returns


def box_counts(boxes: pd.DataFrame | None, space: Any) -> dict[str, int]:
    """Boxes per label of the space (a box's ``Finding Label`` names its concept)."""
    if boxes is None or boxes.empty:
        return {}
    if BOX_LABEL not in boxes.columns:
        raise DataError(f"box table without a {BOX_LABEL!r} column; columns are {list(boxes.columns)}.")
    counts = boxes[BOX_LABEL].astype(str).value_counts()
    return {label: int(counts[c]) for label, c in zip(space.labels, space.concepts) if c in counts.index}


def render(record: dict[str, Any]) -> str:
    """The per-split table, one block per source: images per split, then each label's counts."""
    lines = [f"Label space {record['label_space']}: {len(record['labels'])} labels"]
    for name, src in record["sources"].items():
        lines.append("")
        lines.append(
            f"{name} ({src['source']}): {src['rows']} images, {src['frontal']} frontal, {src['patients']} patients"
        )
        lines.append("  split   " + "  ".join(f"{s:>7}" for s in SPLITS))
        lines.append("  images  " + "  ".join(f"{src['splits'][s]:>7}" for s in SPLITS))
        lines.append(f"  {'label':<28} {'positive':>9} {'negative':>9} {'uncertain':>9}")
        for label, c in src["labels"].items():
            if c["unavailable"]:
                lines.append(f"  {label:<28} {'unavailable (masked)':>29}")
            else:
                lines.append(f"  {label:<28} {c['positive']:>9} {c['negative']:>9} {c['uncertain']:>9}")
        if src["boxes"]:
            lines.append("  boxes: " + ", ".join(f"{k} {v}" for k, v in src["boxes"].items()))
        if src["left_out"]:
            lines.append("  left out: " + ", ".join(f"{k} {v}" for k, v in src["left_out"].items()))
    return "\n".join(lines)


def _root(spec: DataSpec, s: SourceSpec) -> Path | None:
    if s.root is None and s.source == "demo":
        from cxr_lightning.data.demo import ensure_demo

        return ensure_demo(spec.cache_dir, **dict(spec.demo))
    return s.root


__all__ = ["INSPECT_FILE", "inspect", "inspect_spec"]
