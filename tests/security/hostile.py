"""Builders of hostile files, made from scratch in each test (no payload is kept in the repository),
and the checks every attack is held to."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from cxr_lightning.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]


class Sentinel:
    """A folder of files, with the path of a file an attack aims to create: every file's bytes are
    snapshotted so that :meth:`assert_untouched` sees a creation, a change or a deletion."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        for name in ("victim.txt", "other_project.ckpt", "notes.md"):
            (folder / name).write_text(f"{name}: precious\n")
        self.target = folder / "created_by_attack"
        self.before = self.snapshot()

    def add(self, name: str, content: bytes) -> Path:
        """Put a file in the sentinel folder (then snapshotted with the rest)."""
        path = self.folder / name
        path.write_bytes(content)
        self.before = self.snapshot()
        return path

    def snapshot(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(self.folder.rglob("*"))
        }

    def assert_untouched(self) -> None:
        after = self.snapshot()
        assert after == self.before, f"sentinel folder changed: {set(after) ^ set(self.before) or 'contents'}"


def edited_checkpoint(source: Path, dest: Path, edit) -> Path:
    """``source`` read safely, changed by ``edit(ckpt)`` and saved at ``dest`` as plain data."""
    ckpt = read_checkpoint(source)
    edit(ckpt)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


def outputs_text(folder: Path) -> str:
    """Every text byte under ``folder`` (PNG and checkpoint files are read too: a secret is a secret)."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(Path(folder).rglob("*")) if p.is_file())


def run_cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    """``python -m cxr_lightning.<module> args...``: (exit status, stdout, stderr)."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", f"cxr_lightning.{module}", *args], cwd=cwd, env=environment,
        capture_output=True, text=True, timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """The single ``error:`` line of ``stderr`` (no traceback, no colour codes), holding ``fragments``."""
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    assert "\x1b[" not in errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
