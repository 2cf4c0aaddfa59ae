"""A real Dask cluster for tests: ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, stopped by PID.

Nothing in-process: the scheduler and each worker are separate processes started from the venv's ``dask`` console
script, as a team would start them on other machines. Workers import lesionflow from the same environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.moto_server import _die_with_parent, stop_process

DASK = Path(sys.executable).parent / "dask"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DaskCluster:
    address: str  # tcp://127.0.0.1:PORT
    scheduler_pid: int
    worker_pids: tuple[int, ...]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(DASK), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _wait_for(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start (log {log}):\n{log.read_text(errors='replace')[-2000:]}")


@contextmanager
def dask_cluster(tmp: Path, n_workers: int = 2) -> Iterator[DaskCluster]:
    """Scheduler on a free 127.0.0.1 port plus ``n_workers`` single-threaded worker processes."""
    from distributed import Client

    log = tmp / "dask.log"
    scheduler_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        scheduler = _spawn(["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                            "--scheduler-file", str(scheduler_file)], log)  # fmt: skip
        procs.append(scheduler)
        _wait_for("dask scheduler", scheduler_file.exists, procs, log)
        time.sleep(0.2)  # the file is written in one go, but give the writer its close()
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(n_workers):
            procs.append(_spawn(["worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                 "--memory-limit", "3GiB", "--name", f"w{i}", "--local-directory",
                                 str(tmp / f"w{i}")], log))  # fmt: skip
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=START_TIMEOUT_S)
        yield DaskCluster(address, scheduler.pid, tuple(p.pid for p in procs[1:]))
    finally:
        for proc in reversed(procs):  # workers first, then the scheduler
            stop_process(proc)
