"""The data sources: ``data.source=<name>`` -> one registered :class:`~.base.Source`.

How to add a source (one module, one yaml, one fixture):

1. Write ``data/sources/<name>.py`` with a ``@register``-ed subclass of :class:`~.base.Source`:
   ``name``, ``title``, ``harmonisation`` (``{finding: (concept, ...)}``; concepts are listed in
   :data:`cxr_lightning.data.label_spaces.CONCEPTS`; a finding may count for two of them, or for
   none: ``()``), and ``read()``, which returns the standard table of :mod:`.common` (build it with
   ``common.standard_table``; one ``finding:<finding>`` column per harmonisation key, coded 1 / 0 /
   -1 uncertain). Override ``split`` (default: the reader's ``official_split``, completed by
   patient), ``attach_paths`` (default: the ``path`` column must exist) or ``read_boxes``
   (default: none) where the dataset needs it.
2. Import the module below, so that the decorator runs.
3. Add ``conf/data/<name>.yaml`` (``defaults: [demo, _self_]``, ``source: <name>``, ``root: ???``).
4. Add a fixture writer in the publisher's exact file format to ``tests/fixtures/make_external.py``.

Nothing else names the sources: the ``data=`` choices in messages, the harmonisation table in the
README, ``inspect`` and pooled runs all read this registry.
"""

from __future__ import annotations

from cxr_lightning.data.sources import (  # noqa: F401  (registers them)
    chexpert,
    csv,
    mimic_cxr,
    nih,
    nih_google,
    padchest,
    rsna_pneumonia,
    vindr_cxr,
)
from cxr_lightning.data.sources.base import Source, create, get, harmonisations, names, register

__all__ = ["Source", "create", "get", "harmonisations", "names", "register"]
