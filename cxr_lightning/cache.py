"""Build the image cache of a data config: ``python -m cxr_lightning.cache data=... [workers=N]``
(:func:`cxr_lightning.tasks.cache.build_cache`)."""
from cxr_lightning.cli import cache_main

if __name__ == "__main__":
    cache_main()
