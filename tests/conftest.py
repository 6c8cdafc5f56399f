"""Shared fixtures: a tiny generated demo dataset, one torch thread; the builders live in
tests/helpers (re-exported here for modules that import them from conftest)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import (  # noqa: F401
    CONF_DIR,
    FIXTURES,
    REPO,
    TESTS,
    compose_config,
    fit_tiny,
    tiny_overrides,
    write_dicom,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: two threads on a shared two-core machine spend more
    time waiting than computing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A 40-patient, 64-pixel demo dataset in the NIH layout, generated once per test session."""
    from cxr_lightning.data import demo

    out = tmp_path_factory.mktemp("demo") / "nih"
    demo.generate(out, patients=40, image_size=64, seed=0)
    return out


@pytest.fixture(autouse=True)
def _no_leftover_log_handlers():
    """A command's main may call logging.basicConfig, which attaches a handler to pytest's captured
    stderr of that test; left in place it writes into a closed stream in every later test."""
    before = list(logging.getLogger().handlers)
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
