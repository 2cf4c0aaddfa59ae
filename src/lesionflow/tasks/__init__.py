"""Prefect task adapters: each wraps a stage function from the registry and holds no domain logic."""
