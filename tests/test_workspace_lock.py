"""The workspace lock across real processes: refuse or wait, timeouts, a killed holder, and two real flow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from lesionflow.workspace_lock import WorkspaceLocked, lock_path, read_holder, workspace_lock
from tests.helpers.volumes import write_msd

REPO = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "lesionflow")

HOLDER = """
import sys, time
from pathlib import Path
from lesionflow.workspace_lock import workspace_lock
ws, held, release = sys.argv[1:4]
with workspace_lock(ws, purpose="holder process"):
    Path(held).write_text("1")
    while not Path(release).exists():
        time.sleep(0.02)
"""

CONTENDER = """
import json, os, sys
from lesionflow.workspace_lock import WorkspaceLocked, lock_path, read_holder, workspace_lock
ws, wait, timeout = sys.argv[1], sys.argv[2] == "wait", float(sys.argv[3])
try:
    with workspace_lock(ws, wait=wait, timeout_s=timeout, purpose="contender"):
        print(json.dumps({"acquired": True, "recorded_pid": read_holder(lock_path(ws)).pid, "pid": os.getpid()}))
except WorkspaceLocked as error:
    print(error, file=sys.stderr)
    sys.exit(2)
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture
def holder(workspace: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process holding the workspace lock until ``release`` exists; yields (process, release file)."""
    held, release = tmp_path / "held", tmp_path / "release"
    proc = _python(HOLDER, str(workspace), str(held), str(release))
    deadline = time.monotonic() + 30
    while not held.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.02)
    yield proc, release
    release.touch()
    if proc.poll() is None:
        proc.wait(timeout=30)


def test_second_process_refuses_naming_the_holder_and_the_fix(
    workspace: Path, holder: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, _ = holder
    out, err = _python(CONTENDER, str(workspace), "no-wait", "0").communicate(timeout=30)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert f"pid {proc.pid}" in lines[0]
    assert "holder process" in lines[0]
    assert str(lock_path(workspace)) in lines[0]
    assert "--wait-lock" in lines[0]
    assert out == ""


def test_waiting_process_proceeds_when_the_holder_finishes(
    workspace: Path, holder: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, release = holder
    waiter = _python(CONTENDER, str(workspace), "wait", "30")
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting while the holder runs
    release.touch()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    got = json.loads(out)
    assert got["acquired"] is True
    assert got["recorded_pid"] == got["pid"] != proc.pid  # the waiter recorded itself as the holder
    assert proc.wait(timeout=10) == 0


def test_wait_gives_up_after_the_timeout(workspace: Path, holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, _ = holder
    start = time.monotonic()
    with (
        pytest.raises(WorkspaceLocked, match=rf"pid {proc.pid} .* after waiting \d+ s"),
        workspace_lock(workspace, wait=True, timeout_s=0.6, poll_s=0.05),
    ):
        pass
    assert 0.5 < time.monotonic() - start < 10


def test_a_killed_holder_leaves_no_stale_lock(workspace: Path, tmp_path: Path) -> None:
    held = tmp_path / "held"
    proc = _python(HOLDER, str(workspace), str(held), str(tmp_path / "never"))
    while not held.exists():
        assert proc.poll() is None
        time.sleep(0.02)
    holder_record = read_holder(lock_path(workspace))
    assert holder_record is not None
    assert holder_record.pid == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with workspace_lock(workspace, wait=False) as me:  # the kernel released it with the process
        assert me.pid == os.getpid()
        assert read_holder(lock_path(workspace)) == me
    assert read_holder(lock_path(workspace)) is None  # emptied on release, the file itself stays
    assert lock_path(workspace).exists()
    assert (lock_path(workspace).parent / ".gitignore").read_text().splitlines()[-1] == "*"


def test_a_second_lock_in_the_same_process_is_refused(workspace: Path) -> None:
    """flock belongs to open files: a flow called inside another flow would wait for its caller, so none do."""
    with (
        workspace_lock(workspace, purpose="outer"),
        pytest.raises(WorkspaceLocked, match="outer"),
        workspace_lock(workspace, wait=False),
    ):
        pass


def test_lesionflow_run_refuses_a_locked_workspace_before_prefect_starts(
    workspace: Path, holder: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, _ = holder
    start = time.monotonic()
    done = subprocess.run([EXE, "run", "-w", str(workspace)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: workspace ")
    assert f"pid {proc.pid}" in lines[0]
    assert str(lock_path(workspace)) in lines[0]
    assert time.monotonic() - start < 30  # refused before an embedded Prefect server (~15 s) started


# ------------------------------------------------------------------------------ two real flow runs at once

REFERENCE = """
import sys
from lesionflow.caching import run_cached
from lesionflow.params import load_params
from lesionflow.stages.registry import STAGES
from lesionflow.workspace import Workspace
ws = Workspace.at(sys.argv[1])
params = load_params(ws.params_file)
for stage in ("ingest", "validate-raw"):
    run_cached(stage, ws, params, STAGES[stage].run)
"""

FLOW_RUN = """
import json, sys
from lesionflow.flows.ingest import ingest_flow
state = ingest_flow(workspace=sys.argv[1], wait_for_lock=True, lock_timeout_s=120, return_state=True)
print(json.dumps({"completed": state.is_completed(), "message": state.message,
                  "flow_run_id": str(state.state_details.flow_run_id)}))
"""


@pytest.mark.slow
def test_two_concurrent_flow_runs_are_serialized_and_leave_correct_outputs(workspace: Path, tmp_path: Path) -> None:
    """Two ingest flows (ingest + validate-raw) started together in one workspace: one waits for the other."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    write_msd(workspace / "data" / "demo", n_train=3, n_test=1)
    reference = tmp_path / "reference"  # the same stages run once, alone, without Prefect or a lock
    reference.mkdir()
    (reference / "params.yaml").write_text((workspace / "params.yaml").read_text())
    write_msd(reference / "data" / "demo", n_train=3, n_test=1)
    # in its own process, alongside the server start: the whole test stays near a minute on 2 cores
    ref_proc = _python(REFERENCE, str(reference))
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / "ph")}
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", FLOW_RUN, str(workspace)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outcomes = []
        for proc in runs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
        assert all(o["completed"] for o in outcomes), outcomes
        spans = []
        with get_client(sync_client=True) as client:
            for o in outcomes:
                flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(o["flow_run_id"])]))
                task_runs = client.read_task_runs(flow_run_filter=flow_filter)
                assert {t.name for t in task_runs} >= {"ingest", "validate-raw"}
                starts = [t.start_time or t.expected_start_time for t in task_runs]
                ends = [t.end_time for t in task_runs]
                assert all(s is not None for s in starts)
                assert all(e is not None for e in ends)
                spans.append((min(s for s in starts if s), max(e for e in ends if e)))
    _, ref_err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, ref_err[-3000:]
    first, second = sorted(spans)
    assert first[1] <= second[0], f"the two runs' stages overlapped: {spans}"  # serialized by the lock
    for rel in ("data/raw/manifest.csv", "data/raw/dataset.json", "reports/validate-raw/summary.json"):
        assert (workspace / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert sorted(p.name for p in (workspace / "data" / "raw" / "cases").iterdir()) == sorted(
        p.name for p in (reference / "data" / "raw" / "cases").iterdir()
    )
    assert not list((workspace / "data" / "raw").glob(".staging/*"))  # no half-written case left behind
    assert read_holder(lock_path(workspace)) is None


# ------------------------------------------------------------------ the CLI's writing commands (issue 17 item 7)


def _stage(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "stage", *args, "-w", str(workspace)], capture_output=True, text=True, timeout=300, check=False
    )


