"""A password planted in a URL (ingest.source=s3://user:PASSWORD@bucket/prefix) reaches no sink.

Sinks checked: ``params check`` output, MLflow (run params, logged-model params, run and version tags, dataset
inputs and their rows, the SQLite file itself), Prefect (flow-run parameters read through the client, and the
harness database file), and, in the slow full run, logs, reports, manifests, dvc.lock and the published S3 objects.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from lesionflow.io.remote import redact_text, redact_tree
from lesionflow.params import (
    SECRET_OVERRIDES_ENV,
    load_params,
    restore_secret_overrides,
    split_secret_overrides,
)
from lesionflow.registry.publish import DatasetRef, RegistrationRequest, register_model
from lesionflow.registry.tracking import resolve_tracking_uri
from lesionflow.workspace import Workspace
from tests.helpers.moto_server import MotoS3
from tests.registry.conftest import PIP_REQUIREMENTS, digest, tiny_model

REPO = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("lesionflow"))
PASSWORD = "PlantedPassw0rdXYZ"
USER = "plantedUserQQ"
SOURCE = f"s3://{USER}:{PASSWORD}@scans/lung"


def _files_containing(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (gzip and SQLite pages read as bytes)."""
    import gzip

    hits = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        if path.suffix == ".gz":
            with contextlib.suppress(OSError):
                blob += gzip.decompress(blob)
        if needle.encode() in blob:
            hits.append(str(path))
    return hits


def test_one_redaction_rule_for_text_params_and_overrides() -> None:
    assert redact_text(f"ingest.source={SOURCE}") == "ingest.source=s3://scans/lung"
    assert redact_tree({"a": [SOURCE, 3], "b": (SOURCE,)}) == {"a": ["s3://scans/lung", 3], "b": ("s3://scans/lung",)}
    params = load_params(REPO / "params.yaml", [f"ingest.source={SOURCE}"])
    assert params.ingest.source == SOURCE  # the stage still gets what was given (S3 user info is ignored there)
    assert params.redacted_dump()["ingest"]["source"] == "s3://scans/lung"
    assert PASSWORD not in str(params.redacted_dump())
    salted = load_params(REPO / "params.yaml", [f"ingest.deid.salt={PASSWORD}"])
    assert salted.ingest.deid.salt == PASSWORD  # ingest still pseudonymizes with it
    assert salted.redacted_dump()["ingest"]["deid"]["salt"] == "<redacted>"
    assert PASSWORD not in str(salted.redacted_dump())
    overrides = [f"ingest.source={SOURCE}", "train.steps=3"]
    shown, secret = split_secret_overrides(overrides)
    assert shown == ["ingest.source=s3://scans/lung", "train.steps=3"]
    assert secret == [overrides[0]]
    import json

    assert restore_secret_overrides(shown, json.dumps(secret)) == overrides
    assert restore_secret_overrides(shown, None) == shown


