"""The pipeline flow on a real Prefect harness: stages run as tasks, dvc.lock records them, cache hits by content."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from lesionflow.flows.pipeline import training_pipeline
from lesionflow.params import load_params
from lesionflow.registry.lineage import read_lineage
from lesionflow.registry.tracking import resolve_tracking_uri
from lesionflow.stages.registry import STAGES
from lesionflow.tasks.stages import run_stage
from tests.helpers.volumes import write_msd
from tests.test_dvc_consistency import dvc_workspace  # noqa: F401 - fixture


@pytest.fixture(scope="module", autouse=True)
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_pipeline_flow_runs_stages_and_records_them_in_dvc(dvc_workspace: Path) -> None:  # noqa: F811
    ws = dvc_workspace
    results = training_pipeline(workspace=str(ws))
    assert [r["stage"] for r in results] == list(STAGES)
    assert all(r["ok"] for r in results)
    by_stage = {r["stage"]: r["summary"] for r in results}
    assert by_stage["preprocess"]["n_processed"] == 4
    assert by_stage["train"]["steps_done"] == 6
    assert by_stage["ingest"]["n_stored"] == 4
    assert by_stage["synthesize"]["n_samples"] == by_stage["validate-synthetic"]["n_accepted"] >= 1
    assert json.loads((ws / "reports" / "validate-raw" / "summary.json").read_text())["success"] is True
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout  # the flow committed data.dvc and both stages
    lock = (ws / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"{stage}:" in lock
    # the registered model knows the Prefect flow run that produced it
    register = results[-1]["summary"]
    assert register["version"] == 1
    lineage = read_lineage("lesionflow-seg/1", resolve_tracking_uri("", ws))
    assert lineage.tags["lesionflow.prefect_flow_run_id"] not in ("", "none")
    assert lineage.tags["lesionflow.dvc_lock_sha256"] != "none"
    again = training_pipeline(workspace=str(ws))  # a second run does no stage work
    registry_stages = {"validate-metrics", "register"}  # they read the registry on every run
    assert all(r["cached"] for r in again if r["stage"] not in registry_stages), [
        r["stage"] for r in again if not r["cached"]
    ]
    assert again[-1]["summary"]["version"] == 1  # nothing new to register
    assert again[-1]["summary"]["reused_existing_version"] is True
    # dvc repro agrees with what the flow recorded: nothing to reproduce
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, capture_output=True, text=True, check=True)
    assert "Running stage" not in repro.stdout, repro.stdout


def test_stage_task_cache_hits_on_same_content(workspace: Path, tmp_path: Path) -> None:
    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)
    params = load_params(workspace / "params.yaml")

    @flow
    def twice() -> list[str]:
        states = [run_stage("ingest", str(workspace), params, return_state=True) for _ in range(3)]
        return [s.name for s in states]

    names = twice()
    # run 1 computes; run 2 sees its outputs (a new key) and computes again at no cost; run 3 hits
    assert names == ["Completed", "Completed", "Cached"]
    assert (workspace / "data" / "raw" / "manifest.csv").exists()

    # another workspace with the same bytes must compute: its outputs do not exist yet
    other = tmp_path / "other"
    shutil.copytree(workspace, other, ignore=shutil.ignore_patterns("raw", "reports", "quarantine"))

    @flow
    def elsewhere() -> str:
        return run_stage("ingest", str(other), params, return_state=True).name

    assert elsewhere() == "Completed"
    assert (other / "data" / "raw" / "manifest.csv").exists()


def test_recreated_workspace_at_the_same_path_is_not_served_from_the_cache(workspace: Path) -> None:
    """Delete a workspace and build it again at the same path: the stage must run, not come from Prefect's cache."""
    params = load_params(workspace / "params.yaml")

    @flow
    def ingest_three_times() -> list[str]:
        return [run_stage("ingest", str(workspace), params, return_state=True).name for _ in range(3)]

    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)
    assert ingest_three_times() == ["Completed", "Completed", "Cached"]
    params_text = (workspace / "params.yaml").read_text()
    shutil.rmtree(workspace)
    workspace.mkdir()
    (workspace / "params.yaml").write_text(params_text)
    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)

    @flow
    def ingest_once() -> str:
        return str(run_stage("ingest", str(workspace), params, return_state=True).name)

    assert ingest_once() == "Completed"
    assert len(list((workspace / "data" / "raw" / "cases").iterdir())) == 2


def test_one_dask_cluster_serves_every_dask_stage_of_a_run(workspace: Path) -> None:
    """Stages without a scheduler of their own submit to the run's cluster; it goes away with the run."""
    import os

    from lesionflow.flows.common import shared_dask_cluster
    from lesionflow.parallel import RUN_SCHEDULER_ENV, dask_client
    from lesionflow.workspace import Workspace

    ws = Workspace.at(workspace)
    params = load_params(ws.params_file, ["preprocess.workers=1", "synth.workers=1"])
    environ = dict(os.environ)
    with shared_dask_cluster(ws, params, ["preprocess", "synthesize"]):
        address = os.environ[RUN_SCHEDULER_ENV]
        for _ in range(2):  # as preprocess, then synthesize, would
            with dask_client(params.preprocess.workers, params.preprocess.memory_limit) as client:
                assert client.scheduler.address == address
                assert len(client.scheduler_info()["workers"]) == 1
    assert dict(os.environ) == environ  # the workers' thread settings did not leak into this process
    # a stage that names its own scheduler, or a run without Dask stages, starts nothing
    with shared_dask_cluster(ws, params, ["ingest", "train"]):
        assert RUN_SCHEDULER_ENV not in os.environ
    own = load_params(ws.params_file, ["preprocess.scheduler_address=tcp://127.0.0.1:1"])
    with shared_dask_cluster(ws, own, ["preprocess"]):
        assert RUN_SCHEDULER_ENV not in os.environ
