"""The lesionflow command: help lists every command; user errors are one line with exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from lesionflow.stages.registry import STAGES

EXE = str(Path(sys.executable).with_name("lesionflow"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_every_command(tmp_path: Path) -> None:
    proc = _cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("demo-data", "stage", "stages", "run", "params"):
        assert command in proc.stdout
    listing = _cli("stages", cwd=tmp_path)
    for name in STAGES:
        assert name in listing.stdout


def test_params_check_ok_and_bad(workspace: Path) -> None:
    ok = _cli("params", "check", cwd=workspace)
    assert ok.returncode == 0
    assert "params.yaml is valid" in ok.stdout
    bad = _cli("params", "check", "--set", "quality.max_reject_fraction=-1", cwd=workspace)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "quality.max_reject_fraction" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unknown_stage_is_one_line(workspace: Path) -> None:
    proc = _cli("stage", "trian", cwd=workspace)
    assert proc.returncode == 2
    assert "stage 'trian' is unknown" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_data_then_stages_from_the_command_line(workspace: Path) -> None:
    built = _cli("demo-data", "chest-ct", "--cases", "3", "--size", "32", "--seed", "4", cwd=workspace)
    assert built.returncode == 0, built.stderr
    assert "3 chest-ct cases" in built.stdout
    assert "say nothing clinical" in built.stdout
    ingest = _cli("stage", "ingest", cwd=workspace)
    assert ingest.returncode == 0, ingest.stderr
    assert "data/raw/manifest.csv" in ingest.stdout  # where the outputs went
    gate = _cli("stage", "validate-raw", cwd=workspace)
    assert gate.returncode == 0, gate.stderr
    assert "reports/quality/raw/index.html" in gate.stdout
    cases = sorted(p.name for p in (workspace / "data" / "raw" / "cases").iterdir())
    assert len(cases) == 3
    organ = nib.load(workspace / "data" / "raw" / "cases" / cases[0] / "organ.nii.gz")
    assert organ.shape == nib.load(workspace / "data" / "raw" / "cases" / cases[0] / "image.nii.gz").shape


# ---- issue 17: one line instead of a traceback, params that should not validate -------------------------------


def test_a_file_size_limit_during_ingest_is_one_line_naming_the_file_and_leaves_no_partial_file(
    workspace: Path,
) -> None:
    import resource
    import signal

    from tests.helpers.volumes import write_msd

    write_msd(workspace / "data" / "demo", n_train=2, n_test=1)

    def small_files() -> None:  # EFBIG on the first write past 3 kB, the way a full disk fails a write (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    proc = subprocess.run(
        [EXE, "stage", "ingest"], cwd=workspace, capture_output=True, text=True, timeout=300, preexec_fn=small_files
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "File too large [EFBIG]" in line, line
    assert "ulimit -f" in line
    assert str(workspace / "data" / "raw") in line  # names the file it was writing
    assert [p for p in (workspace / "data" / "raw").rglob("*") if p.is_file()] == []  # nothing half written


def test_a_full_disk_write_names_the_file_and_keeps_the_old_bytes(tmp_path: Path) -> None:
    import errno

    import pytest

    from lesionflow.files import atomic_path, file_system_error

    target = tmp_path / "data" / "table.csv"
    target.parent.mkdir()
    target.write_text("old\n")

    def write_to_a_full_disk() -> None:
        with atomic_path(target) as tmp, open("/dev/full", "wb") as full:
            tmp.write_text("new, half\n")
            full.write(b"x" * 1_000_000)
            full.flush()  # /dev/full: a real write that fails with ENOSPC, as on a full disk

    with pytest.raises(OSError, match="No space left on device") as info:
        write_to_a_full_disk()
    assert info.value.errno == errno.ENOSPC
    message = str(file_system_error(info.value))
    assert message.startswith(f"cannot access {target}: No space left on device [ENOSPC]; the disk is full"), message
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]  # no temp file left
    denied = file_system_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data/processed")))
    assert str(denied).startswith(f"cannot access {tmp_path / 'data/processed'}: Permission denied [EACCES]; make")
    assert file_system_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None  # not a file problem


def test_a_synthetic_store_that_is_not_a_zarr_store_is_one_line(workspace: Path) -> None:
    proc = _cli("params", "check", "--set", "train.synthetic_store=/etc", cwd=workspace)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "'train.synthetic_store' = '/etc' is not a Zarr store" in proc.stderr


def test_a_slow_prefect_server_start_is_one_line_naming_the_setting(workspace: Path, tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "1"  # no server starts (imports, migrations) in 1 s
    proc = subprocess.run([EXE, "run"], cwd=workspace, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "the embedded Prefect server did not start within 1 s" in proc.stderr
    assert "orchestration.server_startup_timeout_s" in proc.stderr


def test_the_startup_timeout_setting_reaches_prefect(monkeypatch: object, tmp_path: Path) -> None:
    import pytest
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from lesionflow.cli import PREFECT_STARTUP_ENV, _prefect_flow_call
    from lesionflow.params import Params

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.delenv(PREFECT_STARTUP_ENV, raising=False)
    params = Params.model_validate({"orchestration": {"server_startup_timeout_s": 240}})
    with _prefect_flow_call(params, [], tmp_path) as overrides:
        assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 240
        assert overrides == []


_RUN_ONE_FLOW = """
import sys
from pathlib import Path
from prefect import flow
from prefect.runtime import flow_run
from lesionflow.cli import _prefect_flow_call
from lesionflow.params import Params

@flow
def probe() -> str:
    return str(flow_run.id)

params = Params.model_validate({"orchestration": {"server_startup_timeout_s": 300}})
with _prefect_flow_call(params, [], Path(sys.argv[1])):
    print(probe())
"""


@pytest.mark.slow
def test_run_and_serve_share_the_workspace_prefect_home(tmp_path: Path) -> None:
    """Issue 19 item 5: a flow run of `run`/`study` is recorded in <workspace>/.prefect, the database serve opens."""
    import os
    import sqlite3

    from lesionflow.serve import resolve_settings

    ws = tmp_path / "ws"
    (ws / "infra").mkdir(parents=True)
    (ws / "infra" / "prefect.yaml").write_text("deployments: []\n")
    (ws / "params.yaml").write_text("project:\n  seed: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["HOME"] = str(tmp_path / "home")  # Prefect's default home would be ~/.prefect
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_ONE_FLOW, str(ws)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    serve_db = resolve_settings(ws).prefect_home / "prefect.db"
    with sqlite3.connect(serve_db) as db:
        found = db.execute("SELECT name FROM flow_run WHERE id = ?", (run_id,)).fetchall()
    assert len(found) == 1, f"flow run {run_id} is not in {serve_db}"
    assert not (tmp_path / "home" / ".prefect" / "prefect.db").exists()


@pytest.mark.slow
def test_params_check_compares_the_patch_with_the_preprocessed_volumes(tmp_path: Path) -> None:
    from tests.study.test_runner import processed_workspace

    ws = processed_workspace(tmp_path / "ws", n_train=2, n_test=1)
    fits = _cli("params", "check", "--set", "train.patch_size=[8, 8, 8]", cwd=ws.root)
    assert fits.returncode == 0, fits.stderr
    assert "train.patch_size [8, 8, 8] fits the 2 preprocessed training volumes" in fits.stdout
    big = _cli("params", "check", "--set", "train.patch_size=[512, 8, 8]", cwd=ws.root)
    assert big.returncode == 2
    assert "Traceback" not in big.stderr
    assert "train.patch_size = [512, 8, 8] is larger than every training volume along x" in big.stderr
