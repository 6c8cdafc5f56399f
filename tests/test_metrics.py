"""Metrics against answers worked out independently here: pair counts, hand-made confusion counts,
brute-force threshold searches and a slow index-based bootstrap."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
)

from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.evaluation.statistics import (
    _resample_indices,
    age_bands,
    bootstrap_ci,
    choose_thresholds,
    expected_calibration_error,
    operating_point_metrics,
    reliability_curve,
    subgroup_auroc,
)
from cxr_lightning.metrics import LabelMetrics

# ---------------------------------------------------------------- independent reference answers


def pair_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC by counting (positive, negative) pairs: 1 if ordered right, 1/2 if tied."""
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def ranked_average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """AP for distinct scores: mean over positives of precision among the images scored >= it."""
    return float(np.mean([((p >= s) & (y == 1)).sum() / (p >= s).sum() for s in p[y == 1]]))


def hand_f1(y: np.ndarray, called: np.ndarray) -> float:
    tp = int(((called == 1) & (y == 1)).sum())
    fp = int(((called == 1) & (y == 0)).sum())
    fn = int(((called == 0) & (y == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn)


def logit(p: np.ndarray) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


# ---------------------------------------------------------------- LabelMetrics

NAMES = ["Atelectasis", "Hernia", "Effusion"]
# label 0: positives 0.9, 0.4 / negatives 0.6, 0.1 -> 3 of 4 pairs ordered right -> AUROC 0.75
# label 1: no positives at all; label 2: random-ish scores with both classes
PROBS = np.array(
    [
        [0.9, 0.2, 0.7],
        [0.6, 0.7, 0.3],
        [0.4, 0.1, 0.8],
        [0.1, 0.3, 0.55],
        [0.05, 0.6, 0.45],
        [0.03, 0.2, 0.35],
    ]
)
TARGETS = np.array(
    [
        [1, 0, 1],
        [0, 0, 0],
        [1, 0, 1],
        [0, 0, 0],
        [0, 0, 1],
        [0, 0, 0],
    ]
)


def filled_metric(names=NAMES, probs=PROBS, targets=TARGETS, **kwargs) -> LabelMetrics:
    metric = LabelMetrics(names, **kwargs)
    for rows in (slice(0, 4), slice(4, None)):  # two batches: state must accumulate
        metric.update(logit(probs[rows]), torch.as_tensor(targets[rows], dtype=torch.float32))
    return metric


def test_per_label_auroc_equals_pair_count_and_label_without_positives_is_nan():
    result = filled_metric().compute()
    assert pair_auroc(TARGETS[:4, 0], PROBS[:4, 0]) == 0.75  # the constructed case, counted by hand
    for j, name in enumerate(NAMES):
        if name == "Hernia":
            assert math.isnan(result[f"auroc/{name}"])
        else:
            assert result[f"auroc/{name}"].item() == pytest.approx(pair_auroc(TARGETS[:, j], PROBS[:, j]))
    expected_mean = np.mean([pair_auroc(TARGETS[:, j], PROBS[:, j]) for j in (0, 2)])
    assert result["auroc_mean"].item() == pytest.approx(expected_mean)


def test_label_without_negatives_is_skipped_and_named():
    targets = TARGETS.copy()
    targets[:, 2] = 1
    metric = filled_metric(targets=targets)
    result = metric.compute()
    assert math.isnan(result["auroc/Effusion"]) and math.isnan(result["auroc/Hernia"])
    assert result["auroc_mean"].item() == pytest.approx(pair_auroc(targets[:, 0], PROBS[:, 0]))
    assert metric.skipped_labels() == ["Hernia", "Effusion"]


def test_f1_macro_and_auprc_mean_by_hand_over_labels_with_positives():
    result = filled_metric().compute()
    called = (PROBS >= 0.5).astype(int)
    expected_f1 = np.mean([hand_f1(TARGETS[:, j], called[:, j]) for j in (0, 2)])
    assert result["f1_macro"].item() == pytest.approx(expected_f1)
    expected_ap = np.mean([ranked_average_precision(TARGETS[:, j], PROBS[:, j]) for j in (0, 2)])
    assert result["auprc_mean"].item() == pytest.approx(expected_ap)


def test_sigmoid_is_applied_even_when_logits_look_like_probabilities():
    # logits all in [0, 1]: torchmetrics' own rule would read them as probabilities and call
    # 0.2 negative; after the sigmoid every probability is >= 0.5, so every call is positive.
    logits = torch.tensor([[0.2], [0.3], [0.9], [0.1]])
    targets = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
    metric = LabelMetrics(["A"])
    metric.update(logits, targets)
    expected = hand_f1(targets[:, 0].numpy(), np.ones(4))
    assert expected != hand_f1(targets[:, 0].numpy(), (logits[:, 0] >= 0.5).numpy())  # the case tells them apart
    assert metric.compute()["f1_macro"].item() == pytest.approx(expected)


def test_reset_forgets_everything_and_empty_compute_raises_clear_error():
    metric = filled_metric()
    metric.compute()
    metric.reset()
    with pytest.raises(DataError, match="no batch was added"):
        metric.compute()
    rows = slice(1, 4)
    metric.update(logit(PROBS[rows]), torch.as_tensor(TARGETS[rows], dtype=torch.float32))
    result = metric.compute()  # only the rows added after the reset count
    for j in (0, 2):
        assert result[f"auroc/{NAMES[j]}"].item() == pytest.approx(pair_auroc(TARGETS[rows, j], PROBS[rows, j]))
    assert metric.skipped_labels() == ["Hernia"]


def test_update_rejects_bad_shapes_and_soft_targets_and_calls():
    metric = LabelMetrics(NAMES)
    with pytest.raises(DataError, match=r"shape \(batch, 3\)"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(DataError, match="targets have shape"):
        metric.update(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(DataError, match="must be 0 or 1"):
        metric.update(torch.zeros(2, 3), torch.full((2, 3), 0.9))
    with pytest.raises(TypeError, match=r"\.update\(logits, targets\)"):
        metric(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="duplicated"):
        LabelMetrics(["A", "A"])


def test_every_state_is_registered_with_a_distributed_reduction():
    metric = filled_metric()
    children = [*metric.collection.values(copy_state=False), *metric.calls.values(copy_state=False)]
    assert children and not metric._defaults  # the wrapper holds no state of its own
    for child in children:
        assert child._defaults, type(child).__name__
        for state in child._defaults:
            assert child._reductions[state] is not None, f"{type(child).__name__}.{state}"


def test_compute_syncs_states_across_ranks():
    # A fake 2-rank world where the other rank saw the same data: counts double, scores repeat,
    # so every metric must come out unchanged and the gather must actually have run.
    calls = []

    def gather_both_ranks(tensor, group=None):
        calls.append(tensor.shape)
        return [tensor, tensor.clone()]

    synced = filled_metric(dist_sync_fn=gather_both_ranks, distributed_available_fn=lambda: True)
    result = synced.compute()
    reference = filled_metric().compute()
    assert calls
    assert result.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(result[key], reference[key], equal_nan=True)


# ---------------------------------------------------------------- bootstrap


def synthetic(n_patients: int, images_per_patient: int, n_labels: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), images_per_patient)
    y = (rng.random((len(patients), n_labels)) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.2 * y - 0.5)))
    return y, np.round(p, 2), patients  # rounding creates ties


def test_bootstrap_estimate_is_the_metric_on_all_data_and_lies_in_its_interval():
    y, p, patients = synthetic(60, 3)
    ci = bootstrap_ci(y, p, patients, n_boot=200, label_names=["a", "b", "c"])
    assert list(ci.index) == ["a", "b", "c", "mean"]
    for j, name in enumerate("abc"):
        assert ci.loc[name, "estimate"] == pytest.approx(pair_auroc(y[:, j], p[:, j]))
        assert ci.loc[name, "n_pos"] == y[:, j].sum()
    assert ci.loc["mean", "estimate"] == pytest.approx(ci.loc[["a", "b", "c"], "estimate"].mean())
    assert ci.loc["mean", "n_pos"] == y.sum()
    assert ((ci["lower"] <= ci["estimate"]) & (ci["estimate"] <= ci["upper"])).all()
    assert (ci["n_resamples"] == 200).all() and (ci["n_skipped"] == 0).all()

    ap = bootstrap_ci(y, p, patients, metric="auprc", n_boot=20)
    for j in range(3):
        expected = binary_average_precision(torch.from_numpy(p[:, j]), torch.from_numpy(y[:, j]).long())
        assert ap["estimate"].iloc[j] == pytest.approx(float(expected), abs=1e-6)


def test_bootstrap_interval_narrows_as_sample_grows():
    widths = []
    for n_patients in (40, 640):
        y, p, patients = synthetic(n_patients, 2, seed=1)
        ci = bootstrap_ci(y, p, patients, n_boot=200)
        widths.append(ci.loc["mean", "upper"] - ci.loc["mean", "lower"])
    assert widths[1] < widths[0] / 2  # 16x the patients: about 4x narrower


def test_resamples_are_unions_of_whole_patients():
    k, n_patients = 4, 25
    patients = np.repeat(np.arange(n_patients) * 7 + 3, k)  # ids need not be 0..P-1
    rows_of = {pid: set(np.flatnonzero(patients == pid)) for pid in np.unique(patients)}
    resamples = _resample_indices(patients, n_boot=30, seed=5)
    assert len(resamples) == 30
    for rows in resamples:
        drawn = pd.Series(rows).groupby(patients[rows]).agg(list)
        for pid, patient_rows in drawn.items():
            times = len(patient_rows) // k
            assert len(patient_rows) == times * k  # a patient comes whole, once per draw
            assert pd.Series(patient_rows).value_counts().eq(times).all()
            assert set(patient_rows) == rows_of[pid]
        assert len(rows) == n_patients * k  # P draws of k images each


def test_bootstrap_matches_slow_index_based_reference_and_counts_skipped_resamples():
    y, p, patients = synthetic(30, 2, n_labels=2, seed=3)
    y[:, 1] = 0
    y[patients == 4, 1] = 1  # one positive patient: many resamples miss it
    n_boot, seed = 40, 11
    ci = bootstrap_ci(y, p, patients, n_boot=n_boot, seed=seed)
    reference = np.full((n_boot, 2), np.nan)
    for b, rows in enumerate(_resample_indices(patients, n_boot, seed)):
        for j in range(2):
            if 0 < y[rows, j].sum() < len(rows):
                reference[b, j] = float(binary_auroc(torch.from_numpy(p[rows, j]), torch.from_numpy(y[rows, j]).long()))
    skipped = np.isnan(reference[:, 1]).sum()
    assert 0 < skipped < n_boot
    assert ci.loc["label_1", "n_skipped"] == skipped
    assert ci.loc["label_1", "n_resamples"] == n_boot - skipped
    for j in range(2):
        valid = reference[~np.isnan(reference[:, j]), j]
        assert ci.iloc[j]["lower"] == pytest.approx(np.quantile(valid, 0.025), abs=1e-6)
        assert ci.iloc[j]["upper"] == pytest.approx(np.quantile(valid, 0.975), abs=1e-6)
    mean = np.nanmean(reference, axis=1)
    assert ci.loc["mean", "lower"] == pytest.approx(np.quantile(mean, 0.025), abs=1e-6)


def test_bootstrap_rejects_bad_input():
    y, p, patients = synthetic(10, 2)
    with pytest.raises(DataError, match="19 patient ids for 20 images"):
        bootstrap_ci(y, p, patients[:-1], n_boot=5)
    bad = p.copy()
    bad[3, 1] = 2.5
    with pytest.raises(DataError, match=r"row 3, label 'label_1'.*sigmoid"):
        bootstrap_ci(y, bad, patients, n_boot=5)
    soft = y.copy()
    soft[0, 0] = 0.5
    with pytest.raises(DataError, match="only 0/1"):
        bootstrap_ci(soft, p, patients, n_boot=5)
    with pytest.raises(ConfigError, match="metric must be"):
        bootstrap_ci(y, p, patients, metric="accuracy", n_boot=5)
    ids = patients.astype(object)
    ids[5] = None
    with pytest.raises(DataError, match="patient id missing"):
        bootstrap_ci(y, p, ids, n_boot=5)


def test_logged_f1_calls_a_probability_equal_to_the_threshold_positive_like_the_offline_metrics():
    # p = 0.5 exactly (logit 0): torchmetrics alone counts it negative (p > t); the rule is p >= t
    y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    p = np.array([[0.5, 0.5], [0.9, 0.5], [0.5, 0.2], [0.2, 0.5]])
    metric = LabelMetrics(["A", "B"], threshold=0.5)
    metric.update(logit(p), torch.as_tensor(y, dtype=torch.float32))
    offline = operating_point_metrics(y, p, [0.5, 0.5])["f1"].to_numpy()
    by_hand = [hand_f1(y[:, j], (p[:, j] >= 0.5).astype(int)) for j in range(2)]
    assert offline == pytest.approx(by_hand) and by_hand == pytest.approx([4 / 5, 2 / 5])
    assert metric.compute()["f1_macro"].item() == pytest.approx(np.mean(offline))


# ---------------------------------------------------------------- thresholds and operating points


def test_thresholds_on_an_obvious_case():
    y = np.array([[0], [0], [0], [1], [1]])
    p = np.array([[0.1], [0.2], [0.3], [0.8], [0.9]])
    for method in ("f1", "youden"):
        assert choose_thresholds(y, p, method=method).tolist() == [0.8]


def test_thresholds_reach_the_brute_force_optimum():
    rng = np.random.default_rng(2)
    y = (rng.random((200, 2)) < 0.3).astype(float)
    p = np.round(np.clip(0.3 * y + rng.random((200, 2)) * 0.7, 0, 1), 2)

    def f1_at(j, t):
        return hand_f1(y[:, j], (p[:, j] >= t).astype(int))

    def youden_at(j, t):
        called = p[:, j] >= t
        return called[y[:, j] == 1].mean() - called[y[:, j] == 0].mean()

    for method, score in (("f1", f1_at), ("youden", youden_at)):
        chosen = choose_thresholds(y, p, method=method)
        for j in range(2):
            best = max(score(j, t) for t in np.unique(p[:, j]))
            assert score(j, chosen[j]) == pytest.approx(best)


def exact_best_threshold(y: np.ndarray, p: np.ndarray, method: str) -> float:
    """The documented rule in exact rational arithmetic: best F1 / Youden J, highest cut on ties."""
    from fractions import Fraction

    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    best, best_cut = None, None
    for cut in sorted(set(p.tolist()), reverse=True):  # highest first, so the first maximum wins
        called = p >= cut
        tp, fp = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
        value = (
            Fraction(2 * tp, 2 * tp + fp + n_pos - tp) if method == "f1" else Fraction(tp, n_pos) - Fraction(fp, n_neg)
        )
        if best is None or value > best:
            best, best_cut = value, cut
    return best_cut


@pytest.mark.parametrize(
    "method, y, p",
    [
        # torchmetrics' float32 curves pick 0.03 here (F1 4/9) instead of 0.72 (F1 4/7)
        ("f1", [0, 0, 1, 1, 0, 0, 0, 1, 1, 0], [0.09, 0.72, 0.95, 0.72, 0.6, 0.28, 0.35, 0.03, 0.27, 0.59]),
        # J ties at 1/2 between 0.58 and 0.28; float32 rounding picked the lower 0.28
        ("youden", [1, 0, 0, 0, 1, 0, 0, 0], [0.28, 0.62, 0.43, 0.64, 0.58, 0.37, 0.48, 0.23]),
    ],
)
def test_ties_are_decided_exactly_for_the_highest_threshold(method, y, p):
    y, p = np.array(y, dtype=float), np.array(p)
    expected = exact_best_threshold(y, p, method)
    chosen = choose_thresholds(y[:, None], p[:, None], method=method)[0]
    assert chosen == expected and chosen in p
    assert chosen == (0.72 if method == "f1" else 0.58)  # the hand-checked answers of these cases


@pytest.mark.filterwarnings("ignore:.*no cut separates")
def test_thresholds_follow_the_exact_rule_on_many_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(5, 14))
        y = rng.integers(0, 2, n).astype(float)
        y[0], y[1] = 0.0, 1.0
        p = np.round(rng.random(n), 2)  # rounded: many ties
        for method in ("f1", "youden"):
            assert choose_thresholds(y[:, None], p[:, None], method=method)[0] == exact_best_threshold(y, p, method)


