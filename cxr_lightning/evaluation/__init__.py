"""Evaluation of a trained checkpoint: :mod:`.statistics` (bootstrap, thresholds, calibration,
subgroups), :mod:`.report` (tables and figures) and :mod:`.html` (the browser pages). The evaluate
command is the task :mod:`cxr_lightning.tasks.evaluate`."""
