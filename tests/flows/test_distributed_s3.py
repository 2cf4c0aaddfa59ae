"""Scale-out on real engines: the pipeline flow on a `dask scheduler` + two `dask worker` processes with the team
storage on a moto S3 server (Zarr stores, DVC remote, Prefect results, MLflow artifacts), `dvc repro --force` parity
from a clean clone, and resume after an S3 error injected mid-run.

One module-scoped run on the cluster feeds the checks; the resume test runs its own workspace on the same engines.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from prefect.testing.utilities import prefect_test_harness

from lesionflow.catalog.artifacts import Dvc
from lesionflow.flows.pipeline import training_pipeline
from lesionflow.hashing import sha256_tree
from lesionflow.io.publish import StorageError, StorageUnavailable, publish_tree
from lesionflow.params import StorageParams
from lesionflow.registry.lineage import read_lineage
from lesionflow.registry.tracking import resolve_tracking_uri
from lesionflow.stages.registry import STAGES
from lesionflow.store.zarr_store import ARRAY_PATHS, list_cases
from tests.helpers.dask_cluster import DaskCluster, dask_cluster
from tests.helpers.moto_server import REGION, _free_port, _post
from tests.test_dvc_consistency import _run, init_dvc_workspace

pytestmark = pytest.mark.slow

BUCKET = "team"
FRESH = {"skip_instance_cache": True, "use_listings_cache": False}  # no fsspec instance or listing cache
UP_TO_TRAIN = list(STAGES)[: list(STAGES).index("train") + 1]


@dataclass(frozen=True)
class TeamRun:
    ws: Path
    remote: str
    cluster: DaskCluster
    endpoint: str
    results: list[dict[str, Any]]


@pytest.fixture(scope="module")
def aws_env(moto_s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """AWS_* of this module pointing at the moto server (boto3, s3fs, dvc-s3 and MLflow all read them)."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(var, raising=False)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": moto_s3_server,
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
            "AWS_CONFIG_FILE": str(home / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1",
        }
        for var, value in env.items():
            mp.setenv(var, value)
        _post(moto_s3_server + "/moto-api/reset")
        _s3().create_bucket(Bucket=BUCKET)
        yield moto_s3_server


def _s3(**kwargs: Any) -> Any:
    import boto3

    return boto3.client("s3", region_name=REGION, **kwargs)


def _keys(prefix: str) -> list[str]:
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    with dask_cluster(tmp_path_factory.mktemp("dask")) as running:
        yield running


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _team_workspace(ws: Path, cluster: DaskCluster, remote: str) -> Path:
    """A git + DVC workspace whose params.yaml points at the running cluster and the team storage."""
    init_dvc_workspace(ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["preprocess"]["scheduler_address"] = cluster.address
    params["synth"]["scheduler_address"] = cluster.address
    params["storage"] = {"remote": remote, "retries": 1, "retry_delay_s": 0.5}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


@pytest.fixture(scope="module")
def team_run(aws_env: str, cluster: DaskCluster, harness: None, tmp_path_factory: pytest.TempPathFactory) -> TeamRun:
    remote = f"s3://{BUCKET}/ws"
    ws = _team_workspace(tmp_path_factory.mktemp("team") / "ws", cluster, remote)
    results = training_pipeline(workspace=str(ws))
    return TeamRun(ws, remote, cluster, aws_env, results)


def test_pipeline_runs_on_the_dask_cluster_with_its_storage_on_s3(team_run: TeamRun) -> None:
    from distributed import Client

    ws, results = team_run.ws, team_run.results
    assert [r["stage"] for r in results] == list(STAGES)
    assert all(r["ok"] for r in results)
    # the volumes were processed and the lesions synthesized by the external workers
    with Client(team_run.cluster.address, timeout="10s") as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        assert len(client.scheduler_info()["workers"]) == 2
    assert any(p.startswith("preprocess") for p in prefixes), prefixes
    assert any(p.startswith("synthesize") for p in prefixes), prefixes

    # Zarr stores: readable from S3, same cases, same bytes, same geometry as the workspace's
    for rel in ("data/processed/store.zarr", "data/synthetic/store.zarr"):
        url = f"{team_run.remote}/{rel}"
        group = zarr.open_group(url, mode="r", storage_options=FRESH)
        local = ws / rel
        assert sorted(group.group_keys()) == sorted(["OME", *list_cases(local)])
        assert group["OME"].attrs["ome"]["series"] == list_cases(local)  # the NGFF collection listing travels too
        case = list_cases(local)[0]
        local_group = zarr.open_group(str(local), mode="r")
        level0 = ARRAY_PATHS["image"]
        np.testing.assert_array_equal(group[case][level0][:], local_group[case][level0][:])
        assert group[case].attrs["affine"] == local_group[case].attrs["affine"]
        index = json.loads(_s3().get_object(Bucket=BUCKET, Key=f"ws/{rel}.publish.json")["Body"].read())
        assert index["digest"] == sha256_tree(local)

    # MLflow artifacts: the registered model's weights live under <remote>/mlflow
    assert any(k.endswith("model.safetensors") for k in _keys("ws/mlflow/"))
    lineage = read_lineage("lesionflow-seg/1", resolve_tracking_uri("", ws))
    assert lineage.tags["lesionflow.prefect_flow_run_id"] not in ("", "none")

    # DVC: everything recorded is in the S3 remote; dvc status is clean after the flow
    assert _keys("ws/dvc/files/md5/")
    status = _run([sys.executable, "-m", "dvc", "status", "--cloud", "--remote", "lesionflow-storage"], ws)
    assert "are in sync" in status.stdout, status.stdout
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], ws).stdout


