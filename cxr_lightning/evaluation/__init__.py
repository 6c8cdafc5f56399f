"""Evaluation of a trained checkpoint: :mod:`.statistics` (bootstrap, thresholds, calibration,
subgroups), :mod:`.report` (tables and figures) and :mod:`.job` (``python -m cxr_lightning.evaluate``)."""
