"""``python -m cxr_lightning.explain ckpt_path=PATH|run_dir=DIR [split=test n=16 | images=[...]] [key=value ...]``
(:func:`cxr_lightning.tasks.explain.explain`)."""
from cxr_lightning.cli import explain_main

if __name__ == "__main__":
    explain_main()
