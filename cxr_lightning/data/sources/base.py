"""The source registry: :class:`Source`, the :func:`register` decorator and :func:`get`.

A source is one class: its reader (the publisher's files -> the standard table of
:mod:`.common`), its harmonisation (each finding -> the concepts it counts for, see
:mod:`cxr_lightning.data.label_spaces`), how its images are found, how its rows are split and,
optionally, its boxes. ``@register`` puts it under its ``name`` (``data.source=<name>``), as timm
registers its models; nothing else needs to know it exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from cxr_lightning.data import cohort
from cxr_lightning.data.label_spaces import Harmonisation, given_concepts
from cxr_lightning.data.sources import common
from cxr_lightning.errors import ConfigError

_REGISTRY: dict[str, type[Source]] = {}


class Source:
    """One dataset as its publisher ships it, read from ``root``.

    Class attributes a source sets:

    - ``name``: the ``data.source`` value; ``title``: how messages name it;
    - ``harmonisation``: ``{finding: (concept, ...)}``, one entry per ``finding:<finding>`` column
      its reader writes (an empty tuple: no counterpart in any label space);
    - ``hint``: where its files go, said when images are missing;
    - ``nih_layout``: NIH's own layout (complete demographics, one image per visit, NIH boxes);
    - ``options``: the source-specific ``data.*`` keys its constructor takes (``data=csv``'s columns).

    Methods with a default: :meth:`attach_paths` (checks the ``path`` column), :meth:`split` (the
    publisher's split where the reader gives one, completed by patient), :meth:`read_boxes` (none).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    harmonisation: Harmonisation = {}
    hint: ClassVar[str] = ""
    nih_layout: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path, label_table: str = "auto", **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(
                f"data={self.name} takes no option(s) {unknown}"
                + (f"; its own options are {list(self.options)}." if self.options else ".")
            )
        self.root = Path(root).expanduser()
        self.label_table = label_table

    # --- what each source defines ---------------------------------------------------------------
    def read(self) -> common.SourceData:  # pragma: no cover - every source defines it
        raise NotImplementedError

    # --- defaults ----------------------------------------------------------------------------------
    def concepts(self) -> list[str]:
        """The concepts this source gives (its labels in the ``union`` space)."""
        return given_concepts(self.harmonisation)

    def attach_paths(self, table: pd.DataFrame, on_missing: str) -> pd.DataFrame:
        return common.check_paths(table, self.root, on_missing, self.hint)

    def split(self, table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
        return cohort.complete_split(table, table[common.OFFICIAL_SPLIT], val_fraction, test_fraction, seed)

    def read_boxes(self) -> pd.DataFrame | None:
        """The source's boxes in NIH's box-table columns, or None where it has none."""
        return None


def register(cls: type[Source]) -> type[Source]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name or not isinstance(cls.name, str):
        raise TypeError(f"{cls.__name__}: a source needs a name (the data.source value).")
    if cls.name in _REGISTRY and _REGISTRY[cls.name].__qualname__ != cls.__qualname__:
        raise TypeError(
            f"source {cls.name!r} is registered twice ({_REGISTRY[cls.name].__qualname__}, {cls.__qualname__})."
        )
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Source]:
    """The registered source ``name``; ConfigError listing the known ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"data.source={name!r}: expected one of {names()}.")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, root: str | Path, label_table: str = "auto", options: Mapping[str, Any] | None = None) -> Source:
    return get(name)(root, label_table, **dict(options or {}))


def harmonisations() -> dict[str, Harmonisation]:
    """``{source: harmonisation}`` of the registered sources with one of their own (not NIH's identity)."""
    return {n: c.harmonisation for n, c in sorted(_REGISTRY.items()) if not c.nih_layout and c.harmonisation}
