"""``lesionflow serve`` for real: Prefect server + process work pool + infra/prefect.yaml + worker, no mocks.

Two serves start together at module set-up: one on SQLite (shared by the tests, stopped by the SIGTERM test) and
one on a throwaway PostgreSQL (initdb + pg_ctl). Every process binds 127.0.0.1 on a free port and is stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import asyncpg
import httpx
import psutil
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import PrefectHTTPStatusError

from tests.flows.serve_helpers import (
    REPO,
    Served,
    alive,
    descendants,
    make_workspace,
    postgres_bin,
    running_postgres,
    start_serve,
)

pytestmark = pytest.mark.slow

TIMEZONE = "Europe/Berlin"  # not the default (UTC): the schedule must take the workspace's params value
ENTRYPOINTS = {
    spec["name"]: spec["entrypoint"]
    for spec in yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]
}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str | None]:
    """A throwaway PostgreSQL for the module (None without PostgreSQL binaries); stopped after the serves."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        yield None
        return
    with running_postgres(bin_dir) as url:
        yield url


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str | None
) -> Iterator[dict[str, tuple[Served, Path]]]:
    """Both serves (SQLite and, when possible, PostgreSQL) start at once: their start-ups overlap on two cores."""
    root = tmp_path_factory.mktemp("serve")
    ws = make_workspace(root / "sqlite", TIMEZONE)
    started = {"sqlite": (start_serve(ws, root), ws)}
    if postgres_url is not None:
        pg_ws = make_workspace(root / "postgresql", "UTC")
        started["postgresql"] = (start_serve(pg_ws, root, "--database-url", postgres_url), pg_ws)
    try:
        yield started
    finally:
        for service, _ in started.values():
            service.stop()


@pytest.fixture(scope="module")
def served(services: dict[str, tuple[Served, Path]]) -> tuple[Served, Path]:
    service, ws = services["sqlite"]
    service.wait_ready()
    return service, ws


def deployments_by_name(client: SyncPrefectClient) -> dict[str, DeploymentResponse]:
    return {d.name: d for d in client.read_deployments()}


def wait_final(client: SyncPrefectClient, run_id: UUID, timeout_s: float = 120.0) -> FlowRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s} s: {run.state}")


def test_serve_deploys_the_five_deployments_with_the_params_timezone(served: tuple[Served, Path]) -> None:
    service, ws = served
    assert set(ENTRYPOINTS) == {"nightly-retrain", "ingest", "synthesize", "progression", "utility-study"}
    with service.client() as client:
        found = deployments_by_name(client)
        assert {name: found[name].entrypoint for name in ENTRYPOINTS if name in found} == ENTRYPOINTS, service.text()
        for deployment in found.values():
            assert deployment.work_pool_name == "lesionflow-local"
            assert deployment.parameters["workspace"] == str(ws)
            assert deployment.pull_steps == [  # flow runs start in the workspace, where the project files are
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ws)}}
            ]
        (schedule,) = found["nightly-retrain"].schedules
        assert schedule.active
        assert isinstance(schedule.schedule, CronSchedule)
        assert schedule.schedule.cron == "0 2 * * *"
        assert schedule.schedule.timezone == TIMEZONE
        pool = client.read_work_pool("lesionflow-local")
        assert pool.type == "process"
    assert "Prefect UI: http://127.0.0.1:" in service.text()


