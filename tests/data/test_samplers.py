"""data.sampler: the No-Finding undersampler, the balanced sampler, their DDP shares, the class
weights they imply, and the evaluation loaders they leave alone."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
from torch.utils.data import DistributedSampler, SequentialSampler

from cxr_lightning.data.datamodule import CXRDataModule
from cxr_lightning.data.samplers import BalancedSampler, NoFindingUndersampler, balanced_weights
from cxr_lightning.errors import ConfigError

NAMES = ["Atelectasis", "Mass", "No Finding"]


def toy_labels(n_no_finding: int = 60, n_findings: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    findings = np.zeros((n_findings, 3))
    findings[:, 0] = rng.random(n_findings) < 0.6
    findings[:, 1] = ~findings[:, 0].astype(bool) | (rng.random(n_findings) < 0.3)
    no_finding = np.tile([0.0, 0.0, 1.0], (n_no_finding, 1))
    return rng.permutation(np.concatenate([findings, no_finding]))


def epoch(sampler, e: int) -> list[int]:
    sampler.set_epoch(e)
    return list(sampler)


def test_undersampler_keeps_the_share_per_epoch_and_uses_every_image():
    labels = toy_labels()
    only_nf = set(np.flatnonzero(labels[:, 2] == 1).tolist())
    findings = set(range(len(labels))) - only_nf
    sampler = NoFindingUndersampler(labels, NAMES, keep=0.25, seed=3)
    seen: set[int] = set()
    draws = []
    for e in range(math.ceil(1 / 0.25)):
        drawn = epoch(sampler, e)
        assert len(drawn) == len(set(drawn)) == len(sampler)  # no repeats within an epoch
        assert set(drawn) >= findings  # every image with a finding, every epoch
        assert len(set(drawn) & only_nf) == 15  # 25 % of the 60 No-Finding-only images
        seen |= set(drawn)
        draws.append(drawn)
    assert seen == set(range(len(labels)))  # every image within ceil(1 / keep) epochs
    assert draws[0] != draws[1]  # reseeded per epoch
    assert epoch(sampler, 1) == draws[1]  # ... and reproducibly


def test_undersampler_works_without_a_no_finding_column():
    labels = toy_labels()[:, :2]  # drop_no_finding: the No-Finding-only images have no positive label
    sampler = NoFindingUndersampler(labels, NAMES[:2], keep=0.5, seed=0)
    drawn = epoch(sampler, 0)
    assert len(drawn) == 40 + 30 and sum(labels[i].sum() == 0 for i in drawn) == 30


def test_balanced_draw_frequencies_follow_the_weights():
    # Atelectasis x4, Mass x2, No Finding x1: weights sum_c y_ic / n_c by hand.
    labels = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=float)
    expected = np.array([1 / 4, 1 / 4, 1 / 4, 1 / 2, 1, 1 / 4 + 1 / 2])
    expected /= expected.sum()
    np.testing.assert_allclose(balanced_weights(labels), expected)
    sampler = BalancedSampler(labels, seed=1)
    counts = np.zeros(len(labels))
    for e in range(3000):
        np.add.at(counts, epoch(sampler, e), 1)
    freq = counts / counts.sum()
    # 18 000 draws: each frequency within 4 binomial standard deviations.
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / counts.sum()))
    # Each label is drawn about equally often (Mass and Atelectasis share image 5).
    per_label = freq @ labels
    assert per_label[2] == pytest.approx(1 / 3, abs=0.02) and per_label[1] > per_label[2]


def test_ddp_shares_are_disjoint_and_cover_the_epoch():
    labels = toy_labels(61, 40)  # 101 images: not a multiple of the world size
    for make in (lambda r: NoFindingUndersampler(labels, NAMES, 0.5, seed=7, num_replicas=3, rank=r),
                 lambda r: BalancedSampler(labels, seed=7, num_replicas=3, rank=r)):
        single = make(0)
        single.set_epoch(4)
        whole = single.epoch_draw()
        shares = [epoch(make(r), 4) for r in range(3)]
        assert len({len(s) for s in shares}) == 1  # equal batches on every rank: no DDP hang
        # The ranks split one draw by position: disjoint, and together the whole draw (cut to 3k).
        interleaved = np.stack(shares, axis=1).ravel()
        np.testing.assert_array_equal(interleaved, whole[: len(interleaved)])
        assert len(whole) - len(interleaved) < 3
    nf = [set(epoch(NoFindingUndersampler(labels, NAMES, 0.5, seed=7, num_replicas=3, rank=r), 2)) for r in range(3)]
    assert not (nf[0] & nf[1] or nf[0] & nf[2] or nf[1] & nf[2])


def test_lightning_keeps_the_sampler_under_ddp(tiny_demo):
    """Lightning swaps a loader's sampler for its own DistributedSampler unless it already is one."""
    dm = CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0, sampler="balanced")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedSampler) and loader.sampler.rank == 1
    assert isinstance(loader.sampler, DistributedSampler)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    assert not trainer._data_connector._requires_distributed_sampler(loader)


@pytest.mark.parametrize("sampler", ["undersample_no_finding", "balanced"])
def test_validation_and_test_loaders_are_never_resampled(tiny_demo, sampler):
    dm = CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0, sampler=sampler)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert isinstance(loader.sampler, SequentialSampler)
        assert list(loader.sampler) == list(range(len(dm.split_table(split))))
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    val = dm.val_dataloader().sampler
    assert not isinstance(val, (BalancedSampler, NoFindingUndersampler)) and val.shuffle is False


def test_class_weights_follow_the_sampled_distribution(tiny_demo):
    random = CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0)
    under = CXRDataModule(source="nih", root=tiny_demo, image_size=64, num_workers=0,
                          sampler="undersample_no_finding", no_finding_keep=0.5)
    train = under.split_table("train")
    labels = train[under.label_cols].to_numpy()
    only = labels[:, under.label_names.index("No Finding")] == 1
    assert only.any() and (~only).any()
    kept = math.ceil(0.5 * only.sum())
    expected = (labels[~only].sum(0) + kept / only.sum() * labels[only].sum(0)) / ((~only).sum() + kept)
    np.testing.assert_allclose(under.label_stats["pos_frac"].to_numpy(), expected)
    np.testing.assert_allclose(random.label_stats["pos_frac"].to_numpy(), labels.mean(0))
    # The expected frequencies are what an epoch of the sampler actually draws.
    drawn = labels[list(under.train_sampler())]
    np.testing.assert_allclose(drawn.mean(0), expected)
    assert under.sampler_record == {"name": "undersample_no_finding", "seed": 0, "no_finding_keep": 0.5}


def test_bad_sampler_options_are_config_errors(tiny_demo):
    with pytest.raises(ConfigError, match="data.sampler='oversample'"):
        CXRDataModule(source="nih", root=tiny_demo, sampler="oversample")
    with pytest.raises(ConfigError, match="no_finding_keep=0"):
        CXRDataModule(source="nih", root=tiny_demo, sampler="undersample_no_finding", no_finding_keep=0)
