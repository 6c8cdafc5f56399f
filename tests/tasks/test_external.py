"""Scoring an NIH checkpoint on an external source: the same pixels under NIH's and CheXpert's
layouts give the same AUROC for the mapped labels; thresholds carry over from the source's val
split; unavailable labels are listed, not scored."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import compose_config, tiny_overrides
from fixtures.make_external import nih_as_chexpert

from cxr_lightning import files
from cxr_lightning.checkpoints import thresholds_path
from cxr_lightning.data import harmonise
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.tasks.evaluate import evaluate

pytestmark = pytest.mark.slow
N_BOOT = 30
NIH_OF = harmonise.mapping("chexpert")  # CheXpert observation -> NIH label


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny NIH-layout fit without prior-visit inputs (CheXpert lacks seven of NIH's labels, so
    their prior-visit inputs could not match); age, sex and view go in as in both layouts."""
    from cxr_lightning.tasks.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(tiny_overrides(tiny_demo, out) + ["head=fusion", "data.prior_labels=false", "test_after_fit=false"])
    return out, Path(train(cfg)["best_checkpoint"])


@pytest.fixture(scope="module")
def both(fitted, tiny_demo, tmp_path_factory):
    run_dir, ckpt = fitted
    nih = evaluate(compose_config([f"run_dir={run_dir}", f"n_boot={N_BOOT}", "data.num_workers=0"], "evaluate"))
    chexpert = nih_as_chexpert(tiny_demo, tmp_path_factory.mktemp("chexpert"))
    out = tmp_path_factory.mktemp("external")
    external = evaluate(compose_config(
        [f"ckpt_path={ckpt}", "data=chexpert", f"data.root={chexpert}", "split=valid", "data.num_workers=0",
         f"n_boot={N_BOOT}", f"output_dir={out}", f"paths.cache_dir={out}/cache"], "evaluate"))
    return nih, external, chexpert


def test_same_pixels_give_the_same_auroc_for_the_mapped_labels(both):
    nih, external, _ = both
    assert external.metrics["n_images"] == nih.metrics["n_images"]
    mapped = [n for n in nih.per_class.index if n in set(NIH_OF.values())]
    assert len(mapped) == 8
    checked = 0
    for name in mapped:
        a, b = nih.metrics[f"auroc.{name}"], external.metrics[f"auroc.{name}"]
        if np.isnan(a):
            assert np.isnan(b), name
            continue
        assert b == pytest.approx(a, abs=1e-6), name
        assert external.metrics[f"auprc.{name}"] == pytest.approx(nih.metrics[f"auprc.{name}"], abs=1e-6), name
        checked += 1
    assert checked >= 4


