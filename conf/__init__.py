"""Hydra configs shipped as package data: ``pkg://cxr_lightning.conf``."""