def test_no_useful_cut_gives_an_observed_score_and_a_warning():
    # every cut has J = 0 or less; torchmetrics' ROC returned its artificial 1.0 here
    y = np.array([[0], [0], [1], [1], [1], [0]])
    p = np.array([[0.94], [0.67], [0.14], [0.48], [0.83], [0.14]])
    with pytest.warns(UserWarning, match=r"no cut separates.*\['Mass'\]"):
        chosen = choose_thresholds(y, p, method="youden", label_names=["Mass"])
    assert chosen.tolist() == [0.83]  # J(0.83) = 1/3 - 1/3 = 0 = the best, highest such cut


def test_threshold_falls_back_for_a_label_without_positives():
    y = np.array([[0, 1], [0, 0], [0, 1]])
    p = np.array([[0.2, 0.9], [0.4, 0.1], [0.6, 0.7]])
    with pytest.warns(UserWarning, match=r"\['Hernia'\].*fallback 0.3"):
        thresholds = choose_thresholds(y, p, fallback=0.3, label_names=["Hernia", "Mass"])
    assert thresholds.tolist() == [0.3, 0.7]
    with pytest.raises(ConfigError, match="method must be"):
        choose_thresholds(y, p, method="accuracy")


def test_operating_point_metrics_by_hand():
    y = pd.DataFrame({"A": [1, 1, 1, 0, 0, 0, 0], "B": [0, 0, 0, 0, 0, 0, 0]})
    p = pd.DataFrame({"A": [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4], "B": [0.1] * 7})
    table = operating_point_metrics(y, p, [0.5, 0.5])
    a = table.loc["A"]  # called positive: 0.9, 0.6 (tp), 0.7 (fp); 0.2 missed
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(3 / 4)
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert (a["support"], a["n_neg"]) == (3, 4)
    b = table.loc["B"]  # no positives, no positive calls: undefined ratios are NaN, not 0
    assert math.isnan(b["sensitivity"]) and math.isnan(b["precision"]) and b["specificity"] == 1.0
    with pytest.raises(ConfigError, match="need 2 finite thresholds"):
        operating_point_metrics(y, p, [0.5])