def test_unavailable_labels_are_listed_not_scored(both):
    _, external, _ = both
    unavailable = ["Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
    assert external.metrics["unavailable_labels"] == unavailable
    assert list(external.per_class.index) == [n for n in external.metrics["scored_labels"]] + ["mean"]
    assert not [k for k in external.metrics if k.startswith("auroc.") and k[6:] in unavailable]
    report = (external.output_dir / "report.md").read_text()
    assert "trained on **nih**" in report and "scored on **chexpert**" in report
    assert "Mass" in report.split("unavailable, not scored")[1]


def test_thresholds_carry_over_from_the_source_val_split(both, fitted):
    nih, external, _ = both
    _, ckpt = fitted
    saved = json.loads(thresholds_path(ckpt).read_text())["thresholds"]
    for name in external.metrics["scored_labels"]:
        assert external.per_class.at[name, "threshold"] == pytest.approx(saved[name]), name
    assert external.thresholds_file == thresholds_path(ckpt)
    assert "carried over" in external.metrics["threshold_source"]


def test_refit_thresholds_on_the_external_val_split_leaves_the_source_file(both, fitted, tmp_path):
    _, _, chexpert = both
    _, ckpt = fitted
    before = files.file_digest(thresholds_path(ckpt))
    refit = evaluate(compose_config(
        [f"ckpt_path={ckpt}", "data=chexpert", f"data.root={chexpert}", "split=val", "data.num_workers=0",
         "n_boot=5", "refit_thresholds=true", f"output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"], "evaluate"))
    assert refit.thresholds_file is None and "refitted" in refit.metrics["threshold_source"]
    assert files.file_digest(thresholds_path(ckpt)) == before


def test_external_needs_the_source_thresholds_or_refit(both, fitted, tmp_path):
    _, _, chexpert = both
    _, ckpt = fitted
    copy = tmp_path / "copy.ckpt"
    shutil.copyfile(ckpt, copy)
    args = [f"ckpt_path={copy}", "data=chexpert", f"data.root={chexpert}", "split=val", "data.num_workers=0",
            "n_boot=5", f"output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache"]
    with pytest.raises(CheckpointError, match="refit_thresholds=true"):
        evaluate(compose_config(args, "evaluate"))
    with pytest.raises(ConfigError, match="refit_thresholds=true is for an external source"):
        evaluate(compose_config([f"ckpt_path={copy}", "refit_thresholds=true", f"output_dir={tmp_path}/o2"], "evaluate"))


def test_cross_dataset_table_one_row_per_dataset_and_label(both, tmp_path):
    from cxr_lightning.cli import compare_command

    nih, external, _ = both
    written = compare_command(["--datasets", str(nih.output_dir), str(external.output_dir), "--out", str(tmp_path)])
    table = pd.read_csv(written.csv)
    assert set(table["dataset"]) == {"nih", "chexpert"}
    for evaluation, dataset in ((nih, "nih"), (external, "chexpert")):
        rows = table[table["dataset"] == dataset].set_index("label")
        for name in evaluation.metrics["scored_labels"]:
            assert rows.at[name, "auroc"] == pytest.approx(evaluation.metrics[f"auroc.{name}"], nan_ok=True)
            assert rows.at[name, "auroc_lower"] == pytest.approx(evaluation.metrics[f"auroc_lower.{name}"], nan_ok=True)
    chexpert_rows = table[table["dataset"] == "chexpert"].set_index("label")
    assert chexpert_rows.loc["Mass", ["auroc", "n_pos"]].isna().all()  # unavailable, listed
    text = written.markdown.read_text()
    assert "| test_resnet | chexpert | val | Mass | unavailable |" in text


def chexpert_training_overrides(root: Path, out: Path) -> list[str]:
    return ["data=chexpert" if o == "data=nih" else o for o in tiny_overrides(root, out)] + ["data.test_fraction=0.2"]


def test_training_on_chexpert_needs_ones_or_zeros(tmp_path):
    from fixtures.make_external import write_chexpert

    from cxr_lightning.tasks.validate import validate_config

    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    with pytest.raises(ConfigError, match="data.uncertain=ones"):
        validate_config(compose_config(chexpert_training_overrides(root, tmp_path / "run")))


def test_training_on_chexpert_with_its_official_split(tmp_path):
    from fixtures.make_external import CHEXPERT_VALID, write_chexpert

    from cxr_lightning.checkpoints import checkpoint_hparams
    from cxr_lightning.tasks.train import train

    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    metrics = train(compose_config(chexpert_training_overrides(root, tmp_path / "run")
                                   + ["data.uncertain=ones", "head=fusion_residual", "test_after_fit=false"]))
    hparams = checkpoint_hparams(metrics["best_checkpoint"])
    assert hparams["label_names"] == harmonise.available_labels("chexpert")
    val = (tmp_path / "run" / "val_patients.txt").read_text().split()
    assert sorted(map(int, val)) == sorted({r[0] for r in CHEXPERT_VALID})


def test_nih_google_scores_pneumothorax_only_on_googles_test_set(both, fitted, tiny_demo, tmp_path):
    from fixtures.make_external import write_nih_google

    _, ckpt = fitted
    root = tmp_path / "nih"
    shutil.copytree(tiny_demo, root)
    table = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    write_nih_google(root, table["Image Index"].tolist(), table["Patient ID"].tolist())
    google_test = pd.read_csv(root / "four_findings_expert_labels_test_labels.csv")
    result = evaluate(compose_config(
        [f"ckpt_path={ckpt}", "data=nih_google", f"data.root={root}", "split=test", "data.num_workers=0",
         "n_boot=10", f"output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache"], "evaluate"))
    assert result.metrics["scored_labels"] == ["Pneumothorax"]
    assert result.metrics["n_images"] == len(google_test)
    assert result.metrics["n_pos.Pneumothorax"] == int((google_test["Pneumothorax"] == "YES").sum())
    assert "Nodule" in result.metrics["unavailable_labels"] and "Mass" in result.metrics["unavailable_labels"]
