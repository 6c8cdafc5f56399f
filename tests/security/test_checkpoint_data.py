"""Attack 5, checkpoints: a shared checkpoint, bundle or sidecar holding plain data outside the schema
(wrong keys, types, sizes; Hydra keys; odd tensors; deep or overflowing JSON) is refused by every
command that opens it with one CheckpointError line, before anything is built from it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import compose_config

from cxr_lightning import checkpoints, operating_point, run_dir
from cxr_lightning.errors import CheckpointError
from security.hostile import assert_one_error_line, edited_checkpoint

pytestmark = pytest.mark.slow


def hp(**changes):
    def edit(ckpt):
        for path, value in changes.items():
            node = ckpt["hyper_parameters"]
            *parents, last = path.split("__")
            for p in parents:
                node = node[p]
            node[last] = value
    return edit


def strided(ckpt):
    key = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 2)
    ckpt["state_dict"][key] = torch.zeros(1).as_strided(ckpt["state_dict"][key].shape, (0, 0))


def missing_key(ckpt):
    del ckpt["state_dict"][next(iter(ckpt["state_dict"]))]


ATTACKS = {
    "unknown hyperparameter": (hp(surprise=1), r"unknown hyperparameter key"),
    "wrong type": (hp(label_names="Atelectasis"), r"label_names.*not a list"),
    "image_size=1e7": (hp(image_size=1e7), r"image_size.*not an integer"),
    "huge image_size": (hp(image_size=10_000_000), r"image_size.*outside"),
    "hidden=2**40": (hp(head__hidden=2**40), r"head.hidden.*larger than"),
    "_target_ in head": (hp(head___target_="os.system"), r"head._target_.*Hydra key"),
    "_target_ in augment": (hp(config__data__augment={"_target_": "os.system", "enabled": True}), r"augment._target_"),
    "label as a path": (hp(label_names=["A/" + "../" * 30 + "tmp/x/PWNED"] + ["B"] * 0), r"not an allowed name"),
    "label as a formula": (hp(label_names=["=HYPERLINK(\"http://x\")"]), r"not an allowed name"),
    "stride-0 tensor": (strided, r"stride-0"),
    "missing weights": (missing_key, r"missing \["),
}


@pytest.fixture(scope="module")
def hostile_checkpoints(trained_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    made = {
        name: edited_checkpoint(trained_run[1], folder / f"{i}.ckpt", edit)
        for i, (name, (edit, _)) in enumerate(ATTACKS.items())
    }
    legacy = folder / "legacy.ckpt"
    ckpt = checkpoints.read_checkpoint(trained_run[1])
    import numpy as np

    ckpt["hyper_parameters"]["age_fill"] = np.float64(1.0)  # a numpy scalar: needs a global beyond the allow-list
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    return made, legacy


def commands(tmp_path: Path, image: Path):
    from cxr_lightning.tasks.evaluate import evaluate
    from cxr_lightning.tasks.explain import explain
    from cxr_lightning.tasks.export import export
    from cxr_lightning.tasks.predict import predict

    return {
        "predict": lambda p: predict(
            compose_config([f"ckpt_path={p}", f"input={image}", f"output={tmp_path / 'p.csv'}"], "predict")
        ),
        "evaluate": lambda p: evaluate(compose_config([f"ckpt_path={p}", f"output_dir={tmp_path / 'e'}"], "evaluate")),
        "explain": lambda p: explain(compose_config([f"ckpt_path={p}", f"output_dir={tmp_path / 'x'}"], "explain")),
        "export": lambda p: export(compose_config([f"ckpt_path={p}", f"output={tmp_path / 'm.onnx'}"], "export")),
        "config checks": checkpoints.checkpoint_hparams,
    }


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_command_refuses_a_checkpoint_outside_the_schema(attack, hostile_checkpoints, tiny_demo, tmp_path):
    path = hostile_checkpoints[0][attack]
    image = next((tiny_demo / "images_001" / "images").glob("*.png"))
    for name, run in commands(tmp_path, image).items():
        if name == "config checks" and attack in ("stride-0 tensor", "missing weights"):
            continue  # the config checks read the hyperparameters only
        with pytest.raises(CheckpointError, match=ATTACKS[attack][1]) as info:
            run(path)
        assert "\n" not in str(info.value), f"{name}: {info.value}"
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()
    assert not any(Path("/tmp/x").glob("PWNED*"))


def test_the_cli_gives_one_short_line_for_each(hostile_checkpoints, tiny_demo, tmp_path, capsys):
    # In process, through the commands' own wrapper (cli.run_task): the subprocess contract is
    # tested once, in test_predict_errors.py.
    from cxr_lightning.cli import run_task
    from cxr_lightning.tasks.predict import predict

    made, legacy = hostile_checkpoints
    image = next((tiny_demo / "images_001" / "images").glob("*.png"))
    cases = ((made["hidden=2**40"], "larger than"), (made["stride-0 tensor"], "stride-0"), (legacy, "Refusing"))
    for path, expected in cases:
        cfg = compose_config([f"ckpt_path={path}", f"input={image}", f"output={tmp_path / 'p.csv'}"], "predict")
        with pytest.raises(SystemExit) as info:
            run_task(predict, cfg)
        assert info.value.code == 2
        line = assert_one_error_line(capsys.readouterr().err, expected)
        assert len(line) < 700


SIDECARS = {
    "deep nesting": lambda genuine: "[" * 100_000 + "]" * 100_000,
    "1e400 size": lambda genuine: genuine.replace(
        f'"checkpoint_size": {json.loads(genuine)["checkpoint_size"]}', '"checkpoint_size": 1e400'
    ),
    "1e400 threshold": lambda genuine: json.dumps({**json.loads(genuine), "thresholds": {
        k: 1e400 if i == 0 else v for i, (k, v) in enumerate(json.loads(genuine)["thresholds"].items())
    }}).replace("Infinity", "1e400"),
    "threshold as text": lambda genuine: json.dumps({**json.loads(genuine), "thresholds": {
        k: "0.5" for k in json.loads(genuine)["thresholds"]}}),
}


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """A copy of the trained checkpoint with the thresholds and calibration files evaluate writes."""
    import numpy as np

    from cxr_lightning.calibration import fit_calibration

    folder = tmp_path_factory.mktemp("evaluated")
    ckpt = folder / trained_run[1].name
    shutil.copy(trained_run[1], ckpt)
    labels = checkpoints.checkpoint_hparams(ckpt)["label_names"]
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, (40, len(labels))), rng.random((40, len(labels)))
    calibration = fit_calibration(y, p, "platt", labels)
    operating_point.save_calibration(ckpt, calibration)
    operating_point.save_thresholds(ckpt, labels, [0.4] * len(labels), "f1", 40, calibration=calibration)
    return ckpt, labels


@pytest.mark.parametrize("attack", list(SIDECARS))
@pytest.mark.parametrize("kind", ["thresholds", "calibration"])
def test_a_hostile_sidecar_is_one_error(attack, kind, evaluated, tmp_path):
    if kind == "calibration" and attack.startswith("threshold") or "threshold" in attack and kind == "calibration":
        pytest.skip("an attack on the thresholds file only")
    source, labels = evaluated
    ckpt = tmp_path / source.name
    shutil.copy(source, ckpt)
    sidecar = {"thresholds": run_dir.thresholds_path, "calibration": run_dir.calibration_path}[kind]
    path = sidecar(ckpt)
    genuine = sidecar(source).read_text()
    path.write_text(SIDECARS[attack](genuine))
    read = {"thresholds": operating_point.load_operating_point, "calibration": operating_point.load_calibration}[kind]
    with pytest.raises(CheckpointError) as info:
        read(ckpt, labels)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
