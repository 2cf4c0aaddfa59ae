"""The pipeline stages, one module each; ``lesionflow.stages.registry`` lists them (``STAGES``).

This package imports nothing itself: a Dask worker that runs one stage's task (``preprocess.process_case``)
imports that stage's module alone, not every stage with torch, pandas and MLflow behind them (2.6 s and
hundreds of MB per fresh worker before this split).
"""
