"""The fast input pipeline (cache through the data module, device-side preprocessing, GPU options)
and the throughput benchmark's quick mode."""
from __future__ import annotations

import json
import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers import compose_config, tiny_overrides

from cxr_lightning.data import images
from cxr_lightning.data.cache import ImageCache, cache_root
from cxr_lightning.errors import ConfigError, DataError
from cxr_lightning.tasks import bench
from cxr_lightning.tasks.build import build_model, instantiate, use_channels_last

SIZE = 32  # the demo's PNGs are 64 px: every path really resizes


def _datamodule(root, out, cache: bool, *extra: str):
    cfg = compose_config(tiny_overrides(root, out) + [f"data.cache={cache}", f"data.image_size={SIZE}",
                                                      "data.batch_size=8", *extra])
    return instantiate(cfg.data, _convert_="all")


def _batches(dm) -> list[dict]:
    return list(dm.loader("train", shuffle=False))


# -- the cache through the data module -------------------------------------------------------------
def test_cache_gives_the_same_batches_as_decoding_with_no_decoding_at_all(tiny_demo, tmp_path, monkeypatch):
    png = _datamodule(tiny_demo, tmp_path, False)
    png.prepare_data()
    png.setup()
    expected = _batches(png)

    cached = _datamodule(tiny_demo, tmp_path, True, "data.num_workers=2")
    cached.prepare_data()  # builds the cache (decoding every PNG once)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a PNG although the cache holds the image")

    # Pixels must now come from the memory map only, in the main process and in the workers (forked).
    monkeypatch.setattr(images, "read_image", no_decoding)
    monkeypatch.setattr(images, "load_resized", no_decoding)
    got = _batches(cached)
    assert len(got) == len(expected) > 1
    for a, b in zip(got, expected):
        assert a["image"].dtype == torch.uint8 and a["image"].shape[1:] == (1, SIZE, SIZE)
        for key in ("image", "meta", "labels", "index"):
            assert torch.equal(a[key], b[key]), key
        # And the same network input after the device-side step (no trainer: normalisation only).
        assert torch.equal(
            cached.on_after_batch_transfer(dict(a), 0)["image"], png.on_after_batch_transfer(dict(b), 0)["image"]
        )


def test_workers_receive_no_pixels(tiny_demo, tmp_path):
    dm = _datamodule(tiny_demo, tmp_path, True)
    dm.prepare_data()
    dataset = dm.dataset("train")
    assert isinstance(dataset.cache._open(), np.memmap)
    # What a worker gets is names, labels and metadata: smaller than its split's pixels alone.
    assert len(pickle.dumps(dataset)) < len(dataset) * SIZE * SIZE


def test_cache_is_built_by_prepare_data_and_only_opened_by_other_ranks(tiny_demo, tmp_path, monkeypatch):
    rank0 = _datamodule(tiny_demo, tmp_path, True)
    rank0.setup()
    with pytest.raises(DataError, match=r"No complete image cache.*prepare_data\(\)"):
        rank0.dataset("train")  # setup() alone never builds
    rank0.prepare_data()
    built = rank0.image_cache
    assert built.directory == cache_root(tmp_path / "cache", tiny_demo) / f"{SIZE}px"
    assert len(built) == sum(len(rank0.split_table(s)) for s in ("train", "val", "test"))

    def no_build(*args, **kwargs):
        raise AssertionError("a second process rebuilt the cache")

    monkeypatch.setattr(ImageCache, "_build", classmethod(no_build))
    rank1 = _datamodule(tiny_demo, tmp_path, True)
    rank1.setup()  # what a DDP rank that skipped prepare_data does
    assert rank1.dataset("val").cache.directory == built.directory
    rank0.prepare_data()  # Lightning calls it again for trainer.test: nothing to do


def test_stale_cache_is_refused_then_rebuilt(tiny_demo, tmp_path, caplog):
    root = tmp_path / "nih"
    shutil.copytree(tiny_demo, root)
    dm = _datamodule(root, tmp_path, True)
    dm.prepare_data()
    old = dm.image_cache.fingerprint

    table = root / "Data_Entry_2017_v2020.csv"
    header, first, *rest = table.read_text().splitlines(keepends=True)
    fields = first.split(",")
    fields[1] = "Hernia"  # relabel one image
    table.write_text(header + ",".join(fields) + "".join(rest))

    again = _datamodule(root, tmp_path, True)
    again.setup()
    with pytest.raises(DataError, match="stale"):
        again.dataset("train")
    with caplog.at_level(logging.WARNING, logger="cxr_lightning.data.cache"):
        again.prepare_data()
    assert "label table changed" in caplog.text
    assert again.image_cache.fingerprint != old
    assert len(again.dataset("train")) == len(dm.dataset("train"))


# -- model options -----------------------------------------------------------------------------------
def test_channels_last_follows_the_trainer_unless_set(tiny_demo, tmp_path, monkeypatch):
    base = tiny_overrides(tiny_demo, tmp_path)
    assert use_channels_last(compose_config(base)) is False  # trainer=cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = compose_config(base + ["trainer=gpu"])
    assert gpu.trainer.precision == "bf16-mixed" and gpu.trainer.benchmark is True
    assert use_channels_last(gpu) is True
    assert use_channels_last(compose_config(base + ["trainer=gpu", "channels_last=false"])) is False
    assert use_channels_last(compose_config(base + ["channels_last=true"])) is True
    with pytest.raises(ConfigError, match="channels_last='sometimes'"):
        use_channels_last(compose_config(base + ["channels_last=sometimes"]))


