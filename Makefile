# Two commands on a fresh machine:  make run   (demo end to end)   and   make test   (the suite).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQS := requirements/requirements.txt requirements/constraints.txt requirements/no-deps.txt pyproject.toml

# Telemetry off, nothing fetched at run time (see ../shared/reference/stack.md): exactly
# lesionflow.quiet_env.QUIET_ENV (tests/test_quiet_env.py checks it). PYTHONDONTWRITEBYTECODE is not telemetry.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DVC_STUDIO_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help setup run test test-quick lint format clean-workspace

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): $(REQS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0          # CPU wheel on disk; install first (stack.md)
	$(PY) -m pip install -q -c requirements/constraints.txt -r requirements/requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the pinned stack

run: setup  ## build the demo data and run the pipeline end to end through the Prefect flow
	$(BIN)/lesionflow demo-data
	$(BIN)/lesionflow run

# Two worker processes (pytest-xdist), a test file per worker at a time, one torch/BLAS thread each: two torch
# processes that each spin on every core ran 15x slower here.
PYTEST_PARALLEL = -n 2 --dist loadfile

test: setup  ## run the test suite (2 worker processes)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q $(PYTEST_PARALLEL)

test-quick: setup  ## the suite without the tests marked slow (servers, browser, cluster, full pipelines)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q $(PYTEST_PARALLEL) -m "not slow"

lint: setup  ## ruff (lint + format check), mypy, the import layers (import-linter) and dvc.yaml = the declarations
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/lesionflow dvc-yaml --check

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-workspace:  ## delete the demo workspace outputs (data/, reports/) — not the venv
	rm -rf data reports
