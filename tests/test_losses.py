"""Losses: each against an independent numpy computation of its published formula."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from cxr_lightning.errors import ConfigError
from cxr_lightning.losses import LOSSES, create_loss

CONF_LOSS = Path(__file__).resolve().parents[1] / "conf" / "loss"

# Training-split counts of a 4-label toy problem, as CXRDataModule.label_stats reports them.
LABEL_STATS = pd.DataFrame(
    {"n_pos": [10, 250, 1, 500], "n_neg": [990, 750, 999, 500]},
    index=["Hernia", "Infiltration", "Rare", "Common"],
)
LABEL_STATS["pos_frac"] = LABEL_STATS.n_pos / (LABEL_STATS.n_pos + LABEL_STATS.n_neg)
LABEL_STATS["neg_frac"] = LABEL_STATS.n_neg / (LABEL_STATS.n_pos + LABEL_STATS.n_neg)
# The seed weighted each positive by the label's negative fraction and each negative by its positive fraction.
SEED_WEIGHTS = dict(pos_weight=LABEL_STATS.neg_frac.to_numpy(), neg_weight=LABEL_STATS.pos_frac.to_numpy())


def _data(batch: int = 16, seed: int = 0, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(batch, len(LABEL_STATS))).astype(np.float32)
    targets = (rng.random((batch, len(LABEL_STATS))) < 0.3).astype(np.float32)
    return logits, targets


def _loss(name: str, x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    module = create_loss(name, **SEED_WEIGHTS, **kwargs)
    return float(module(torch.from_numpy(x), torch.from_numpy(y)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def test_weighted_bce_matches_the_seed_formula():
    x, y = _data()
    p = _sigmoid(x)
    w_pos = LABEL_STATS.n_neg.to_numpy() / 1000.0
    w_neg = LABEL_STATS.n_pos.to_numpy() / 1000.0
    per_element = -(w_pos * y * np.log(p) + w_neg * (1 - y) * np.log(1 - p))
    expected = per_element.mean(axis=0).sum()
    assert _loss("weighted_bce", x, y) == pytest.approx(expected, rel=1e-5)


def test_weighted_bce_is_stable_for_saturated_logits():
    x = np.array([[80.0, -80.0, 80.0, -80.0]], dtype=np.float32)
    y = np.array([[0.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    # -log(1 - sigmoid(80)) = 80 + log(1 + e^-80) ~ 80; the correct predictions contribute ~e^-80.
    expected = LABEL_STATS.pos_frac.iloc[0] * 80 + LABEL_STATS.neg_frac.iloc[1] * 80
    assert _loss("weighted_bce", x, y) == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_weights_are_buffers_saved_with_the_model():
    loss = create_loss("weighted_bce", **SEED_WEIGHTS)
    state = loss.state_dict()
    np.testing.assert_allclose(state["pos_weight"].numpy(), LABEL_STATS.neg_frac, rtol=1e-6)
    np.testing.assert_allclose(state["neg_weight"].numpy(), LABEL_STATS.pos_frac, rtol=1e-6)
    assert loss.to(torch.float64).pos_weight.dtype == torch.float64  # moves with .to() like the model


def test_weighted_bce_config_errors():
    with pytest.raises(ConfigError, match=r"weighted_bce needs per-label pos_weight and neg_weight"):
        create_loss("weighted_bce")
    with pytest.raises(ConfigError, match=r"pos_weight has 3 labels but neg_weight 4"):
        create_loss("weighted_bce", pos_weight=[0.1, 0.2, 0.3], neg_weight=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ConfigError, match=r"finite and non-negative"):
        create_loss("weighted_bce", pos_weight=[0.1, -1.0], neg_weight=[0.1, 0.2])
    loss = create_loss("weighted_bce", **SEED_WEIGHTS)
    with pytest.raises(ConfigError, match=r"weights for 4 labels but the model outputs 3"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_bce_is_the_plain_mean():
    x, y = _data(seed=1)
    p = _sigmoid(x)
    expected = (-(y * np.log(p) + (1 - y) * np.log(1 - p))).mean()
    assert _loss("bce", x, y) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (1.0, 0.6)])
def test_focal_matches_lin_et_al(gamma, alpha):
    x, y = _data(batch=6, seed=2, scale=2.0)
    p = _sigmoid(x)
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha)
    expected = (-alpha_t * (1 - p_t) ** gamma * np.log(p_t)).mean()
    assert _loss("focal", x, y, gamma=gamma, alpha=alpha) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.2)])
def test_asl_matches_ridnik_et_al(gamma_neg, gamma_pos, clip):
    x, y = _data(batch=6, seed=3, scale=2.0)
    p = _sigmoid(x)
    p_shifted = np.maximum(p - clip, 0.0)  # probability shifting: easy negatives are discarded
    positive = (1 - p) ** gamma_pos * np.log(p)
    negative = p_shifted**gamma_neg * np.log(1 - p_shifted)
    expected = (-(y * positive + (1 - y) * negative)).mean()
    value = _loss("asl", x, y, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    assert value == pytest.approx(expected, rel=1e-5)


def test_asl_without_focusing_or_clipping_is_bce():
    x, y = _data(seed=4, scale=1.0)
    assert _loss("asl", x, y, gamma_neg=0.0, gamma_pos=0.0, clip=0.0) == pytest.approx(_loss("bce", x, y), rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_finite_with_gradients_at_extreme_logits(name):
    x = torch.tensor([[60.0, -60.0, 0.0, 15.0], [-60.0, 60.0, -15.0, 0.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    value = create_loss(name, **SEED_WEIGHTS)(x, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("yaml_path", sorted(CONF_LOSS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_loss_config_builds(yaml_path):
    cfg = OmegaConf.to_container(OmegaConf.load(yaml_path))
    assert cfg["name"] == yaml_path.stem
    # Every loss takes the box term's keys from one file; they are the model's (CXRClassifier), not
    # the criterion's, and box guidance is off by default.
    assert cfg.pop("defaults") == [{"box@_here_": "guidance"}, "_self_"]
    assert OmegaConf.load(CONF_LOSS / "box" / "guidance.yaml").box_weight == 0.0
    x, y = _data(seed=5)
    assert np.isfinite(_loss(cfg.pop("name"), x, y, **cfg))


def test_unknown_loss_or_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'dice' is unknown.*'asl', 'bce', 'focal', 'weighted_bce'"):
        create_loss("dice")
    with pytest.raises(ConfigError, match=r"'focal' has no parameter\(s\) \['gamma_neg'\].*'alpha', 'gamma'"):
        create_loss("focal", gamma_neg=2)