def test_ingest_deployment_runs_with_a_changed_parameter(served: tuple[Served, Path]) -> None:
    service, ws = served
    with service.client() as client:
        deployment = deployments_by_name(client)["ingest"]
        # params.yaml says ingest.source=data/demo, which does not exist: the run succeeds only with the change
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"ingest": {"source": "data/mine"}})
        assert run.parameters["workspace"] == str(ws)  # the deployment's default, kept
        final = wait_final(client, run.id)
        assert final.state is not None
        assert final.state.is_completed(), final.state.message
    manifest = (ws / "data" / "raw" / "manifest.csv").read_text()
    assert [row.split(",")[0] for row in manifest.splitlines()[1:]] == ["case_000", "case_001"]
    # issue 19 item 5: the gate report link of the run's artifact opens in a browser (http, served by serve)
    with service.client() as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    links = {a.key: a.data for a in found if a.key}
    expected = f"http://127.0.0.1:{service.reports_port}/quality/raw/index.html"
    assert links["validate-raw-report"] == f"[validate-raw report]({expected})", links
    page = httpx.get(expected, timeout=10)
    assert page.status_code == 200
    assert "lesionflow raw quality gate" in page.text


def test_invalid_parameters_are_rejected_with_the_validation_message(served: tuple[Served, Path]) -> None:
    service, _ = served
    with service.client() as client:
        deployment = deployments_by_name(client)["ingest"]
        # A wrong type never becomes a run: the deployment enforces the flow's parameter schema (the UI's form too).
        with pytest.raises(PrefectHTTPStatusError) as rejected:
            client.create_flow_run_from_deployment(deployment.id, parameters={"workspace": 123})
        detail = rejected.value.response.json()["detail"]
        assert "Validation failed for field 'workspace'" in detail
        assert "123 is not of type 'string'" in detail
        # A well-typed value that params.yaml's model rejects: the run fails before any stage, with the one line
        started = time.monotonic()
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"overrides": ["ingest.test_fraction=1.5"]}
        )
        final = wait_final(client, run.id, timeout_s=60)
        assert final.state is not None
        assert final.state.is_failed()
        message = str(final.state.message)
        assert "params: 'ingest.test_fraction' = 1.5 is invalid: Input should be less than 1" in message
        assert time.monotonic() - started < 90  # worker pick-up + process start only (~10 s idle); no stage ran
        assert not [t for t in client.read_task_runs() if t.flow_run_id == run.id]


# What the worker logs once it has reaped a flow-run process that was killed (Prefect 3.8).
WORKER_REAPED = "prefect.flow_runs.worker - Check whether the flow run exceeded its memory allocation"


