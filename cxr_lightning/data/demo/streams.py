"""The demo's random streams: every draw is keyed by ``(seed, stream, ...)``, so that no stream
shifts or repeats another and each image's randomness depends on that image alone."""
from __future__ import annotations

import numpy as np

# The numbers are part of the output: renumbering a stream changes every file drawn from it.
TABLE, SPLIT, BOXES, ANATOMY, VISIT, GRAIN, SHADING, LUNG_TEXTURE, PLACE, JITTER, SIGN_TEXTURE = range(11)


def rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))
