"""Data layer: NIH files -> tables -> torch dataset -> batches."""
