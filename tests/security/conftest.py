"""Fixtures of the security suite: one small trained run shared by every attack, a sentinel folder
whose every byte is snapshotted, and an environment secret that must never reach an output."""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest
import torch
from helpers import fit_tiny

from security.hostile import Sentinel


@pytest.fixture(scope="session")
def trained_run(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, best checkpoint) of a one-epoch tiny fit: the genuine file each attack edits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_tiny(tiny_demo, tmp_path_factory.mktemp("genuine") / "run")
    finally:
        torch.set_num_threads(previous)


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the trained run, as a colleague would share it: the attacker edits this one."""
    run = tmp_path / "shared_run"
    shutil.copytree(trained_run[0], run)
    return run


@pytest.fixture()
def sentinel(tmp_path) -> Sentinel:
    """A folder outside every command's output: nothing may create, change or delete a file in it."""
    return Sentinel(tmp_path / "sentinel")


@pytest.fixture()
def secret(monkeypatch) -> str:
    """An environment value that no output file may contain."""
    value = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("CXR_TEST_SECRET", value)
    assert os.environ["CXR_TEST_SECRET"] == value
    return value