def test_channels_last_and_compile_keep_the_outputs_and_the_checkpoint_keys(tiny_demo, tmp_path, monkeypatch):
    base = tiny_overrides(tiny_demo, tmp_path) + [f"data.image_size={SIZE}"]
    dm = _datamodule(tiny_demo, tmp_path, False)
    dm.setup()
    torch.manual_seed(0)
    plain = build_model(compose_config(base + ["channels_last=false"]), dm).eval()

    compiled_calls = []
    real_compile = torch.compile

    def eager_compile(fn, *args, **kwargs):
        compiled_calls.append(fn)  # no C++ toolchain needed: dynamo's eager backend
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    fast = build_model(compose_config(base + ["channels_last=true", "compile=true"]), dm).eval()
    assert fast.hparams.channels_last is True
    assert compiled_calls and compiled_calls[0].__self__ is fast.backbone
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    fast.load_state_dict(plain.state_dict())
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)

    x, meta = torch.rand(2, 1, SIZE, SIZE), torch.rand(2, dm.meta_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, meta), plain(x, meta), rtol=1e-4, atol=1e-5)


# -- the benchmark -----------------------------------------------------------------------------------
def test_comparison_hours_adds_train_val_and_test_passes():
    est = {"train_val_images": 1000, "val_fraction": 0.2, "epochs": 2, "test_images": 400}
    # 2 epochs x (800 train / 100 + 200 val / 400) + 400 test / 400 = 18 s
    assert bench.comparison_hours(100.0, 400.0, est) == pytest.approx(18 / 3600)


def test_estimate_caps_png_by_its_loader():
    def fig(feed, stage, ips):
        return bench.StepFigure("resnet50", 224, 64, "bf16+CL", feed, stage, 64_000 / ips, ips, 0.0)

    figures = [fig("synthetic", "train", 1000.0), fig("cache", "train", 900.0), fig("cache", "eval", 3000.0)]
    est = {"train_val_images": 1000, "val_fraction": 0.1, "epochs": 1, "test_images": 100}
    png = {"image_size": 224, "source": "png", "workers": 8}
    slow = [{**png, "images_per_second": 50.0}, {**png, "workers": 0, "images_per_second": 1.0}]
    (row,) = bench.estimate_rows(figures, slow, est, workers=8)
    assert row["backbone"] == "resnet50" and row["mode"] == "bf16+CL"
    assert row["hours_cache"] == pytest.approx((900 / 900 + 100 / 3000 + 100 / 3000) / 3600)
    assert row["hours_png"] == pytest.approx((900 / 50 + 100 / 50 + 100 / 50) / 3600)
    # A PNG loader faster than the model leaves training at the measured speed; eval is capped.
    (row,) = bench.estimate_rows(figures, [{**png, "images_per_second": 2000.0}], est, workers=8)
    assert row["hours_png"] == pytest.approx((900 / 900 + 100 / 2000 + 100 / 2000) / 3600)
    (row,) = bench.estimate_rows(figures, [], est, workers=8)
    assert row["hours_png"] is None


@pytest.mark.slow
def test_quick_bench_prints_tables_and_writes_bench_json(tmp_path, capsys):
    cfg = compose_config(
        ["bench.quick=true", "bench.backbones=[tiny]", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/c"],
        config_name="bench",
    )
    returned = bench.run_bench(cfg)
    out = capsys.readouterr().out
    for title in ("Machine:", "Loader:", "Steps on cpu", "indicative only", "Estimated comparison"):
        assert title in out, title
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["device"] == "cpu" and written["quick"] is True and written["machine"]["cores"] >= 1

    loader = {(r["source"], r["workers"]): r for r in written["loader"]}
    assert set(loader) == {("png", 0), ("cache", 0)}
    assert all(r["image_size"] == 64 and r["images_per_second"] > 0 for r in loader.values())

    figures = written["train"]["figures"]
    assert [(f["feed"], f["stage"]) for f in figures] == [("synthetic", "train"), ("cache", "train"), ("cache", "eval")]
    for f in figures:
        assert f["backbone"] == "test_resnet" and f["batch_size"] == 2 and f["peak_memory_mib"] > 0
        assert f["images_per_second"] == pytest.approx(1000 * f["batch_size"] / f["step_ms"])

    (row,) = written["estimate"]["backbones"]
    train_ips, eval_ips = figures[1]["images_per_second"], figures[2]["images_per_second"]
    seconds = 5 * (86524 * 0.9 / train_ips + 86524 * 0.1 / eval_ips) + 25596 / eval_ips
    assert row["hours_cache"] == pytest.approx(seconds / 3600)
    assert written["estimate"]["total_hours_cache"] == pytest.approx(row["hours_cache"])


def test_bad_bench_options_are_config_errors(tmp_path):
    def bench_cfg(*overrides):
        return compose_config([*overrides, f"paths.output_dir={tmp_path}"], config_name="bench")

    with pytest.raises(ConfigError, match=r"\['resnet5'\] unknown; choose among .*resnet50"):
        bench.run_bench(bench_cfg("bench.backbones=[resnet5]"))
    with pytest.raises(ConfigError, match=r"bench\.train\.cpu: .*at least 1"):
        bench.run_bench(bench_cfg("bench.train.cpu.warmup=0"))
