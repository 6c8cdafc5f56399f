"""Opening a checkpoint never runs code from it: a crafted file is refused by every command before its
payload can run; genuine checkpoints (written by this framework or by Lightning's own writer) load;
``trust_checkpoint=true`` opens the user's own file of another layout."""
from __future__ import annotations

import os
import pickletools
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config, fit_tiny, tiny_overrides
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from cxr_lightning.checkpoints import (
    CHECKPOINT_GLOBALS,
    AtomicCheckpointIO,
    checkpoint_hparams,
    load_model,
    read_checkpoint,
)
from cxr_lightning.errors import CheckpointError

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    return fit_tiny(tiny_demo, tmp_path_factory.mktemp("run"), head="fusion_residual")


@pytest.fixture()
def evil(fitted, tmp_path) -> tuple[Path, Path]:
    """A real checkpoint with a code-running object added, in a run directory's checkpoints/."""
    marker = tmp_path / "payload-ran"
    ckpt = read_checkpoint(fitted[1])
    ckpt["callbacks"]["Evil"] = Payload(marker)
    path = tmp_path / "evil_run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path, marker


def pickled_globals(path: Path) -> set[str]:
    """Every class/function the checkpoint's pickle names (read by opcode, never unpickled)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_the_payload_runs_when_unpickled_without_restrictions(evil):
    # The fixture is a real attack: full unpickling runs it (so the refusals below mean something).
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_every_command_refuses_a_code_running_checkpoint_and_never_runs_it(evil, tiny_demo, tmp_path):
    from cxr_lightning.tasks.evaluate import evaluate
    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.export import export
    from cxr_lightning.tasks.predict import predict
    from cxr_lightning.tasks.train import train

    path, marker = evil
    image = next((tiny_demo / "images_001" / "images").glob("*.png"))
    commands = {
        "train ckpt_path=": lambda: train(
            compose_config(tiny_overrides(tiny_demo, tmp_path / "t") + [f"ckpt_path={path}"])
        ),
        "train resume=": lambda: train(
            compose_config(tiny_overrides(tiny_demo, tmp_path / "r") + [f"resume={path.parent.parent}"])
        ),
        "evaluate": lambda: evaluate(
            compose_config([f"ckpt_path={path}", f"output_dir={tmp_path / 'e'}"], config_name="evaluate")
        ),
        "explain": lambda: explain(
            compose_config([f"ckpt_path={path}", f"output_dir={tmp_path / 'x'}"], config_name="explain")
        ),
        "predict": lambda: predict(
            compose_config(
                [f"ckpt_path={path}", f"input={image}", f"output={tmp_path / 'p.csv'}"], config_name="predict"
            )
        ),
        "export": lambda: export(
            compose_config([f"ckpt_path={path}", f"output={tmp_path / 'm.onnx'}"], config_name="export")
        ),
        "Lightning resume (checkpoint IO)": lambda: AtomicCheckpointIO().load_checkpoint(path),
        "config checks": lambda: checkpoint_hparams(path),
    }
    for name, run in commands.items():
        with pytest.raises(
            CheckpointError, match=r"Refusing to open checkpoint .*last\.ckpt.*posix\.system.*trust_checkpoint=true"
        ) as info:
            run()
        assert not marker.exists(), f"{name} ran the payload"
        assert "Payload" not in str(info.value)  # the file's own classes are never imported


def test_the_framework_checkpoints_name_only_allowed_globals(fitted):
    run_dir, best = fitted
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in CHECKPOINT_GLOBALS}
    for path in (best, run_dir / "checkpoints" / "last.ckpt"):
        names = pickled_globals(path)
        foreign = {n for n in names if not n.startswith("torch.")} - allowed
        assert not foreign, f"{path.name} pickles {foreign}: add them to CHECKPOINT_GLOBALS only if they are plain data"
        ckpt = read_checkpoint(path)
        assert {"EarlyStopping", "ModelCheckpoint"} <= {k.split("{")[0] for k in ckpt["callbacks"]}
        assert ckpt["optimizer_states"] and ckpt["hyper_parameters"]["label_names"]


def test_genuine_checkpoints_load_safely_whoever_wrote_them(fitted, tmp_path):
    _, best = fitted
    expected = load_model(best)
    # Written by Lightning's own TorchCheckpointIO (a checkpoint saved without this framework's writer).
    lightning = tmp_path / "lightning.ckpt"
    TorchCheckpointIO().save_checkpoint(read_checkpoint(best), lightning)
    reloaded = load_model(lightning)
    for key, value in expected.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    assert checkpoint_hparams(lightning)["label_names"] == expected.hparams.label_names


def test_trust_checkpoint_opens_a_legacy_file_that_safe_loading_refuses(fitted, tiny_demo, tmp_path):
    from cxr_lightning.tasks.predict import predict

    _, best = fitted
    ckpt = read_checkpoint(best)
    ckpt["hyper_parameters"]["age_fill"] = np.float64(ckpt["hyper_parameters"]["age_fill"])  # a numpy scalar
    legacy = tmp_path / "legacy.ckpt"
    torch.save(ckpt, legacy)
    with pytest.raises(CheckpointError, match=r"legacy\.ckpt.*numpy.*trust_checkpoint=true"):
        load_model(legacy)
    model = load_model(legacy, trust=True)
    assert model.hparams.age_fill == pytest.approx(float(ckpt["hyper_parameters"]["age_fill"]))
    image = next((tiny_demo / "images_001" / "images").glob("*.png"))
    overrides = [f"ckpt_path={legacy}", f"input={image}", f"output={tmp_path / 'p.csv'}"]
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        predict(compose_config(overrides, config_name="predict"))
    run = predict(compose_config(overrides + ["trust_checkpoint=true"], config_name="predict"))
    assert len(run.predictions) == 1


def test_not_a_checkpoint_is_named_without_a_trust_hint(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint .*garbage\.ckpt") as info:
        read_checkpoint(garbage)
    assert "trust_checkpoint" not in str(info.value)
    truncated = tmp_path / "truncated.ckpt"
    shutil.copyfile(Path(__file__), truncated)
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        read_checkpoint(truncated)
