"""Write the synthetic demo dataset: ``python -m cxr_lightning.demo --out DIR``
(:func:`cxr_lightning.cli.demo_main`)."""
from cxr_lightning.cli import demo_main

if __name__ == "__main__":
    raise SystemExit(demo_main())
