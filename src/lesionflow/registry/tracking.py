"""Where the MLflow registry lives, whether it answers, and how a model reference resolves to a version.

Rules kept throughout (checked against MLflow 3.17.2):

* The embedded default is a SQLite store ``<workspace>/mlruns/mlflow.db`` with artifacts in
  ``<workspace>/mlruns/artifacts``; experiments get that artifact location explicitly, otherwise MLflow puts
  artifacts under the current directory.
* An ``http(s)`` server is probed with ``GET /health`` (2 s) before any MLflow call: MLflow's own client retries
  for minutes against a dead server.
* Every MLflow call runs inside :func:`mlflow_session`, which points MLflow at the URI and shortens its HTTP
  retries, and restores the previous URIs and environment on exit: no process-global change is left behind.
* URIs are redacted (:func:`lesionflow.io.remote.redact_uri`) before they reach a message.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

from lesionflow.errors import LesionflowError
from lesionflow.io.remote import redact_uri
from lesionflow.registry.relocation import EMBEDDED_ARTIFACTS, EMBEDDED_DB, EMBEDDED_DIR, relocate_embedded_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

HEALTH_TIMEOUT_S = 2.0
MODEL_FILES = ("model.safetensors", "config.json", "metadata.json")
RETRY_HINT = (
    "start the server or set registry.tracking_uri; "
    "trained outputs are kept, rerun `lesionflow stage register` to retry"
)
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MAX_LISTED = 20
# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) keep a caller waiting for minutes.
_SESSION_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "View run ... at" on stdout would mix with CLI output
}


class RegistryUnavailable(LesionflowError):
    """The tracking server does not answer (or stopped answering during a call)."""


class ModelNotFound(LesionflowError):
    """A model name, alias, version or run id that the registry does not know."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: int
    run_id: str
    model_uri: str  # models:/<name>/<version>
    aliases: tuple[str, ...]
    source: str  # the logged model, models:/m-<id>

    @property
    def logged_model_id(self) -> str | None:
        """``m-<id>`` parsed from ``source`` (``ModelVersion.model_id`` is None in MLflow 3.17)."""
        match = re.fullmatch(r"models:/(m-[0-9a-f]+)(/.*)?", self.source)
        return match.group(1) if match else None


# --------------------------------------------------------------------------------------------- URIs


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the current directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :]).split("?", 1)[0])


