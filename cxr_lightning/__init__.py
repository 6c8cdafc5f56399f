"""cxr-lightning: PyTorch Lightning + Hydra framework for multi-label chest X-ray classification."""

__version__ = "0.1.0"

import warnings

# Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates, once per batch: noise
# that users cannot act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
