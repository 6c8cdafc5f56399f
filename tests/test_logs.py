"""Logs a researcher can read in a file: one line per epoch whatever stdout is, progress lines for
long loops, and none of Lightning's known noise."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from cxr_lightning import progress
from cxr_lightning.progress import Progress, duration

EPOCH_LINE = re.compile(
    r"epoch (\d)/3  train loss \d+\.\d{3}  val loss \d+\.\d{3}  val AUROC \d\.\d{3} \(best \d\.\d{3} @\d\)  "
    r"\d+ s(  eta .+)?$"
)


@pytest.mark.slow
def test_training_with_stdout_to_a_file_logs_one_line_per_epoch_and_no_noise(tiny_demo, tmp_path):
    out = tmp_path / "run"
    log_file = tmp_path / "stdout.txt"
    cmd = [sys.executable, "-m", "cxr_lightning.train", "data=nih", f"data.root={tiny_demo}", "data.image_size=32",
           "data.batch_size=16", "data.num_workers=0", "backbone=tiny", "trainer.max_epochs=3",
           "trainer.limit_train_batches=1", "trainer.limit_val_batches=1.0", "test_after_fit=false",
           "callbacks.cam_grid=null", "callbacks.sample_images=null", f"hydra.run.dir={out}",
           f"paths.cache_dir={tmp_path}/cache"]
    with log_file.open("w") as stdout:
        done = subprocess.run(cmd, stdout=stdout, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    text = log_file.read_text()
    assert done.returncode == 0, text[-3000:]
    epochs = [m.group(1) for line in text.splitlines() if (m := EPOCH_LINE.search(line))]
    assert epochs == ["1", "2", "3"], text[-3000:]
    # the same lines in the run's own log
    assert len([line for line in (out / "train.log").read_text().splitlines() if EPOCH_LINE.search(line)]) == 3
    for noise in ("💡 Tip", "was configured so 100%", "FLOPs", "Flops", "━━"):  # the last: a progress bar's frame
        assert noise not in text, noise


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.4, 41, 82, 3600 + 5 * 60 + 9)] == ["0 s", "41 s", "1m22s", "1h05m"]


def test_progress_lines_are_throttled_and_end_with_a_summary(monkeypatch, caplog):
    clock = iter([0.0, 1.0, 11.0, 12.0, 25.0, 30.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        bar = Progress("demo images", 400, log, every=10.0, quiet_below=5.0)  # t=0
        for _ in range(4):
            bar.advance(100)  # t=1 (quiet), t=11 (a line), t=12 (quiet), t=25 (the last: no line)
        bar.done()  # t=30
    assert [r.getMessage() for r in caplog.records] == [
        "demo images: 200/400 (50%), 11 s, eta 11 s",
        "demo images: 400/400 (100%), 30 s",
    ]


def test_a_short_loop_stays_silent(monkeypatch, caplog):
    clock = iter([0.0, 0.5, 1.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO):
        bar = Progress("cache", 10, logging.getLogger("test.progress"))
        bar.advance(10)
        bar.done()
    assert not caplog.records


def test_the_frameworks_own_warnings_become_log_lines_of_their_module(caplog):
    import warnings
    from pathlib import Path

    import cxr_lightning
    from cxr_lightning.cli import log_own_warnings

    own = str(Path(cxr_lightning.__file__).parent / "tasks" / "predict.py")
    shown_by_python = []
    with warnings.catch_warnings():  # restores Python's showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, *rest: shown_by_python.append(
            (str(message), filename, lineno)
        )
        log_own_warnings()
        log_own_warnings()  # once only: a second call does not wrap the first
        with caplog.at_level(logging.WARNING):
            warnings.warn_explicit("no demographics file", UserWarning, own, 94)
            warnings.warn_explicit("a library's own", UserWarning, "/elsewhere/lib.py", 3)
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert records == [("cxr_lightning.tasks.predict", "WARNING", "no demographics file")]
    assert shown_by_python == [("a library's own", "/elsewhere/lib.py", 3)]
