"""Head-then-backbone fine-tuning: a frozen backbone is the same network in training and evaluation,
and a run continued from a checkpoint before, at or after the unfreeze epoch trains (or holds) the
backbone exactly as the uninterrupted run does."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_config, tiny_overrides

from cxr_lightning.checkpoints import AtomicCheckpointIO
from cxr_lightning.models.finetune import FinetuneSchedule
from cxr_lightning.tasks.build import build_datamodule, build_model

UNFREEZE, EPOCHS, LR, SCALE = 2, 4, 1e-3, 0.1


def config(root, out, *extra: str):
    return compose_config(
        tiny_overrides(root, out)
        + [f"trainer.max_epochs={EPOCHS}", f"optimizer.lr={LR}", f"backbone.finetune_lr_scale={SCALE}", *extra]
    )


@pytest.mark.parametrize("backbone", ["tiny", "mobilenetv2_100"])
@pytest.mark.parametrize("unfreeze", ["null", "2"])
def test_a_frozen_backbone_gives_the_same_features_in_train_and_eval_mode(tiny_demo, tmp_path, backbone, unfreeze):
    cfg = config(
        tiny_demo, tmp_path, f"backbone={backbone}", "backbone.freeze=true", f"backbone.unfreeze_at_epoch={unfreeze}"
    )
    model = build_model(cfg)
    image = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.eval()
    with torch.no_grad():
        evaluated = model.backbone(image)
    model.train()  # what Lightning and users call
    with torch.no_grad():
        trained = model.backbone(image)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
    assert all(torch.equal(v, stats[k]) for k, v in model.backbone.state_dict().items())  # running stats kept
    assert not any(m.training for m in model.backbone.modules()) and model.head.training


def test_an_unfrozen_backbone_in_train_mode_uses_batch_statistics(tiny_demo, tmp_path):
    # The control for the test above: without the freeze, BatchNorm makes the two modes differ.
    model = build_model(config(tiny_demo, tmp_path)).train()
    image = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.backbone(image)
        evaluated = model.eval().backbone(image)
    assert not torch.allclose(trained, evaluated)


class Recorder(pl.Callback):
    """Per epoch: the optimizer's groups and rates, the backbone's flags and mode at the first batch,
    and how far the backbone's weights and BatchNorm statistics moved during the epoch."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}
        self._start: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = {k: v.detach().clone().float() for k, v in pl_module.backbone.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        optimizer = trainer.optimizers[0]
        self.epochs[trainer.current_epoch] = {
            "groups": [(g["name"], len(g["params"]), g["lr"]) for g in optimizer.param_groups],
            "requires_grad": [p.requires_grad for p in pl_module.parameters()],
            "backbone_training": pl_module.backbone.training,
        }

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = pl_module.backbone.state_dict()
        moved = sum(float((now[k].float() - v).abs().sum()) for k, v in self._start.items())
        self.epochs[trainer.current_epoch]["backbone_moved"] = moved > 0


def fit(cfg, max_epochs: int, ckpt_in=None, ckpt_out=None) -> Recorder:
    pl.seed_everything(0)
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[recorder], plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(build_model(cfg), datamodule=build_datamodule(cfg), ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return recorder


@pytest.fixture(scope="module")
def staged(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    cfg = config(tiny_demo, out, "backbone.freeze=true", f"backbone.unfreeze_at_epoch={UNFREEZE}", "scheduler=cosine")
    return cfg, out, fit(cfg, EPOCHS).epochs


@pytest.mark.slow
def test_the_uninterrupted_run_holds_then_trains_the_backbone_at_its_scaled_rate(staged):
    cfg, _, epochs = staged
    cosine = [0.5 * (1 + math.cos(math.pi * e / EPOCHS)) for e in range(EPOCHS)]  # CosineAnnealingLR, T_max=4
    for epoch, seen in epochs.items():
        by_owner = {name.split(".")[0]: (name, n, lr) for name, n, lr in seen["groups"]}
        assert len(by_owner) == len(seen["groups"]) == 2
        (head, n_head, head_lr), (trunk, n_trunk, trunk_lr) = by_owner["head"], by_owner["backbone"]
        assert (head, trunk) == ("head.all", "backbone.all") and n_head > 0 and n_trunk > 0
        assert all(seen["requires_grad"])  # DDP's parameter set never changes
        assert head_lr == pytest.approx(LR * cosine[epoch])
        frozen = epoch < UNFREEZE
        assert trunk_lr == pytest.approx(0.0 if frozen else LR * SCALE * cosine[epoch]), epoch
        assert seen["backbone_training"] is not frozen
        assert seen["backbone_moved"] is not frozen, epoch  # weights and BatchNorm statistics


@pytest.mark.slow
@pytest.mark.parametrize("stop", [1, UNFREEZE, 3], ids=["before", "at", "after"])
def test_a_continued_run_matches_the_uninterrupted_one(staged, stop):
    cfg, out, uninterrupted = staged
    ckpt = out / f"stopped_after_{stop}.ckpt"
    fit(cfg, stop, ckpt_out=ckpt)
    continued = fit(cfg, EPOCHS, ckpt_in=ckpt).epochs
    assert sorted(continued) == list(range(stop, EPOCHS))
    for epoch, seen in continued.items():
        expected = uninterrupted[epoch]
        assert [g[:2] for g in seen["groups"]] == [g[:2] for g in expected["groups"]]
        assert [g[2] for g in seen["groups"]] == pytest.approx([g[2] for g in expected["groups"]]), epoch
        assert seen["requires_grad"] == expected["requires_grad"]
        assert seen["backbone_training"] == expected["backbone_training"]
        assert seen["backbone_moved"] == expected["backbone_moved"], epoch


def test_schedule_is_a_function_of_the_epoch():
    staged = FinetuneSchedule(freeze=True, unfreeze_at_epoch=3)
    assert [staged.frozen(e) for e in range(5)] == [True, True, True, False, False]
    assert [staged.hold({"name": "backbone.all"}, e) for e in (2, 3)] == [0.0, 1.0]
    assert staged.hold({"name": "head.all"}, 0) == 1.0
    assert FinetuneSchedule(freeze=True).frozen(100) and not FinetuneSchedule().frozen(0)