def test_lesionflow_stage_refuses_or_waits_while_a_flow_holds_the_lock(
    workspace: Path, holder: tuple[subprocess.Popen[str], Path]
) -> None:
    """`lesionflow stage` (what dvc repro runs) writes nothing while another run holds the workspace."""
    proc, release = holder
    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)
    refused = _stage(workspace, "ingest")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert f"pid {proc.pid}" in lines[0]
    assert "holder process" in lines[0]
    assert "--wait-lock" in lines[0]
    assert not (workspace / "data" / "raw").exists()  # the stage did not run
    waited = _stage(workspace, "ingest", "--wait-lock", "--lock-timeout", "1")
    assert waited.returncode == 2
    assert "after waiting 1 s" in waited.stderr
    demo = subprocess.run([EXE, "demo-data", "-w", str(workspace)], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 2
    assert f"pid {proc.pid}" in demo.stderr
    release.touch()
    proc.wait(timeout=30)
    done = _stage(workspace, "ingest")
    assert done.returncode == 0, done.stderr
    assert (workspace / "data" / "raw" / "manifest.csv").exists()
    assert read_holder(lock_path(workspace)) is None  # released when the stage ended


@pytest.mark.slow
def test_two_lesionflow_stage_commands_do_not_both_run(workspace: Path) -> None:
    """The first `lesionflow stage` is frozen (SIGSTOP) while it holds the lock: the second refuses naming it,
    or, with --wait-lock, runs after it; both record the work of one run only."""
    write_msd(workspace / "data" / "demo", n_train=2, n_test=0)
    first = subprocess.Popen(
        [EXE, "stage", "ingest", "-w", str(workspace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while (holder := read_holder(lock_path(workspace))) is None or holder.pid != first.pid:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first stage never took the lock"
        time.sleep(0.002)
    os.kill(first.pid, signal.SIGSTOP)  # frozen mid-stage, lock held
    try:
        second = _stage(workspace, "ingest")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "lesionflow stage ingest" in second.stderr  # what the holder runs
        waiter = subprocess.Popen(
            [EXE, "stage", "ingest", "-w", str(workspace), "--wait-lock", "--lock-timeout", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiter.poll() is None  # waiting, not working, while the first holds the workspace
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert "up to date: no work done" in out  # it ran after the first one and found its outputs current