# ---------------------------------------------------------------- calibration


def test_ece_is_zero_when_every_bin_is_calibrated():
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0] + [1, 1, 1, 0])
    assert expected_calibration_error(y[:, None], p[:, None], n_bins=10) == pytest.approx([0.0], abs=1e-9)


def test_ece_known_value_for_a_miscalibrated_case():
    # half the images at 0.9 with 60 % positives, half at 0.15 with 10 % positives:
    # ECE = 0.5 * |0.6 - 0.9| + 0.5 * |0.1 - 0.15| = 0.175
    p = np.array([0.9] * 10 + [0.15] * 10)
    y = np.array([1] * 6 + [0] * 4 + [1] + [0] * 9)
    assert expected_calibration_error(y[:, None], p[:, None], n_bins=10) == pytest.approx([0.175])


def test_reliability_curve_bins_and_agrees_with_ece():
    centers, accuracy, confidence, counts = reliability_curve(
        np.array([1, 0, 1, 1]), np.array([0.05, 0.15, 0.95, 1.0]), n_bins=4
    )
    np.testing.assert_allclose(centers, [0.125, 0.375, 0.625, 0.875])
    assert counts.tolist() == [2, 0, 0, 2]  # 1.0 belongs to the last bin
    np.testing.assert_allclose(accuracy[[0, 3]], [0.5, 1.0])
    np.testing.assert_allclose(confidence[[0, 3]], [0.1, 0.975])
    assert np.isnan(accuracy[1]) and np.isnan(confidence[2])

    rng = np.random.default_rng(4)
    p = rng.random((300, 2)) * 0.999
    y = (rng.random((300, 2)) < p**2).astype(float)
    ece = expected_calibration_error(y, p, n_bins=15)
    for j in range(2):
        _, acc, conf, cnt = reliability_curve(y[:, j], p[:, j], n_bins=15)
        filled = cnt > 0
        assert ece[j] == pytest.approx(np.sum(cnt[filled] / cnt.sum() * np.abs(acc[filled] - conf[filled])), abs=1e-6)
    with pytest.raises(DataError, match="1-D"):
        reliability_curve(y, p)


