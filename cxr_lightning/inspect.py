"""Look at a dataset before training on it: ``python -m cxr_lightning.inspect data=<source> data.root=DIR``
(:func:`cxr_lightning.tasks.inspect.inspect`): label tables only, a per-split table and inspect.json."""

from cxr_lightning.cli import inspect_main

if __name__ == "__main__":
    inspect_main()