def _locked_md5s(lock: dict[str, Any], stage: str) -> dict[str, str]:
    """path -> md5 of the stage's cached outputs (DVC's digests; reports rebuilt each run are not compared)."""
    spec = STAGES[stage]
    return {o["path"]: o["md5"] for o in lock["stages"][stage].get("outs", []) if o["path"] in (*spec.outs(Dvc.OUT),
            *spec.outs(Dvc.PERSIST))}  # fmt: skip


def test_dvc_repro_force_in_a_clean_clone_reproduces_every_stage_up_to_training(
    team_run: TeamRun, tmp_path: Path
) -> None:
    ws = team_run.ws
    _run(["git", "add", "-A"], ws)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "flow run"], ws)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(ws), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()
    # the data version comes from the team's DVC remote on S3; the ingest source is the same data
    _run([sys.executable, "-m", "dvc", "remote", "add", "--local", "team", f"{team_run.remote}/dvc"], clone)
    _run([sys.executable, "-m", "dvc", "pull", "--remote", "team"], clone)
    assert sha256_tree(clone / "data" / "processed" / "store.zarr") == sha256_tree(ws / "data/processed/store.zarr")
    shutil.copytree(ws / "data" / "demo", clone / "data" / "demo")
    _run([sys.executable, "-m", "dvc", "repro", "--force", "train"], clone)

    flow_lock = yaml.safe_load((ws / "dvc.lock").read_text())
    repro_lock = yaml.safe_load((clone / "dvc.lock").read_text())
    compared = 0
    for stage in UP_TO_TRAIN:
        flow_md5s = _locked_md5s(flow_lock, stage)
        assert flow_md5s == _locked_md5s(repro_lock, stage), stage
        compared += len(flow_md5s)
    assert compared >= 8  # plans, store, metadata, rois, generators, synthetic stores, segmenter...
    assert yaml.safe_load((clone / "data.dvc").read_text()) == yaml.safe_load((ws / "data.dvc").read_text())
    # training on CPU is bit-reproducible: the model files themselves agree
    for rel in ("models/segmenter/model.safetensors", "models/segmenter/config.json"):
        assert (clone / rel).read_bytes() == (ws / rel).read_bytes(), rel


