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
from fixtures.make_external import nih_as_chexpert
from helpers import compose_config, tiny_overrides

from cxr_lightning import files
from cxr_lightning.data.sources.chexpert import HARMONISATION
from cxr_lightning.errors import CheckpointError, ConfigError
from cxr_lightning.labels import ALL_LABELS
from cxr_lightning.run_dir import thresholds_path
from cxr_lightning.tasks.evaluate import evaluate

pytestmark = pytest.mark.slow
N_BOOT = 30
NIH_OF = {o: c[0] for o, c in HARMONISATION.items() if c[0] in ALL_LABELS}  # CheXpert observation -> NIH label


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny NIH-layout fit without prior-visit inputs (CheXpert lacks seven of NIH's labels, so
    their prior-visit inputs could not match); age, sex and view go in as in both layouts."""
    from cxr_lightning.tasks.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        tiny_overrides(tiny_demo, out) + ["head=fusion", "data.prior_labels=false", "test_after_fit=false"]
    )
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
    refit = evaluate(
        compose_config(
            [
                f"ckpt_path={ckpt}",
                "data=chexpert",
                f"data.root={chexpert}",
                "split=val",
                "data.num_workers=0",
                "n_boot=5",
                "refit_thresholds=true",
                f"output_dir={tmp_path}",
                f"paths.cache_dir={tmp_path}/cache",
            ],
            "evaluate",
        )
    )
    assert "refitted" in refit.metrics["threshold_source"] and not refit.written_to_run
    # the refitted thresholds are this evaluation's, in its own folder; the checkpoint's stay
    assert refit.thresholds_file == tmp_path / "thresholds.json"
    own = json.loads(refit.thresholds_file.read_text())["thresholds"]
    for name in refit.metrics["scored_labels"]:
        assert refit.per_class.at[name, "threshold"] == pytest.approx(own[name]), name
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
        evaluate(
            compose_config([f"ckpt_path={copy}", "refit_thresholds=true", f"output_dir={tmp_path}/o2"], "evaluate")
        )


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


def test_training_on_chexpert_with_uncertain_ignored(tmp_path):
    """U-Ignore: an uncertain label is masked in the loss, the class weights and the metrics."""
    from fixtures.make_external import CHEXPERT_TRAIN, write_chexpert

    from cxr_lightning.checkpoints import checkpoint_hparams
    from cxr_lightning.tasks.train import train
    from cxr_lightning.tasks.validate import validate_config

    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    cfg = compose_config(chexpert_training_overrides(root, tmp_path / "run")
                         + ["data.uncertain=ignore", "data.image_size=32", "head=fusion", "test_after_fit=false",
                            "trainer.limit_train_batches=1"])
    validate_config(cfg)
    metrics = train(cfg)
    hparams = checkpoint_hparams(metrics["best_checkpoint"])
    assert hparams["label_space"] == "nih14"
    # The class weights count only the training images whose label is certain (recounted from the
    # fixture's rows: a -1 code does not count, a blank is a negative).
    from cxr_lightning.data.spec import DataSpec
    from cxr_lightning.data.tables import build_tables

    train_patients = set(build_tables(DataSpec.from_options(source="chexpert", root=root, test_fraction=0.2))
                         .tables["train"]["Patient ID"])
    pos_frac = dict(zip(hparams["label_names"], hparams["pos_frac"]))
    for observation, label in (("Cardiomegaly", "Cardiomegaly"), ("Atelectasis", "Atelectasis"), ("Edema", "Edema")):
        codes = [r[7].get(observation, "") for r in CHEXPERT_TRAIN if r[5] == "Frontal" and r[0] in train_patients]
        certain = [c for c in codes if c != "-1.0"]
        assert pos_frac[label] == pytest.approx(certain.count("1.0") / len(certain)), label


def test_training_on_chexpert_with_its_official_split(tmp_path):
    from fixtures.make_external import CHEXPERT_VALID, write_chexpert

    from cxr_lightning.checkpoints import checkpoint_hparams
    from cxr_lightning.tasks.train import train

    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    metrics = train(compose_config(chexpert_training_overrides(root, tmp_path / "run")
                                   + ["data.uncertain=ones", "head=fusion_residual", "test_after_fit=false"]))
    hparams = checkpoint_hparams(metrics["best_checkpoint"])
    assert hparams["label_names"] == [n for n in ALL_LABELS if n in set(NIH_OF.values())]
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


def test_underdiagnosis_denominator_on_chexpert_is_no_finding_negative(both):
    _, external, chexpert = both
    valid = pd.read_csv(chexpert / "valid.csv")
    audit = external.underdiagnosis
    assert audit.loc[audit["attribute"] == "sex", "n_with_finding"].sum() == int((valid["No Finding"] == 0).sum())


def test_external_valid_split_needs_only_its_own_rows_and_images(both, fitted, tmp_path):
    """The 234-image CheXpert validation set alone: no training image on disk, then no train.csv."""
    nih, external, chexpert = both
    _, ckpt = fitted
    root = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(chexpert, root)
    shutil.rmtree(root / "train")
    n_valid = len(pd.read_csv(root / "valid.csv"))

    def score(out: str):
        return evaluate(compose_config(
            [f"ckpt_path={ckpt}", "data=chexpert", f"data.root={root}", "split=valid", "data.num_workers=0",
             "n_boot=10", f"output_dir={tmp_path}/{out}", f"paths.cache_dir={tmp_path}/cache"], "evaluate"))

    assert score("without_train_images").metrics["n_images"] == n_valid
    (root / "train.csv").unlink()
    result = score("valid_csv_alone")
    assert result.metrics["n_images"] == n_valid
    assert result.metrics["auroc_mean"] == pytest.approx(external.metrics["auroc_mean"])