def test_params_check_never_prints_the_password(workspace: Path) -> None:
    proc = subprocess.run(
        [
            EXE,
            "params",
            "check",
            "--set",
            f"ingest.source={SOURCE}",
            "--set",
            f"registry.tracking_uri=https://{USER}:{PASSWORD}@mlflow.example",
        ],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "s3://scans/lung" in proc.stdout
    assert PASSWORD not in proc.stdout + proc.stderr
    assert USER not in proc.stdout + proc.stderr


def test_mlflow_stores_no_url_credentials(tmp_path: Path) -> None:
    params = load_params(
        REPO / "params.yaml",
        [f"ingest.source={SOURCE}", f"registry.tracking_uri=https://{USER}:{PASSWORD}@mlflow.example"],
    )
    model_dir = tmp_path / "checkout" / "model"
    tiny_model(model_dir)
    uri = resolve_tracking_uri("", tmp_path / "ws")
    rows = [{"case_id": "case_000", "digest": digest("c0"), "source_uri": f"{SOURCE}/case_000.nii.gz"}]
    request = RegistrationRequest(
        tracking_uri=uri,
        experiment="secrets",
        model_name="secret-test",
        model_dir=model_dir,
        params=params.model_dump(mode="json"),  # a caller that forgot Params.redacted_dump(): still redacted
        metrics={"dice_mean": 0.5},
        datasets=[DatasetRef("raw", digest("raw"), SOURCE, "training", rows, {"source_uris": SOURCE})],
        tags={"lesionflow.workspace": str(tmp_path), "lesionflow.source": SOURCE},
        artifacts=[],
        promote_champion=False,
        pip_requirements=PIP_REQUIREMENTS,
    )
    result = register_model(request)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.params["ingest.source"] == "s3://scans/lung"
    assert run.data.params["registry.tracking_uri"] == "https://mlflow.example"
    shown = [str(run.data.params), str(run.data.tags)]
    for dataset_input in run.inputs.dataset_inputs:
        shown += [dataset_input.dataset.source, str([(t.key, t.value) for t in dataset_input.tags])]
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged
    shown += [str(m.params) + str(m.tags) for m in logged]
    version = client.get_model_version("secret-test", str(result.version))
    shown.append(str(version.tags))
    text = "\n".join(shown)
    assert "s3://scans/lung" in text
    assert PASSWORD not in text
    assert USER not in text
    # the SQLite file and every artifact (the dataset tables, the model): no byte sequence of the password
    assert _files_containing(tmp_path / "ws", PASSWORD) == []


@pytest.fixture(scope="module")
def harness() -> Iterator[Path]:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
        yield Path(url.split("///", 1)[-1]).parent


@flow
def _echo_source(workspace: str, overrides: list[str]) -> str:
    from lesionflow.flows.common import resolve_params

    return resolve_params(Workspace.at(workspace), "params.yaml", overrides, {}).ingest.source


def test_prefect_flow_run_parameters_hold_no_password(harness: Path, workspace: Path) -> None:
    from prefect.client.orchestration import get_client

    from lesionflow.cli import _prefect_flow_call

    params = load_params(workspace / "params.yaml")
    with _prefect_flow_call(params, [f"ingest.source={SOURCE}"], workspace) as given:
        state = _echo_source(str(workspace), given, return_state=True)  # type: ignore[call-overload]
    assert state.result() == SOURCE  # the flow itself got the original value
    assert SECRET_OVERRIDES_ENV not in os.environ  # handed over only for the call

    async def stored() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            return str(run.parameters)

    import asyncio

    parameters = asyncio.run(stored())
    assert "s3://scans/lung" in parameters
    assert PASSWORD not in parameters
    assert _files_containing(harness, PASSWORD) == []


@pytest.mark.slow
def test_a_full_run_with_team_storage_leaves_the_password_nowhere(moto_s3: MotoS3, tmp_path: Path) -> None:
    """`lesionflow run` from an s3:// source with a planted password, publishing to S3 storage: 0 hits in the
    console, the workspace (data, reports, manifests, mlruns/, the DVC repository, the Prefect database) and every
    S3 object."""
    from tests.helpers.volumes import write_msd
    from tests.test_dvc_consistency import init_dvc_workspace

    ws = init_dvc_workspace(tmp_path / "repo")
    client = moto_s3.client()
    for bucket in ("scans", "team"):
        client.create_bucket(Bucket=bucket)
    local = write_msd(tmp_path / "msd", n_train=3, n_test=1)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket="scans", Key=f"lung/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # this run's own Prefect database
    overrides = [f"ingest.source={SOURCE}", "storage.remote=s3://team/lesionflow", "preprocess.workers=1"]
    args = [EXE, "run", *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a --set run is not recorded in dvc.lock (it follows params.yaml; docs/decisions.md): dvc.lock, if any, and
    # every other file are searched below
    for text in (proc.stdout, proc.stderr):
        assert PASSWORD not in text
        assert USER not in text
    assert _files_containing(ws, PASSWORD) == []  # data, reports, manifests, dvc.lock, mlruns, .dvc cache
    assert _files_containing(tmp_path / "prefect-home", PASSWORD) == []
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="team") for o in
            page.get("Contents", [])]  # fmt: skip
    assert any(k.startswith("lesionflow/data/processed/store.zarr/") for k in keys)  # the stores were published
    leaked = [k for k in keys if PASSWORD.encode() in client.get_object(Bucket="team", Key=k)["Body"].read()]
    assert leaked == []
