"""Evaluate a checkpoint: ``python -m cxr_lightning.evaluate ckpt_path=PATH | run_dir=DIR``
(:func:`cxr_lightning.tasks.evaluate.evaluate`)."""
from cxr_lightning.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
