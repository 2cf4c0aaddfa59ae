"""infra/ holds configuration only: each file parses, and names the services and settings the docs rely on."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lesionflow.params import Params

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_compose_file_defines_the_team_server() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "mlflow", "minio", "minio-init", "deploy"} <= set(services)
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:3.8.8")
    worker = services["worker"]
    assert worker["command"][:4] == ["prefect", "worker", "start", "--pool"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "prefect.yaml" in " ".join(services["deploy"]["command"])
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow
    assert "--artifacts-destination s3://" in mlflow
    assert set(compose["volumes"]) >= {"postgres-data", "minio-data"}
    # every file the compose file mounts or builds from exists
    assert (INFRA / "postgres" / "init.sql").is_file()
    assert (INFRA / services["worker"]["build"]["dockerfile"].removeprefix("infra/")).is_file()
    # every ${VAR} the compose file reads is documented in .env.example (or has a default there)
    text = (INFRA / "compose.yaml").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", (INFRA / ".env.example").read_text(), re.M))
    assert {m for m in re.findall(r"\$\{([A-Z_]+)", text)} <= documented


def test_dask_kubernetes_spec_is_a_dask_cluster_resource() -> None:
    docs = list(yaml.safe_load_all((INFRA / "dask" / "kubernetes.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "DaskCluster")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["spec"]["worker"]["replicas"] >= 1
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][0] == "dask-worker"
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    scheduler = cluster["spec"]["scheduler"]
    assert scheduler["spec"]["containers"][0]["args"] == ["dask-scheduler"]
    assert {p["port"] for p in scheduler["service"]["ports"]} == {8786, 8787}
    autoscaler = next(d for d in docs if d["kind"] == "DaskAutoscaler")
    assert autoscaler["spec"]["cluster"] == cluster["metadata"]["name"]


def test_dask_slurm_config_is_a_jobqueue_config() -> None:
    slurm = yaml.safe_load((INFRA / "dask" / "slurm.yaml").read_text())["jobqueue"]["slurm"]
    assert slurm["cores"] == slurm["processes"]  # single-threaded workers, as the stages expect
    for key in ("memory", "walltime", "queue", "job-extra-directives", "job-script-prologue"):
        assert key in slurm
    # the deprecated pre-0.8 names would be ignored by (or warn in) current dask-jobqueue
    assert not {"extra", "env-extra", "job-extra"} & set(slurm)


def test_docs_name_params_keys_that_exist() -> None:
    text = "\n".join(
        (INFRA / name).read_text() for name in ("README.md", "gpu.md", "dask/kubernetes.yaml", "dask/slurm.yaml")
    )
    fields = Params.model_fields
    named = set(re.findall(r"\b(preprocess|synth|train|evaluate|registry|ingest)\.([a-z_]+)\b(?![.\w])", text))
    # Without this the loop below checks nothing when the docs stop naming params keys (or the pattern rots).
    assert named, "infra docs name no section.key params (e.g. train.device); the pattern or the docs changed"
    for section, key in named:
        assert key in type(getattr(Params(), section)).model_fields, f"{section}.{key}"
        assert section in fields
