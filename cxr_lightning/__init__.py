"""cxr-lightning: PyTorch Lightning + Hydra framework for multi-label chest X-ray classification.

Three floors: :mod:`cxr_lightning.cli` (the commands, reached by ``cxr-<command>`` and ``python -m
cxr_lightning.<command>``) over the tasks (:mod:`cxr_lightning.tasks`) over the library (data,
models, losses, metrics, checkpoints, run_dir, inference, evaluation, explain). See
docs/architecture.md.
"""

__version__ = "0.1.0"
