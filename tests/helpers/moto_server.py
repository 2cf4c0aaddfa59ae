"""A real moto S3 server for tests: boto3 and s3fs talk HTTP to 127.0.0.1, nothing is patched.

Fixtures
--------
``moto_s3_server`` (module scope)
    One ``moto_server`` process per test module, bound to 127.0.0.1 on a free port, started in its own process
    group. Teardown stops it by its PID (SIGTERM, then SIGKILL after 10 s), also when tests fail; on Linux the
    server additionally gets SIGKILL if the pytest process dies without tearing down.
``moto_s3`` (function scope)
    Empties the server (``/moto-api/reset``: every test starts with no buckets), points the ``AWS_*`` variables
    at it with ``monkeypatch`` (and hides any real profile, token or config file) and returns a :class:`MotoS3`
    with ``.endpoint_url``, ``.client()`` (a boto3 S3 client factory) and ``.require_auth()`` (makes moto answer
    403 to unknown credentials until the next test, to exercise access-denied paths).
``moto_s3_credentials`` (function scope)
    ``(access key id, secret)`` that ``moto_s3`` exports; moto accepts anything. Override it in a test module
    to use a distinctive secret when a test checks that the secret never leaks.

Using it from another test module::

    pytest_plugins = ["tests.helpers.moto_server"]

    def test_something(moto_s3):
        moto_s3.client().create_bucket(Bucket="data")  # AWS_* now point at the server, for s3fs/dvc/zarr too

(or list the same plugin in ``pytest_plugins`` of the top-level ``tests/conftest.py``; importing the fixtures by
name also works but trips ruff's F811). ``from tests.helpers.moto_server import MotoS3`` for type hints.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The console script of the venv running pytest (moto[server]); PATH only as a fallback.
MOTO_SERVER = Path(sys.executable).parent / "moto_server"
if not MOTO_SERVER.exists():
    MOTO_SERVER = Path(shutil.which("moto_server") or MOTO_SERVER)
HOST = "127.0.0.1"  # never bind a test server to a public interface
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# urllib honours HTTP(S)_PROXY; a local server must be reached directly.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class MotoS3:
    """Where the server listens and the credentials exported for the current test."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = REGION

    def require_auth(self) -> None:
        """From now on until the next test, reject requests whose access key is not a moto IAM user (403)."""
        _post(self.endpoint_url + "/moto-api/reset-auth", b"0")

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client bound to this server (explicit settings, so it works even outside ``moto_s3``)."""
        import boto3
        from botocore.config import Config

        settings: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "config": Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
        }
        settings.update(kwargs)
        return boto3.client("s3", **settings)


def _post(url: str, body: bytes = b"") -> None:
    # text/plain: with urllib's default form content type Flask consumes the body and moto sees nothing.
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with _DIRECT.open(request, timeout=10):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGKILL it when pytest dies (PR_SET_PDEATHSIG = 1)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _answers(url: str) -> bool:
    """True once the server answers HTTP at all (an HTTP error status is an answer too)."""
    try:
        with _DIRECT.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` by its PID: SIGTERM, wait, then SIGKILL; then kill whatever is left in its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    # The group was created for this server alone (start_new_session), so this reaches only its children.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def start_moto_server(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``moto_server`` on a free 127.0.0.1 port and wait until it answers; returns (process, endpoint URL)."""
    env = {**os.environ, "NO_PROXY": HOST, "no_proxy": HOST}
    for _ in range(3):  # a free port can be taken between probing and binding; try another one
        url = f"http://{HOST}:{_free_port()}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", HOST, "-p", url.rsplit(":", 1)[1]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(url + "/"):
                return proc, url
            time.sleep(0.1)
        stop_process(proc)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto_server did not start (log {log_path}):\n{tail}")


@pytest.fixture(scope="module")
def moto_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto server that lives for the test module; stopped by PID on teardown."""
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    proc, url = start_moto_server(log_path)
    try:
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def moto_s3_credentials() -> tuple[str, str]:
    """(access key id, secret) exported by ``moto_s3``; override to use a distinctive secret."""
    return ("testing", "testing")


@pytest.fixture
def moto_s3(
    moto_s3_server: str,
    moto_s3_credentials: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> MotoS3:
    """An empty S3 on moto, with the ``AWS_*`` environment of this test pointing at it."""
    _post(moto_s3_server + "/moto-api/reset")  # no buckets left over from the previous test
    _post(moto_s3_server + "/moto-api/reset-auth", b"inf")  # undo require_auth(): moto accepts any credentials
    key_id, secret = moto_s3_credentials
    # Hide anything that could make boto3/s3fs talk to real AWS or pick other credentials.
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_s3_server,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": HOST,
        "no_proxy": HOST,
    }
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return MotoS3(endpoint_url=moto_s3_server, access_key_id=key_id, secret_access_key=secret)