def _flow_run_process(service: Served, run_id: UUID, timeout_s: float = 60.0) -> psutil.Process:
    """The process the worker started for flow run ``run_id`` (Prefect hands it the id in its environment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in descendants(service.proc.pid):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.environ().get("PREFECT__FLOW_RUN_ID") == str(run_id):
                    return proc
        time.sleep(0.2)
    raise AssertionError(f"no process runs flow run {run_id}:\n{service.text()[-2000:]}")


def test_a_killed_run_is_retried_with_prefect_flow_run_retry_and_resumes(served: tuple[Served, Path]) -> None:
    """The flow-run process dies after ingest, while its dvc commit waits for DVC's lock.

    `prefect flow-run retry` reruns it on the worker: ingest is not redone, the dvc commit it owed is made,
    validate-raw runs, and dvc status is clean.
    """
    import zc.lockfile

    from tests.helpers.volumes import add_msd_entry, sphere_case

    service, ws = served
    # params.yaml itself points at the data, so the run's params are the workspace's and dvc.lock records the run
    params = ws / "params.yaml"
    params.write_text(params.read_text().replace("  source: data/demo ", "  source: data/mine ", 1))
    image, label = sphere_case(7)
    # a new case: work for ingest
    add_msd_entry(ws / "data" / "mine", "case_new", image.array, label.array, affine=image.affine)
    ingest_record = ws / "reports" / "ingest" / "stage.json"
    before = ingest_record.read_text() if ingest_record.exists() else ""
    gate_record = ws / "reports" / "validate-raw" / "stage.json"
    gate_before = gate_record.read_text() if gate_record.exists() else ""
    dvc_lock = zc.lockfile.LockFile(str(ws / ".dvc" / "tmp" / "lock"))  # a `dvc` command of someone else's
    try:
        with service.client() as client:
            deployment = deployments_by_name(client)["ingest"]
            run = client.create_flow_run_from_deployment(deployment.id)
            process = _flow_run_process(service, run.id)
            deadline = time.monotonic() + 120
            while not (ingest_record.exists() and ingest_record.read_text() != before):
                assert time.monotonic() < deadline, service.text()[-2000:]
                time.sleep(0.1)
            time.sleep(0.5)  # the flow is now in its dvc-commit task, retrying while the lock is taken
            reaped = service.text().count(WORKER_REAPED)
            process.kill()
            # Two parts of Prefect report the death: the process runner at once, the worker once it has reaped the
            # job. A retry between the two would be overwritten by the worker's report: wait for the worker's line.
            deadline = time.monotonic() + 60
            while service.text().count(WORKER_REAPED) == reaped:
                assert time.monotonic() < deadline, service.text()[-2000:]
                time.sleep(0.2)
            time.sleep(1.0)  # its state proposal follows the log line
            crashed = client.read_flow_run(run.id)
            assert crashed.state is not None
            assert crashed.state.is_crashed(), crashed.state
    finally:
        dvc_lock.close()
    assert (gate_record.read_text() if gate_record.exists() else "") == gate_before  # it died before the gate
    ingested = ingest_record.read_text()
    manifest_mtime = (ws / "data" / "raw" / "manifest.csv").stat().st_mtime_ns

    env = {**os.environ, "PREFECT_API_URL": service.api_url}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", str(run.id)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with service.client() as client:
        final = wait_final(client, run.id)
        assert final.state is not None
        assert final.state.is_completed(), final.state.message
        assert final.run_count == 2
    assert ingest_record.read_text() == ingested  # ingest was not redone...
    assert (ws / "data" / "raw" / "manifest.csv").stat().st_mtime_ns == manifest_mtime
    assert "case_new" in (ws / "data" / "raw" / "manifest.csv").read_text()
    assert json.loads((ws / "reports" / "validate-raw" / "summary.json").read_text())["success"] is True
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, capture_output=True, text=True, check=True)
    for target in ("data.dvc:", "ingest:", "validate-raw:"):  # ...and the dvc commit it owed was made on the retry
        assert target not in status.stdout, status.stdout


def test_sigterm_stops_worker_and_server_and_leaves_no_process(served: tuple[Served, Path]) -> None:
    service, _ = served
    children = descendants(service.proc.pid)
    assert len(children) >= 2, children  # the server and the worker at least
    code = service.stop()
    assert code == 0, service.text()
    assert [pid for pid in children if alive(pid)] == []
    assert "stopping the worker, then the server" in service.text()
    assert service.text().rstrip().endswith("stopped")


def test_serve_on_postgresql(services: dict[str, tuple[Served, Path]], postgres_url: str | None) -> None:
    if postgres_url is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/15/bin")
    service, ws = services["postgresql"]
    service.wait_ready()
    with service.client() as client:
        names = {d.name: str(d.id) for d in client.read_deployments()}
    assert set(names) == set(ENTRYPOINTS)
    assert "database postgresql+asyncpg://postgres@127.0.0.1:" in service.text()  # serve names the dialect it used
    assert not (ws / ".prefect" / "prefect.db").exists()  # nothing went to the default SQLite file

    dsn = postgres_url.replace("+asyncpg", "")  # asyncpg itself takes the plain postgresql:// form

    async def stored() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        rows = await conn.fetch("SELECT name, id::text FROM deployment")
        await conn.close()
        return {row["name"]: row["id"] for row in rows}

    assert asyncio.run(stored()) == names  # the API's deployments are the rows in PostgreSQL
    assert service.stop() == 0, service.text()


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (ws / "infra").mkdir()
    (ws / "infra" / "prefect.yaml").write_text((REPO / "infra" / "prefect.yaml").read_text())  # serve deploys it
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "lesionflow.cli", "serve", "-w", str(ws), "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0]
    assert "--port" in lines[0]
    assert not (ws / ".prefect" / "prefect.db").exists()
