"""run_dir.py owns the run directory's layout: the names agree with Lightning and the configs, and
no other module spells them."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from cxr_lightning import run_dir
from cxr_lightning.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]


def test_the_names_agree_with_lightning_and_the_callback_config():
    assert run_dir.LAST_CHECKPOINT == ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
    callbacks = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "callbacks" / "default.yaml"), resolve=False)
    dirpaths = {name: c["dirpath"] for name, c in callbacks.items() if isinstance(c, dict) and "dirpath" in c}
    assert len(dirpaths) >= 3 and set(dirpaths.values()) == {f"${{paths.output_dir}}/{run_dir.CHECKPOINTS}"}
    assert callbacks["history"]["path"] == f"${{paths.output_dir}}/{run_dir.HISTORY}"


def test_accessors_place_every_file(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.root == tmp_path and run.metrics == tmp_path / "metrics.json"
    assert run.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert run.hydra_config == tmp_path / ".hydra" / "config.yaml"
    assert run.evaluation.predictions == tmp_path / "evaluation" / "predictions.csv"
    assert run.evaluation.figure("roc") == tmp_path / "evaluation" / "roc.png"
    assert run.explain.localization == tmp_path / "explain" / "localization.csv"
    assert run.report_html == tmp_path / "report.html"
    ckpt = run.checkpoints / "epoch=3-step=9.ckpt"
    assert run_dir.thresholds_path(ckpt) == run.checkpoints / "epoch=3-step=9.thresholds.json"
    assert run_dir.calibration_path(ckpt) == run.checkpoints / "epoch=3-step=9.calibration.json"
    assert RunDir.of_checkpoint(ckpt) == run and RunDir.of_checkpoint(tmp_path / "model.ckpt") is None
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert [p.name for p in run.hpc_checkpoints] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]


def test_no_other_module_spells_a_run_file_name():
    names = [v for k, v in vars(run_dir).items() if k.isupper() and isinstance(v, str) and "." in v]
    names += list(run_dir.FIGURES.values())
    assert "metrics.json" in names and "last.ckpt" in names
    literal = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in names))
    offenders = {
        str(path.relative_to(REPO)): sorted(set(literal.findall(path.read_text())))
        for path in (REPO / "cxr_lightning").rglob("*.py")
        if path.name != "run_dir.py" and literal.search(path.read_text())
    }
    assert not offenders
