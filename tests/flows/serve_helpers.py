"""Run ``lesionflow serve`` as a real subprocess in tests: a free loopback port, wait for "ready", stop by PID.

Also a throwaway PostgreSQL (initdb + pg_ctl on loopback) for the PostgreSQL test. Everything started here is
stopped here, by PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.helpers.volumes import write_msd

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def make_workspace(root: Path, timezone: str) -> Path:
    """A git + DVC workspace like tests/test_dvc_consistency.py's, with ``orchestration.timezone`` set."""
    ws = root / "ws"
    ws.mkdir(parents=True)
    for name in ("dvc.yaml", "data.dvc"):
        shutil.copy(REPO / name, ws / name)
    params = (REPO / "params.yaml").read_text()
    assert "  timezone: UTC" in params
    (ws / "params.yaml").write_text(params.replace("  timezone: UTC", f"  timezone: {timezone}", 1))
    shutil.copytree(REPO / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # serve deploys the workspace's infra/prefect.yaml; its entrypoints are modules of the installed package
    (ws / "infra").mkdir()
    shutil.copy(REPO / "infra" / "prefect.yaml", ws / "infra" / "prefect.yaml")
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True)
    # Not at params.yaml's ingest.source (data/demo): a run only finds it when its parameter points there.
    write_msd(ws / "data" / "mine", n_train=2, n_test=0)
    return ws


@dataclass
class Served:
    """One ``lesionflow serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    reports_port: int = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "ready: " in self.text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.3)
        raise AssertionError(f"serve not ready after {timeout_s} s:\n{self.text()}")

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings({PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (what Ctrl-C or a service manager sends) and wait; SIGKILL only if it hangs (then the test fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"serve ignored SIGTERM for {timeout_s} s:\n{self.text()}") from None
        return self.proc.returncode


def start_serve(workspace: Path, out_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Served:
    """``lesionflow serve -w workspace --port <free> *extra``, its output in ``out_dir``; ``env`` adds variables."""
    port, reports_port = free_port(), free_port()
    output = out_dir / f"serve-{port}.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    child_env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # the worker polls every second: runs start without a 10 s wait
    child_env.update(env or {})
    cmd = [sys.executable, "-m", "lesionflow.cli", "serve", "-w", str(workspace), "--port", str(port)]
    cmd += ["--reports-port", str(reports_port), *extra]
    with output.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=out_dir, env=child_env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
    return Served(proc, port, output, reports_port)


def postgres_bin() -> Path | None:
    for folder in (shutil.which("initdb"), "/usr/lib/postgresql/15/bin/initdb"):
        if folder and Path(folder).is_file() and Path(folder).with_name("pg_ctl").is_file():
            return Path(folder).parent
    return None


@contextmanager
def running_postgres(bin_dir: Path) -> Iterator[str]:
    """A PostgreSQL on 127.0.0.1:<free port>, trust auth, database ``prefect``; yields its asyncpg URL.

    initdb refuses to run as root, so under root the cluster belongs to the ``postgres`` user, in a folder of
    its own under /tmp (pytest's tmp dirs are private to root).
    """
    as_user = "postgres" if os.geteuid() == 0 else None
    data_root = Path(tempfile.mkdtemp(prefix="lesionflow-pg-"))
    if as_user:
        shutil.chown(data_root, as_user, as_user)
    data = data_root / "data"
    port = free_port()
    pg_ctl = str(bin_dir / "pg_ctl")
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        user=as_user, cwd=data_root, check=True, capture_output=True,
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={data_root} -c fsync=off"
    log = data_root / "postgres.log"
    subprocess.run(
        [pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
        user=as_user, cwd=data_root, check=True, capture_output=True,
    )  # fmt: skip
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        import asyncio

        import asyncpg

        async def create_db() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
            await conn.execute("CREATE DATABASE prefect")
            await conn.close()

        asyncio.run(create_db())
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], user=as_user, cwd=data_root, check=False)
        if alive(pid):  # pg_ctl stop failed: stop the postmaster we started, by its PID
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data_root, ignore_errors=True)