# ---------------------------------------------------------------- subgroups


def test_subgroup_auroc_per_group():
    # group "sep": perfectly separated on both labels -> AUROC 1 in every resample.
    # group "mix": label 0 positives 0.9/0.4 vs negatives 0.6/0.1 (0.75), label 1 all tied (0.5).
    sep_p = np.array([[0.9, 0.8], [0.8, 0.7], [0.2, 0.1], [0.1, 0.3]] * 3)
    sep_y = np.array([[1, 1], [1, 1], [0, 0], [0, 0]] * 3)
    mix_p = np.array([[0.9, 0.5], [0.4, 0.5], [0.6, 0.5], [0.1, 0.5]])
    mix_y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    y, p = np.vstack([sep_y, mix_y, [[1, 0]]]), np.vstack([sep_p, mix_p, [[0.5, 0.5]]])
    groups = pd.Series(["sep"] * 12 + ["mix"] * 4 + [None], name="view")
    patients = np.r_[np.repeat(np.arange(6), 2), np.arange(100, 104), 200]
    table = subgroup_auroc(y, p, groups, patients, n_boot=50, seed=0)
    assert list(table.index) == ["mix", "sep", "unknown"] and table.index.name == "view"
    sep = table.loc["sep"]
    assert (sep["auroc_mean"], sep["lower"], sep["upper"]) == (1.0, 1.0, 1.0)
    assert (sep["n_images"], sep["n_patients"], sep["n_labels"]) == (12, 6, 2)
    expected_mix = np.mean([pair_auroc(mix_y[:, j], mix_p[:, j]) for j in range(2)])
    assert expected_mix == pytest.approx(0.625)
    assert table.loc["mix", "auroc_mean"] == pytest.approx(expected_mix)
    assert table.loc["mix", "lower"] <= expected_mix <= table.loc["mix", "upper"]
    unknown = table.loc["unknown"]  # a single image: no AUROC defined, but the row is not dropped
    assert unknown["n_images"] == 1 and unknown["n_labels"] == 0 and math.isnan(unknown["auroc_mean"])


