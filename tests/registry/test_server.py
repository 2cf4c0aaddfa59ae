"""A real ``mlflow server`` subprocess: register through HTTP, read the lineage back, stop it by its PID."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lesionflow.quiet_env import QUIET_ENV
from lesionflow.registry.lineage import missing_fields, read_lineage
from lesionflow.registry.publish import champion_info, register_model
from lesionflow.registry.tracking import RegistryUnavailable, check_reachable, download_model_files, resolve_model_ref
from tests.helpers.moto_server import stop_process
from tests.registry.conftest import MODEL_NAME, make_request, staging

MLFLOW = Path(sys.executable).parent / "mlflow"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(url + "/health", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _start(root: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    url = f"http://{HOST}:{port}"
    log = root / "mlflow-server.log"
    env = {**os.environ, **QUIET_ENV, "NO_PROXY": HOST, "no_proxy": HOST}
    # MLflow 3.17 starts a job runner with seven huey consumers that survive SIGTERM to the parent (and cost
    # seconds of CPU on a small machine); the registry does not use jobs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(MLFLOW), "server",
                "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                "--default-artifact-root", (root / "artifacts").as_uri(),
                "--host", HOST, "--port", str(port), "--workers", "1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop_process reaches its workers too
        )  # fmt: skip
    return proc, url, log


def test_register_and_read_lineage_through_a_server(tmp_path: Path) -> None:
    proc, url, log = _start(tmp_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.25)
        check_reachable(url)
        model_dir, reports, _network, _config = staging(tmp_path / "checkout")
        req = make_request(url, model_dir, reports, champion=True, metrics={"dice_mean": 0.7})
        result = register_model(req)
        assert (result.version, result.aliases, result.tracking_uri) == (1, ("candidate", "champion"), url)

        lineage = read_lineage(f"{MODEL_NAME}@champion", url)
        assert lineage.run_id == result.run_id
        assert lineage.metrics == {"dice_mean": 0.7}
        assert {d.name: d.digest for d in lineage.datasets} == {d.name: d.digest for d in req.datasets}
        assert missing_fields(lineage) == []
        raw = lineage.dataset("raw")
        assert raw is not None
        assert raw.cases is not None
        assert len(raw.cases) == 4

        assert resolve_model_ref(result.run_id, url).version == 1
        info = champion_info(url, MODEL_NAME)
        assert info is not None
        assert info.metrics == {"dice_mean": 0.7}
        folder = download_model_files(f"{MODEL_NAME}/1", url, tmp_path / "dl")
        assert (folder / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    finally:
        stop_process(proc)
    with pytest.raises(RegistryUnavailable, match="is unreachable"):
        read_lineage(f"{MODEL_NAME}@champion", url)
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "mlflow server workers outlived the stop"


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process of the server's group is left."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False
