"""Linear probe of a frozen backbone: ``python -m cxr_lightning.probe [backbone=NAME ...]``
(:func:`cxr_lightning.tasks.probe.probe`)."""
from cxr_lightning.cli import probe_main

if __name__ == "__main__":
    probe_main()
