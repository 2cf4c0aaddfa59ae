"""``lesionflow serve``: a Prefect server, a process work pool, the deployments of infra/prefect.yaml and a worker.

Everything runs on this machine without Docker: the server binds 127.0.0.1, keeps its state under
``<workspace>/.prefect`` (SQLite unless a PostgreSQL URL is given; the same home ``lesionflow run`` and
``lesionflow study`` use, so every flow-run id they record opens here) and the worker runs flow runs as local
processes from the workspace. A plain HTTP server (the standard library's) serves ``<workspace>/reports`` on
the next port, so the report links of the Prefect artifacts open in the browser (a browser refuses ``file://``
links from an ``http://`` page). Stopping (Ctrl-C or SIGTERM) stops the worker first, so no new run starts, then
the server; only the processes started here are signalled, by PID. A step that fails stops what was already
started and raises :class:`ServeError` with one line naming the cause and the fix.

This is an adapter like the CLI: it starts Prefect's own command-line programs and talks to the REST API over
HTTP; nothing below the adapters imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
import yaml

from lesionflow.errors import LesionflowError
from lesionflow.quiet_env import QUIET_ENV

# The deployments, relative to the workspace: the workspace is the project (params.yaml, dvc.yaml, infra/),
# never the folder this package happens to be installed in.
PREFECT_FILE = Path("infra") / "prefect.yaml"
HOST = "127.0.0.1"  # loopback only: the server has no authentication
WORKER_NAME = "lesionflow-serve"
SERVER_START_TIMEOUT_S = 180.0  # first start creates the database (PostgreSQL migrations take longest)
WORKER_START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0  # per process; SIGKILL after that


def say_flushed(message: str) -> None:
    """Print and flush at once: serve's output is often a pipe or a log file read while it runs."""
    print(message, flush=True)


PREFECT_HOME_DIR = ".prefect"
REPORTS_URL_ENV = "LESIONFLOW_REPORTS_URL"  # base URL of the served reports/ folder, for artifact links


def workspace_prefect_home(workspace: Path) -> Path:
    """The Prefect home (database, logs) of a workspace: serve, run and study all use this one."""
    return Path(workspace) / PREFECT_HOME_DIR


class ServeError(LesionflowError):
    """A step of ``lesionflow serve`` failed; the message names the step, the cause and the fix."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``serve`` needs, resolved and checked before any process starts."""

    workspace: Path
    port: int
    pool: str
    timezone: str
    nightly_cron: str
    database_url: str | None = None  # None = SQLite under <workspace>/.prefect
    reports_port: int = 0  # 0 = port + 1

    @property
    def prefect_file(self) -> Path:
        """``<workspace>/infra/prefect.yaml``; entrypoints are modules (``lesionflow.flows.pipeline.training_pipeline``)
        or scripts relative to the workspace (``my_flows/x.py:my_flow``, a team's own flows)."""
        return self.workspace / PREFECT_FILE

    @property
    def prefect_home(self) -> Path:
        return workspace_prefect_home(self.workspace)

    @property
    def reports_dir(self) -> Path:
        return self.workspace / "reports"

    @property
    def served_reports_port(self) -> int:
        return self.reports_port or self.port + 1

    @property
    def reports_url(self) -> str:
        """Base URL of the served ``reports/`` folder (ends with a slash)."""
        return f"http://{HOST}:{self.served_reports_port}/"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def env(self) -> dict[str, str]:
        """The environment of the server, the deploy step and the worker (and so of every flow run)."""
        env = {**QUIET_ENV, **os.environ}  # a value the user exported wins over the quiet defaults
        env.update(
            PREFECT_HOME=str(self.prefect_home),
            PREFECT_API_URL=self.api_url,
            LESIONFLOW_REPO=str(self.workspace),  # prefect.yaml's working directory of every flow run
            LESIONFLOW_WORKSPACE=str(self.workspace),
            LESIONFLOW_WORK_POOL=self.pool,
            LESIONFLOW_TIMEZONE=self.timezone,
            LESIONFLOW_NIGHTLY_CRON=self.nightly_cron,
            **{REPORTS_URL_ENV: self.reports_url},
        )
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        return env


