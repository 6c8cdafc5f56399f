"""Compare the runs of a sweep: ``python -m cxr_lightning.compare SWEEP_DIR [--by KEYS] [--out DIR]``
(:func:`cxr_lightning.tasks.compare.write_comparison`)."""
from cxr_lightning.cli import compare_main

if __name__ == "__main__":
    compare_main()
