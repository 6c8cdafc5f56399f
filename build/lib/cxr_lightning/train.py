"""Train, test and save a model: ``python -m cxr_lightning.train [group=option ...]``.

Example: ``python -m cxr_lightning.train backbone=efficientnet_b3 head=fusion_residual``; the task is
:func:`cxr_lightning.tasks.train.train`."""
from cxr_lightning.cli import train_main

if __name__ == "__main__":
    train_main()