def resolve_settings(
    workspace: Path,
    port: int = 4200,
    database_url: str | None = None,
    pool: str | None = None,
    params_file: Path | None = None,
    reports_port: int = 0,
) -> ServeSettings:
    """Check the inputs (params, port, database) and return the settings ``serve`` runs with."""
    from lesionflow.params import load_params
    from lesionflow.workspace import Workspace

    ws = Workspace.at(workspace)
    if not ws.root.is_dir():
        raise ServeError(f"workspace {ws.root} does not exist; create it or pass --workspace")
    if not (ws.root / PREFECT_FILE).is_file():
        raise ServeError(
            f"workspace {ws.root} has no {PREFECT_FILE}: serve deploys the flows of the project in the workspace; "
            "pass --workspace <project folder with params.yaml and infra/prefect.yaml>"
        )
    orchestration = load_params(params_file or ws.params_file).orchestration
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port} is out of range; expected 1-65535, e.g. --port 4200")
    if not 0 <= reports_port <= 65535 or reports_port == port or (not reports_port and port == 65535):
        raise ServeError(
            f"--reports-port {reports_port} cannot serve the reports beside --port {port}; pass another port, "
            "e.g. --reports-port 4201"
        )
    url = database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or None
    return ServeSettings(
        workspace=ws.root,
        port=port,
        pool=pool or orchestration.work_pool,
        timezone=orchestration.timezone,
        nightly_cron=orchestration.nightly_cron,
        database_url=check_database_url(url) if url else None,
        reports_port=reports_port,
    )


def check_database_url(url: str) -> str:
    """The SQLAlchemy URL Prefect needs (``postgresql+asyncpg://`` or ``sqlite+aiosqlite://``), checked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ServeError(f"--database-url {redact(url)!r} is not a URL; expected postgresql+asyncpg://user:pw@host/db")
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    if scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ServeError(
            f"--database-url {redact(url)!r}: Prefect supports PostgreSQL (postgresql+asyncpg://user:pw@host:5432/db)"
            " or SQLite (sqlite+aiosqlite:///path/prefect.db)"
        )
    url = f"postgresql+asyncpg://{rest}"
    try:
        import asyncpg  # noqa: F401 - Prefect's PostgreSQL driver
    except ImportError:
        raise ServeError("--database-url needs the asyncpg driver in this environment: pip install asyncpg") from None
    _check_postgres_reachable(url)
    return url


def _check_postgres_reachable(url: str) -> None:
    """Connect once, so a wrong host, password or database is one line here, not a server traceback later."""
    import asyncio

    import asyncpg

    async def probe() -> None:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=10)
        await connection.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ServeError(f"cannot connect to PostgreSQL at {redact(url)}: {detail}") from None


def redact(url: str) -> str:
    """``scheme://user:***@host/db``: never print a password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{location}"