def _deny_data_writes(endpoint: str, prefix: str) -> tuple[str, str]:
    """A moto IAM user that may do anything on S3 except write under ``prefix/data/``; returns its keys."""
    import boto3

    iam = boto3.client("iam", region_name=REGION)
    iam.create_user(UserName="pipeline")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{BUCKET}/{prefix}/data/*"},
        ],
    }
    iam.put_user_policy(UserName="pipeline", PolicyName="no-data", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_a_run_failed_by_an_s3_error_resumes_without_redoing_stages(
    team_run: TeamRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = f"s3://{BUCKET}/resume"
    ws = _team_workspace(tmp_path / "ws", team_run.cluster, remote)
    key_id, secret = _deny_data_writes(team_run.endpoint, "resume")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    _post(team_run.endpoint + "/moto-api/reset-auth", b"0")  # from now on moto enforces IAM policies
    try:
        with pytest.raises(StorageError) as failed:
            training_pipeline(workspace=str(ws))
    finally:
        _post(team_run.endpoint + "/moto-api/reset-auth", b"inf")  # the "fix": the policy no longer applies
    message = str(failed.value)
    assert "\n" not in message
    assert f"{remote}/data/processed/store.zarr" in message
    assert "access denied" in message
    done = [s for s in STAGES if (ws / "reports" / s / "stage.json").exists()]
    assert done == ["ingest", "validate-raw", "plan", "preprocess"]  # it stopped in the middle, at the S3 edge

    results = training_pipeline(workspace=str(ws))  # the rerun
    cached = {r["stage"]: r["cached"] for r in results}
    assert all(cached[s] for s in done)  # completed stages are not redone
    assert not any(cached[s] for s in STAGES if s not in done and s not in ("validate-metrics", "register"))
    # ...and it ends where an uninterrupted run ends: same digests as the team run's
    for rel in ("data/processed/store.zarr", "data/synthetic/store.zarr", "models/generators", "data/rois"):
        assert sha256_tree(ws / rel) == sha256_tree(team_run.ws / rel), rel
    for rel in ("data/processed/plans.json", "models/segmenter/model.safetensors", "data/raw/manifest.csv"):
        assert (ws / rel).read_bytes() == (team_run.ws / rel).read_bytes(), rel
    # Prefect keeps the stage results on S3, under the stages' content keys: the resumed stages were served by key
    stored = {key.rsplit("/", 1)[1] for key in _keys("resume/prefect-results/")}
    for stage in done:
        assert json.loads((ws / "reports" / stage / "stage.json").read_text())["key"] in stored, stage
    record = json.loads(
        _s3().get_object(Bucket=BUCKET, Key=f"resume/prefect-results/{sorted(stored)[0]}")["Body"].read()
    )
    assert set(record) >= {"metadata", "result"}
    index = json.loads(_s3().get_object(Bucket=BUCKET, Key="resume/data/processed/store.zarr.publish.json")
                       ["Body"].read())  # fmt: skip
    assert index["digest"] == sha256_tree(ws / "data" / "processed" / "store.zarr")


def test_unreachable_storage_is_retried_then_named(
    aws_env: str, harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    from lesionflow.tasks.storage import publish_stage_stores, with_retries

    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    (tmp_path / "data" / "processed" / "store.zarr").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "store.zarr" / "zarr.json").write_text("{}")
    storage = StorageParams(remote="s3://team/x", retries=2, retry_delay_s=0.05)

    @flow
    def publish_once() -> tuple[BaseException, Any]:
        task = with_retries(publish_stage_stores, storage)
        state = task("preprocess", str(tmp_path), storage.remote, ["data/processed/store.zarr"], return_state=True)
        assert state.is_failed()
        return state.result(raise_on_failure=False), state.state_details.task_run_id

    error, task_run_id = publish_once()
    assert isinstance(error, StorageUnavailable)
    assert dead in str(error)
    assert "\n" not in str(error)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_run_id).run_count == 3  # the first try and the two configured retries
    with pytest.raises(StorageUnavailable):  # the same error outside Prefect: the retries were Prefect's
        publish_tree(tmp_path / "data" / "processed" / "store.zarr", "s3://team/x/store.zarr")
