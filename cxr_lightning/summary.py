"""Print a run's headline figures: ``python -m cxr_lightning.summary RUN_DIR``."""
from cxr_lightning.cli import summary_main

if __name__ == "__main__":
    raise SystemExit(summary_main())
