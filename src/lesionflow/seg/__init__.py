"""Segmentation: patch pipeline, networks, training, inference and metrics (pure or near-pure; no Prefect)."""