def test_age_bands():
    ages = pd.Series([5.0, 19.9, 20.0, 45.5, 79.0, 80.0, 99.0, np.nan], index=list("abcdefgh"))
    bands = age_bands(ages)
    assert bands.tolist() == ["0-19", "0-19", "20-39", "40-59", "60-79", "80+", "80+", "unknown"]
    assert list(bands.index) == list(ages.index)
    assert list(bands.cat.categories) == ["0-19", "20-39", "40-59", "60-79", "80+", "unknown"]
    with pytest.raises(DataError, match=r"first rows \['b'\]"):
        age_bands(pd.Series([30.0, -2.0], index=["a", "b"]))
    with pytest.raises(ConfigError, match="strictly increasing"):
        age_bands(ages, edges=(0, 40, 20))


def test_underdiagnosis_rates_on_a_constructed_case():
    from cxr_lightning.evaluation.statistics import underdiagnosis

    names = ["Mass", "Nodule", "No Finding"]
    # group F: 4 patients with Mass; 1 called No Finding, 2 Mass missed; 1 Nodule positive, missed
    # group M: 2 patients with Nodule, both found, none called No Finding; 1 healthy image
    y = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
    p = np.array(
        [
            [0.9, 0.1, 0.1],
            [0.2, 0.1, 0.7],
            [0.3, 0.2, 0.1],
            [0.8, 0.1, 0.2],
            [0.1, 0.6, 0.1],
            [0.1, 0.9, 0.2],
            [0.1, 0.1, 0.9],
        ]
    )
    sex = pd.Series(["F", "F", "F", "F", "M", "M", "M"])
    patients = np.array([1, 2, 3, 4, 5, 6, 7])
    table = underdiagnosis(y, p, [0.5, 0.5, 0.5], sex, patients, n_boot=200, label_names=names).set_index("group")
    f, m = table.loc["F"], table.loc["M"]
    assert (f["n_images"], f["n_with_finding"], m["n_with_finding"]) == (4, 4, 2)
    assert f["underdiagnosis"] == pytest.approx(1 / 4) and m["underdiagnosis"] == 0.0
    assert f["fnr.Mass"] == pytest.approx(2 / 4) and f["fnr.Nodule"] == 1.0
    assert m["fnr.Nodule"] == 0.0 and math.isnan(m["fnr.Mass"])  # no Mass in M: undefined, not 0
    assert (
        f["underdiagnosis_lower"] <= 0.25 <= f["underdiagnosis_upper"]
        and f["underdiagnosis_upper"] > f["underdiagnosis_lower"]
    )
    assert m["fnr.Nodule_lower"] == m["fnr.Nodule_upper"] == 0.0
    assert "fnr.No Finding" not in table.columns
