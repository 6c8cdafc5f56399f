"""cxr-lightning: PyTorch Lightning + Hydra framework for multi-label chest X-ray classification.

Three floors: :mod:`cxr_lightning.cli` (the commands) over the tasks (:mod:`cxr_lightning.tasks`,
:mod:`cxr_lightning.evaluation.job`, :mod:`cxr_lightning.explain.job`) over the library (data,
models, losses, metrics, checkpoints, inference, evaluation statistics, explain). See
docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
