"""Attacks 2-4: a shared run directory, checkpoint or bundle names labels, folders and checkpoints,
or holds interpolations and markup; no command writes outside its output folder, reads the
environment, or copies markup into its Markdown/HTML."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from helpers import compose_config

from cxr_lightning import checkpoints
from cxr_lightning.errors import CheckpointError
from cxr_lightning.files import write_csv
from security.hostile import edited_checkpoint, outputs_text

pytestmark = pytest.mark.slow

SCRIPT = "<script>alert(document.cookie)</script>"


def test_a_bundle_with_a_path_as_label_is_refused_and_writes_nothing(trained_run, tiny_demo, tmp_path, sentinel):
    from safetensors.torch import save_model

    from cxr_lightning.tasks.predict import predict

    model = checkpoints.load_model(trained_run[1])
    bundle = tmp_path / "shared.safetensors"
    checkpoints.save_bundle(model, bundle)
    metadata = checkpoints.read_bundle_metadata(bundle)
    escape = "A/" + "../" * 30 + str(sentinel.target).lstrip("/")
    metadata["label_names"] = metadata["hyper_parameters"]["label_names"] = [escape, *model.hparams.label_names[1:]]
    save_model(model, str(bundle), metadata={checkpoints.BUNDLE_KEY: json.dumps(metadata)})
    image = next((tiny_demo / "images_001" / "images").glob("*.png"))
    overrides = [f"ckpt_path={bundle}", f"input={image}", f"output={tmp_path / 'out' / 'p.csv'}", "cam=true"]
    cfg = compose_config(overrides, "predict")
    with pytest.raises(CheckpointError, match=r"label_names\[0\].*not an allowed name"):
        predict(cfg)
    sentinel.assert_untouched()
    assert not sentinel.target.with_suffix(".png").exists() and not (tmp_path / "out").exists()


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    frame = pd.DataFrame({
        "file": ["=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "ok.png"], "=p": [0.1, -0.5, 0.2, 0.3, 0.4],
    })
    read = pd.read_csv(write_csv(frame, tmp_path / "p.csv"))
    assert read["file"].tolist() == ["'=HYPERLINK(\"http://x\")", "'+1", "'-2+3", "'@SUM(A1)", "ok.png"]
    assert list(read.columns) == ["file", "'=p"]
    assert read["'=p"].tolist() == [0.1, -0.5, 0.2, 0.3, 0.4]  # numbers stay numbers


def test_evaluate_a_shared_run_writes_only_its_own_outputs(trained_run, run_copy, sentinel, tmp_path, secret):
    from cxr_lightning.tasks.evaluate import evaluate

    # Another project's model, which metrics.json claims as this run's best checkpoint.
    other = sentinel.add("other_project.ckpt", trained_run[1].read_bytes())
    metrics = json.loads((run_copy / "metrics.json").read_text())
    (run_copy / "metrics.json").write_text(json.dumps({**metrics, "best_checkpoint": str(other)}))
    # The run's own checkpoint names a cache folder in the sentinel, and carries markup and an
    # interpolation in the settings the report shows.
    def edit(ckpt):
        data = ckpt["hyper_parameters"]["config"]["data"]
        data.update(cache_dir=str(sentinel.folder / "cache"), cache=True)
        ckpt["hyper_parameters"]["optimizer"]["_target_"] = "torch.optim." + SCRIPT
        ckpt["hyper_parameters"]["config"]["seed"] = "${oc.env:CXR_TEST_SECRET}"
    for path in (run_copy / "checkpoints").glob("*.ckpt"):
        edited_checkpoint(path, path, edit)
    own_cache = tmp_path / "own_cache"
    cfg = compose_config([f"run_dir={run_copy}", f"output_dir={tmp_path / 'evaluation'}", "n_boot=5",
                          f"paths.cache_dir={own_cache}"], "evaluate")
    result = evaluate(cfg)
    sentinel.assert_untouched()
    assert str(result.metrics["checkpoint"]).startswith(str(run_copy / "checkpoints"))
    assert any(own_cache.iterdir())  # the image cache went to this command's cache folder
    text = outputs_text(tmp_path / "evaluation")
    assert secret not in text
    for name in ("report.md", "model_card.md"):
        page = (tmp_path / "evaluation" / name).read_text()
        assert "<script" not in page and "</script" not in page and "&lt;/script&gt;" in page, name


def test_compare_reads_a_shared_config_as_plain_data(trained_run, tmp_path, secret, sentinel):
    from cxr_lightning.tasks.compare import write_comparison

    sweep = tmp_path / "sweep"
    run = sweep / "0"
    shutil.copytree(trained_run[0], run)
    config = (run / "config.yaml").read_text()
    config = config.replace("name: fusion_residual", f"name: '{SCRIPT}'")
    config += "\nleak: ${oc.env:CXR_TEST_SECRET}\nbackbone_env: ${oc.env:CXR_TEST_SECRET}\n"
    config = config.replace("seed: 42", "seed: ${oc.env:CXR_TEST_SECRET}")
    (run / "config.yaml").write_text(config)
    (run / "error.txt").write_text(f"[click](javascript:alert(1)) {SCRIPT}\n")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["selection"] = {"metric": SCRIPT}
    (run / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "comparison"
    write_comparison(sweep, "backbone,head,leak", out)
    text = outputs_text(out)
    assert secret not in text
    for name in ("comparison.md", "comparison.html"):
        page = (out / name).read_text()
        assert "<script>alert" not in page and "](javascript:" not in page, name
    assert "${oc.env:CXR_TEST_SECRET}" in (out / "comparison.md").read_text()  # shown as the text it is
    sentinel.assert_untouched()


def test_a_demo_named_by_a_checkpoint_is_generated_in_the_commands_cache(trained_run, tmp_path, sentinel):
    from cxr_lightning.tasks.build import datamodule_for

    def edit(ckpt):
        data = ckpt["hyper_parameters"]["config"]["data"]
        demo = {"patients": 12, "image_size": 64, "seed": 1}
        data.update(source="demo", root=None, cache_dir=str(sentinel.folder), demo=demo)
    ckpt = edited_checkpoint(trained_run[1], tmp_path / "demo.ckpt", edit)
    dm = datamodule_for(checkpoints.load_model(ckpt), None, cache_dir=str(tmp_path / "own"))
    assert str(dm.root).startswith(str(tmp_path / "own"))
    sentinel.assert_untouched()
    too_big = edited_checkpoint(trained_run[1], tmp_path / "big.ckpt",
                                lambda c: c["hyper_parameters"]["config"]["data"].update(demo={"patients": 10**9}))
    with pytest.raises(CheckpointError, match=r"demo.patients"):
        checkpoints.load_model(too_big)
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("command", ["summary", "compare --datasets", "resolve run_dir"])
def test_a_deeply_nested_or_overflowing_run_file_is_one_error(command, run_copy, tmp_path):
    from cxr_lightning.errors import CXRError
    from cxr_lightning.tasks.compare_datasets import write_dataset_table
    from cxr_lightning.tasks.summary import print_summary

    (run_copy / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    run = {
        "summary": lambda: print_summary(run_copy),
        "compare --datasets": lambda: write_dataset_table([run_copy], tmp_path / "out"),
        "resolve run_dir": lambda: checkpoints.resolve_checkpoint(None, str(run_copy)),
    }[command]
    with pytest.raises(CXRError, match=r"nested too deeply") as info:
        run()
    assert "\n" not in str(info.value)
