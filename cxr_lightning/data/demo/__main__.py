"""``python -m cxr_lightning.data.demo --out DIR``: the command lives in the CLI layer (:func:`cxr_lightning.cli.demo_main`)."""
from cxr_lightning.cli import demo_main

if __name__ == "__main__":
    raise SystemExit(demo_main())
