# The lesionflow runtime: the pinned stack (requirements/) for the Prefect worker, the deploy step and Dask
# workers. The code itself is bind-mounted at /repo by infra/compose.yaml; this image only installs it editable.
#   docker build -f infra/worker.Dockerfile -t lesionflow-runtime .
#   GPU nodes: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (and run with --gpus all)
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true

# git: register records the commit of the checkout as lineage.
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
RUN git config --system --add safe.directory /repo

WORKDIR /repo
COPY requirements/ requirements/
RUN pip install --no-cache-dir -U pip \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && pip install --no-cache-dir -c requirements/constraints.txt -r requirements/requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements/no-deps.txt

COPY pyproject.toml README.md ./
COPY src/ src/
COPY flows/ flows/
COPY tasks/ tasks/
RUN pip install --no-cache-dir --no-deps -e .