@dataclass
class Services:
    """The processes one ``serve`` started; :meth:`stop` ends them in order, by PID."""

    settings: ServeSettings
    say: Callable[[str], None] = say_flushed
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    reports: subprocess.Popen[bytes] | None = None
    deployments: list[str] = field(default_factory=list)
    worker_started_at: float = 0.0  # epoch seconds, to tell this worker's heartbeats from an earlier one's
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.settings.prefect_home / "logs"

    def _log(self, name: str) -> IO[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(handle)
        return handle

    def start_server(self) -> None:
        _check_port_free(self.settings.port)
        cmd = [_prefect(), "server", "start", "--host", HOST, "--port", str(self.settings.port), "--analytics-off"]
        # A session of its own: a terminal Ctrl-C reaches serve only, which then stops the worker before the server.
        self.server = subprocess.Popen(
            cmd, env=self.settings.env(), stdin=subprocess.DEVNULL, stdout=self._log("server"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def start_reports(self) -> None:
        """Serve ``<workspace>/reports`` read-only over HTTP on loopback (directory listings included)."""
        port = self.settings.served_reports_port
        _check_port_free(port)
        self.settings.reports_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", HOST]
        cmd += ["--directory", str(self.settings.reports_dir)]
        self.reports = subprocess.Popen(
            cmd, env=self.settings.env(), stdin=subprocess.DEVNULL, stdout=self._log("reports"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_healthy(self, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline and not should_stop():
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.settings.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        if not should_stop():
            raise ServeError(
                f"the Prefect server did not answer {self.settings.api_url}/health within {SERVER_START_TIMEOUT_S:.0f}"
                f" s; see {self.log_dir / 'server.log'}"
            )

    def ensure_pool(self) -> None:
        """Create the process work pool unless it exists (Prefect's default job template for process workers)."""
        from prefect.workers.process import ProcessWorker

        name, api = self.settings.pool, self.settings.api_url
        found = httpx.get(f"{api}/work_pools/{name}", timeout=30)
        if found.status_code == 200:
            kind = found.json()["type"]
            if kind != "process":
                raise ServeError(f"work pool {name!r} exists with type {kind!r}; pass --pool with another name")
            return
        body = {"name": name, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
        created = httpx.post(f"{api}/work_pools/", json=body, timeout=30)
        if created.status_code not in (201, 409):  # 409: created meanwhile by someone else, fine
            raise ServeError(f"creating work pool {name!r} failed: HTTP {created.status_code} {created.text[:200]}")

    def deploy(self) -> None:
        """``prefect deploy`` of every deployment in prefect.yaml whose entrypoint resolves (module or script)."""
        names = []
        for spec in _deployment_specs(self.settings.prefect_file):
            where = _entrypoint_problem(spec["entrypoint"], self.settings.workspace)
            if not where:
                names.append(spec["name"])
            else:
                self.say(f"warning: deployment {spec['name']!r} skipped: {where}")
        if not names:
            raise ServeError(f"no deployment of {self.settings.prefect_file} has an entrypoint that resolves")
        cmd = [_prefect(), "--no-prompt", "deploy", "--prefect-file", str(self.settings.prefect_file)]
        cmd += [arg for name in names for arg in ("--name", name)]
        log = self.log_dir / "deploy.log"
        with self._log("deploy") as handle:
            handle.write(f"$ {' '.join(cmd)}\n".encode())
            handle.flush()
            # cwd: prefect deploy loads each entrypoint (for its parameter schema) relative to the workspace
            done = subprocess.run(
                cmd, cwd=self.settings.workspace, env=self.settings.env(), stdin=subprocess.DEVNULL,
                stdout=handle, stderr=subprocess.STDOUT, timeout=300, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            raise ServeError(f"prefect deploy failed: {_last_error_line(log)}; full output in {log}")
        self.deployments = names

    def start_worker(self) -> None:
        cmd = [_prefect(), "worker", "start", "--pool", self.settings.pool, "--name", WORKER_NAME]
        self.worker_started_at = time.time()
        # stack.md: a worker that inherits SIGINT as ignored never stops on SIGTERM (it turns SIGTERM into SIGINT
        # on itself), so both signals go back to their defaults in the child before exec.
        self.worker = subprocess.Popen(
            cmd, cwd=self.settings.workspace, env=self.settings.env(), stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_default_signals,
        )  # fmt: skip

    def wait_worker_online(self, should_stop: Callable[[], bool]) -> None:
        """Wait for this worker's first heartbeat, so that "ready" means a new run will be picked up."""
        url = f"{self.settings.api_url}/work_pools/{self.settings.pool}/workers/filter"
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline and not should_stop():
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                for worker in httpx.post(url, json={}, timeout=5).json():
                    beat = worker.get("last_heartbeat_time") or ""
                    if worker["name"] == WORKER_NAME and _iso_to_epoch(beat) >= self.worker_started_at - 1:
                        return
            time.sleep(0.5)
        if not should_stop():
            raise ServeError(f"the worker did not come online within {WORKER_START_TIMEOUT_S:.0f} s; see its output")

    def check_alive(self) -> None:
        """Raise :class:`ServeError` when the server or the worker has exited (the server's with its log line)."""
        for label, proc in (("Prefect server", self.server), ("worker", self.worker), ("report server", self.reports)):
            if proc is not None and proc.poll() is not None:
                server_log = self.log_dir / "server.log"
                where = f"; last log line: {_last_error_line(server_log)}" if proc is self.server else ""
                raise ServeError(f"the {label} (pid {proc.pid}) exited with code {proc.returncode}{where}")

    def stop(self) -> None:
        """Worker first (no new flow run starts), then any flow run it left behind, then the server."""
        if self.worker is not None:
            runs = _children(self.worker.pid)
            _terminate(self.worker, "worker", self.say)
            for pid in runs:  # flow-run processes this worker started that outlived it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    self.say(f"stopped flow-run process {pid} left by the worker")
        if self.server is not None:
            _terminate(self.server, "Prefect server", self.say)
        if self.reports is not None:
            _terminate(self.reports, "report server", self.say)
        for handle in self._logs:
            handle.close()


def _never() -> bool:
    return False


def start(
    settings: ServeSettings, say: Callable[[str], None] = say_flushed, should_stop: Callable[[], bool] = _never
) -> Services:
    """Start server, work pool, deployments and worker; on any failure stop what was started and re-raise."""
    services = Services(settings, say)
    try:
        say(f"starting the Prefect server on {settings.ui_url} ({_database_label(settings)}) ...")
        services.start_server()
        services.start_reports()
        services.wait_healthy(should_stop)
        if not should_stop():
            services.ensure_pool()
            # The worker needs only the pool: its start-up (imports, ~5 s) overlaps the deploy on a second core.
            services.start_worker()
            say(f"work pool {settings.pool!r} ready; deploying {settings.prefect_file}")
            services.deploy()
        if not should_stop():
            services.wait_worker_online(should_stop)
    except BaseException:
        services.stop()
        raise
    return services


def serve(settings: ServeSettings, say: Callable[[str], None] = say_flushed) -> None:
    """Run until SIGINT/SIGTERM (then stop worker and server) or until one of them dies (then raise ServeError)."""
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_signal.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        services = start(settings, say, lambda: bool(stop_signal))
        try:
            if not stop_signal:
                _say_ready(services, say)
            while not stop_signal:
                services.check_alive()
                time.sleep(0.5)
            say(f"{signal.Signals(stop_signal[0]).name}: stopping the worker, then the server ...")
        finally:
            services.stop()
        say("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say_ready(services: Services, say: Callable[[str], None]) -> None:
    s = services.settings
    say(f"Prefect UI: {s.ui_url}  (API {s.api_url}); reports: {s.reports_url}")
    for name in services.deployments:
        schedule = f"  cron {s.nightly_cron!r} in {s.timezone}" if name == "nightly-retrain" else ""
        say(f"  deployment {name}{schedule}")
    say(f"  workspace {s.workspace}; work pool {s.pool!r}; database {_database_label(s)}; logs {services.log_dir}")
    say(f"  export PREFECT_API_URL={s.api_url}  # to use this server from another shell")
    say("ready: Ctrl-C stops the worker, then the server")


def _database_label(settings: ServeSettings) -> str:
    if settings.database_url:
        return redact(settings.database_url)
    return f"SQLite {settings.prefect_home / 'prefect.db'}"


def _deployment_specs(prefect_file: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(prefect_file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ServeError(f"cannot read {prefect_file}: {' '.join(str(error).split())}") from None
    specs = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(specs, list) or not all(isinstance(s, dict) and "entrypoint" in s for s in specs):
        raise ServeError(f"{prefect_file} has no list of deployments with name and entrypoint")
    return specs


def _entrypoint_problem(entrypoint: str, workspace: Path) -> str:
    """Why ``entrypoint`` does not resolve ("" when it does): a ``path.py:flow`` script relative to the workspace,
    or Prefect's module form ``package.module.flow``, importable here (the installed lesionflow flows)."""
    import importlib.util

    if ":" in entrypoint:
        target = entrypoint.rsplit(":", 1)[0]
        return "" if (workspace / target).is_file() else f"{target} is not in {workspace}"
    target = entrypoint.rsplit(".", 1)[0]
    try:
        found = importlib.util.find_spec(target) is not None
    except (ImportError, ValueError):
        found = False
    return "" if found else f"module {target} is not importable (is lesionflow installed in this environment?)"


def _check_port_free(port: int) -> None:
    # Same test as uvicorn's bind (SO_REUSEADDR), so "free" here means the server can bind it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise ServeError(
                f"port {port} on {HOST} is already in use (another Prefect server or lesionflow serve?); "
                f"stop that process or pick another port: lesionflow serve --port {port + 1}"
            ) from None


def _prefect() -> str:
    """The ``prefect`` program of this environment (never one found first on PATH)."""
    return str(Path(sys.executable).with_name("prefect"))


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name (field 2) may hold spaces and parentheses: split after its closing one
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _terminate(proc: subprocess.Popen[bytes], label: str, say: Callable[[str], None]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        say(f"the {label} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it")
        proc.kill()
        proc.wait()


def _last_error_line(log: Path) -> str:
    """The most telling line of a log: the last one that names an error, else the last non-empty one."""
    with contextlib.suppress(OSError):
        lines = [" ".join(line.split()) for line in log.read_text(errors="replace").splitlines() if line.strip()]
        flagged = [line for line in lines if any(w in line for w in ("Error", "error", "Exception", "failed"))]
        if flagged or lines:
            return (flagged or lines)[-1][:300]
    return "(no output)"


def _iso_to_epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0
