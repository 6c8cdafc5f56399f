"""cxr-lightning: PyTorch Lightning + Hydra framework for multi-label chest X-ray classification."""

__version__ = "0.1.0"
