"""The README's commands name config keys and group options that exist: every
``python -m cxr_lightning.<command> ...`` line composes with its overrides, so a renamed key
fails here rather than in a user's first hour."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import compose_config

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIGS = {"train": "train", "evaluate": "evaluate", "explain": "explain", "predict": "predict",
           "export": "export", "bench": "bench", "cache": "cache"}


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for line in README.read_text().splitlines():
        match = re.search(r"python -m cxr_lightning\.(\w+)\s+(.*)", line)
        if not match or match.group(1) not in CONFIGS:
            continue
        text = match.group(2).split("#")[0].split("`")[0]
        if "--config-dir" in text or "hydra.searchpath" in text:  # the user's own configs
            continue
        try:
            words = shlex.split(text)
        except ValueError:
            continue
        overrides = [w for w in words if "=" in w and not w.startswith(("-", "hydra.", "+", "~"))
                     and "..." not in w and "<" not in w and "|" not in w and "{" not in w]
        if "-m" in words or "--multirun" in words:  # a sweep: its first job
            overrides = [o if "[" in o else o.split(",")[0] for o in overrides]
        if overrides:
            found.append((match.group(1), overrides))
    return found


COMMANDS = _commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize(("command", "overrides"), COMMANDS, ids=[" ".join([c, *o])[:60] for c, o in COMMANDS])
def test_readme_command_composes(command, overrides, tmp_path):
    # The values may be paths that do not exist here; composing checks the keys and group options.
    compose_config([*overrides, f"paths.output_dir={tmp_path}"] if command == "train" else overrides,
                   config_name=CONFIGS[command])
