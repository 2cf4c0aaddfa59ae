"""Prefect flows: the pipeline DAG and its entry points (adapters only, no domain logic)."""
