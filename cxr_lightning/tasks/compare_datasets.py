"""The cross-dataset table: ``python -m cxr_lightning.compare --datasets EVAL_DIR ...``.

Reads the ``metrics.json`` of several evaluations (``python -m cxr_lightning.evaluate``, on the
checkpoint's own test split and on external sources with ``data=<source>``) and writes
``datasets.csv`` and ``datasets.md``: one row per backbone, dataset and label with AUROC and
AUPRC and their patient-bootstrap intervals, the positives and images scored. The evaluations of
one checkpoint give one row per dataset and label; those of a comparison sweep's checkpoints
(one per backbone) give one row per backbone as well. A label a dataset cannot score is shown as
unavailable, not left blank.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_lightning import schema
from cxr_lightning.errors import DataError
from cxr_lightning.evaluation.report import interval, markdown_table
from cxr_lightning.files import write_csv, write_text
from cxr_lightning.run_dir import METRICS

log = logging.getLogger(__name__)

OUTPUT_STEM = "datasets"
COLUMNS = ("backbone", "dataset", "split", "label", "n_pos", "n_images", "auroc", "auroc_lower", "auroc_upper",
           "auprc", "auprc_lower", "auprc_upper", "checkpoint")


@dataclass(frozen=True)
class DatasetTableFiles:
    csv: Path
    markdown: Path


def find_evaluations(dirs: Sequence[str | Path]) -> list[Path]:
    """The ``metrics.json`` of evaluations in or below each of ``dirs`` (an evaluation's output
    directory, or a folder of them)."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise DataError(f"{d} is not a directory; pass evaluation output directories (each with {METRICS}).")
        found += sorted(p for p in d.rglob(METRICS) if _is_evaluation(p))
    if not found:
        raise DataError(
            f"no evaluation {METRICS} under {[str(d) for d in dirs]}; run python -m cxr_lightning.evaluate first."
        )
    return found


def _is_evaluation(path: Path) -> bool:
    return "threshold_method" in _load(path)  # a training run's metrics.json has none


def _load(path: Path) -> dict[str, Any]:
    check = schema.Checker(f"cannot read {path}", DataError)  # an evaluation someone shared: plain data only
    return schema.mapping(schema.read_json(path, check), check, "")


def dataset_table(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per backbone, dataset and label over the evaluations' ``metrics.json`` files."""
    rows = []
    for path in paths:
        metrics = _load(path)
        backbone = (metrics.get("config") or {}).get("backbone") or "?"
        dataset = metrics.get("data_source") or (metrics.get("config") or {}).get("data_source") or "?"
        base = {"backbone": backbone, "dataset": dataset, "split": metrics.get("split"),
                "n_images": metrics.get("n_images"), "checkpoint": metrics.get("checkpoint")}
        labels = metrics.get("scored_labels") or [k.removeprefix("auroc.") for k in metrics if k.startswith("auroc.")]
        for label in labels:
            rows.append({**base, "label": label, "n_pos": metrics.get(f"n_pos.{label}"),
                         **{c: metrics.get(f"{c}.{label}", np.nan)
                            for c in ("auroc", "auroc_lower", "auroc_upper", "auprc", "auprc_lower", "auprc_upper")}})
        for label in metrics.get("unavailable_labels") or []:
            rows.append({**base, "label": label, "n_pos": None})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    twice = table.duplicated(["backbone", "dataset", "split", "label"], keep=False)
    if twice.any():
        shown = table.loc[twice, ["backbone", "dataset", "split"]].drop_duplicates().to_dict("records")[:5]
        raise DataError(f"more than one evaluation of {shown}: pass one evaluation per backbone, dataset and split.")
    return table


def write_dataset_table(dirs: Sequence[str | Path], out: str | Path | None = None) -> DatasetTableFiles:
    """Write ``datasets.csv`` and ``datasets.md`` for the evaluations under ``dirs`` into ``out``
    (default: the first directory)."""
    table = dataset_table(find_evaluations(dirs))
    out_dir = Path(out) if out is not None else Path(dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{OUTPUT_STEM}.csv", out_dir / f"{OUTPUT_STEM}.md"
    write_csv(table, csv_path, index=False)
    write_text(md_path, render_markdown(table))
    log.info("Cross-dataset table of %d evaluation row(s): %s", len(table), md_path)
    return DatasetTableFiles(csv_path, md_path)


def render_markdown(table: pd.DataFrame) -> str:
    """The table as markdown: AUROC and AUPRC with intervals, ``unavailable`` where a dataset has no
    counterpart of the label."""
    shown = pd.DataFrame({
        "backbone": table["backbone"],
        "dataset": table["dataset"],
        "split": table["split"],
        "label": table["label"],
        "positives": ["unavailable" if pd.isna(n) else str(int(n)) for n in table["n_pos"]],
        "images": table["n_images"],
        "AUROC": [("unavailable" if pd.isna(n) else interval(*v))
                  for n, v in zip(table["n_pos"], table[["auroc", "auroc_lower", "auroc_upper"]].to_numpy())],
        "AUPRC": [("unavailable" if pd.isna(n) else interval(*v))
                  for n, v in zip(table["n_pos"], table[["auprc", "auprc_lower", "auprc_upper"]].to_numpy())],
    })
    return "\n".join([
        "# Cross-dataset evaluation",
        "",
        "One row per backbone, dataset and label: AUROC and AUPRC with patient-bootstrap intervals as each "
        "evaluation reported them. `unavailable`: the dataset has no counterpart of the label (see the "
        "harmonisation table).",
        "",
        markdown_table(shown, index=False),
    ])