def resolve_tracking_uri(configured: str, workspace_root: Path) -> str:
    """``registry.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store.

    A relative ``sqlite:///`` path is taken relative to the workspace, so every stage finds the same store.
    """
    uri = (configured or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{(Path(workspace_root) / EMBEDDED_DIR / EMBEDDED_DB).resolve()}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute() and str(db) not in ("", ":memory:"):
        return f"sqlite:///{(Path(workspace_root) / db).resolve()}"
    return uri


def default_artifact_root(tracking_uri: str) -> str | None:
    """``file://`` URI of the ``artifacts`` folder beside a SQLite store; None for a server (it decides)."""
    db = sqlite_path(tracking_uri)
    if db is None or str(db) in ("", ":memory:"):
        return None
    return (db.resolve().parent / EMBEDDED_ARTIFACTS).as_uri()


# ------------------------------------------------------------------------------------ reachability


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _health_request(uri: str) -> urllib.request.Request:
    parts = urlsplit(uri)
    headers = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        token = base64.b64encode(unquote(userinfo).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    return urllib.request.Request(url, headers=headers, method="GET")


def check_reachable(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Raise :class:`RegistryUnavailable` (one line) when an http(s) tracking server does not answer ``/health``.

    Any HTTP answer below 500 counts as reachable (an auth-protected server answers 401). Other URI schemes
    (``sqlite:``, ``file:``) are local and not probed.
    """
    if not is_http(uri):
        return
    reason = ""
    try:
        with urllib.request.urlopen(_health_request(uri), timeout=timeout_s) as response:
            response.read(64)
        return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        reason = str(err.reason)
    except (TimeoutError, OSError, ValueError) as err:
        reason = str(err) or type(err).__name__
    raise RegistryUnavailable(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({_one_line(reason)[:200]}); {RETRY_HINT}"
    )


# ----------------------------------------------------------------------------------------- session


def _is_connection_failure(err: Exception) -> bool:
    text = str(err)
    return "API request to" in text or "Max retries exceeded" in text or "Connection refused" in text


@contextmanager
def mlflow_session(tracking_uri: str) -> Iterator[MlflowClient]:
    """Point MLflow (client and fluent API) at ``tracking_uri`` with short HTTP retries; restore everything after.

    A connection failure in the middle of a call becomes :class:`RegistryUnavailable`.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    db = sqlite_path(tracking_uri)
    if db is not None:
        relocate_embedded_store(db)  # a copied workspace: its store must name the copy, not the original
    keys = (*_SESSION_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {key: os.environ.get(key) for key in keys}
    saved_tracking = tracking_utils._tracking_uri
    saved_registry = registry_utils._registry_uri
    os.environ.update(_SESSION_ENV)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except MlflowException as err:
        if is_http(tracking_uri) and _is_connection_failure(err):
            raise RegistryUnavailable(
                f"MLflow tracking server {redact_uri(tracking_uri)} stopped answering "
                f"({_one_line(redact_uri_in_text(str(err)))[:200]}); {RETRY_HINT}"
            ) from None
        raise
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]  # None is accepted: "unset"
        registry_utils._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def redact_uri_in_text(text: str) -> str:
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact_uri(m.group(0)), text)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Id of experiment ``name``, created with ``artifact_root`` (explicit for the embedded store) or restored."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name, artifact_location=artifact_root))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created concurrently by another process
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return str(experiment.experiment_id)


# ------------------------------------------------------------------------------------- model refs


def registered_models_summary(client: MlflowClient) -> str:
    """``registered models: a (@champion=v1, @candidate=v2), b (no aliases)`` or ``no models registered yet``."""
    models = list(client.search_registered_models(max_results=_MAX_LISTED + 1, order_by=["name ASC"]))
    if not models:
        return "no models registered yet"
    shown = []
    for model in models[:_MAX_LISTED]:
        aliases = sorted((getattr(model, "aliases", None) or {}).items())
        text = ", ".join(f"@{alias}=v{version}" for alias, version in aliases) or "no aliases"
        shown.append(f"{model.name} ({text})")
    more = " and more" if len(models) > _MAX_LISTED else ""
    return "registered models: " + ", ".join(shown) + more


def _not_found(client: MlflowClient, what: str) -> ModelNotFound:
    return ModelNotFound(f"{what}; {registered_models_summary(client)}")


def _is_missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _aliases_of(client: MlflowClient, name: str, version: int) -> tuple[str, ...]:
    model = client.get_registered_model(name)
    return tuple(sorted(a for a, v in (model.aliases or {}).items() if int(v) == version))


def _resolved(client: MlflowClient, mv: ModelVersion) -> ResolvedModel:
    version = int(mv.version)
    return ResolvedModel(
        name=mv.name,
        version=version,
        run_id=str(mv.run_id or ""),
        model_uri=f"models:/{mv.name}/{version}",
        aliases=_aliases_of(client, mv.name, version),
        source=str(mv.source or ""),
    )


def _resolve_by_run(client: MlflowClient, run_id: str) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if _is_missing(err):
            raise _not_found(client, f"run {run_id} not found") from None
        raise
    versions = list(client.search_model_versions(f"run_id = '{run_id}'"))
    if not versions:
        raise _not_found(client, f"run {run_id} produced no registered model version")
    return _resolved(client, max(versions, key=lambda mv: int(mv.version)))


def resolve_with_client(client: MlflowClient, ref: str) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    ref = ref.strip().removeprefix("models:/")
    if _RUN_ID.fullmatch(ref):
        return _resolve_by_run(client, ref)
    if "@" in ref:
        name, alias, version = *ref.rsplit("@", 1), None
    elif re.fullmatch(r".+/\d+", ref):
        name, number = ref.rsplit("/", 1)
        alias, version = None, int(number)
    else:
        raise _not_found(client, f"model reference {ref!r} is not name@alias, name/version or a 32-hex run id")
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if _is_missing(err):
            raise _not_found(client, f"model {name!r} not found") from None
        raise
    if alias is not None:
        if alias not in (model.aliases or {}):
            raise _not_found(client, f"model {name!r} has no alias {alias!r}")
        version = int(model.aliases[alias])
    assert version is not None
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        if _is_missing(err):
            raise _not_found(client, f"model {name!r} has no version {version}") from None
        raise
    return _resolved(client, mv)


def require_store(tracking_uri: str) -> None:
    """Reads never create a store: a missing SQLite file means nothing was registered there."""
    check_reachable(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and str(db) not in ("", ":memory:") and not db.is_file():
        raise ModelNotFound(
            f"no models registered yet (no MLflow store at {db}); run `lesionflow stage register` first"
        )


def resolve_model_ref(ref: str, tracking_uri: str) -> ResolvedModel:
    """Resolve ``name@alias``, ``name/version`` (``models:/`` prefix optional) or a run id to one model version.

    Raises:
        ModelNotFound: one line naming the part that was not found and listing the registered models.
        RegistryUnavailable: the tracking server does not answer.
    """
    require_store(tracking_uri)
    with mlflow_session(tracking_uri) as client:
        return resolve_with_client(client, ref)


def download_model_files(ref: str, tracking_uri: str, dest: Path) -> Path:
    """Download model.safetensors, config.json and metadata.json of model version ``ref`` into ``dest``."""
    import mlflow

    require_store(tracking_uri)
    dest = Path(dest)
    with mlflow_session(tracking_uri) as client:
        resolved = resolve_with_client(client, ref)
        with tempfile.TemporaryDirectory(prefix="lesionflow-download-") as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{resolved.model_uri}/artifacts", dst_path=tmp, tracking_uri=tracking_uri
                )
            )
            missing = [name for name in MODEL_FILES if not (local / name).is_file()]
            if missing:
                raise ModelNotFound(
                    f"{resolved.model_uri} lacks {', '.join(missing)} in its artifacts; "
                    "it was not registered by lesionflow (use a version registered by `lesionflow stage register`)"
                )
            dest.mkdir(parents=True, exist_ok=True)
            for name in MODEL_FILES:
                shutil.copyfile(local / name, dest / name)
    return dest
