"""One Prefect task per registered stage, with a content-hash cache key and persisted JSON results.

The key is the digest of the stage's state as ``lesionflow.caching`` defines it (code version, params
keys, workspace, digests of inputs and outputs: bytes, never mtimes), the same state the CLI and
``dvc repro`` path uses to skip work. Inside the task ``run_cached`` also skips a stage whose recorded
state still matches, so both caches agree. Results hold the StageResult summary, never volumes.

Failures and retries:

* A problem the user can fix (:class:`LesionflowError`: a failed gate, bad params, missing inputs) ends the task
  in a ``Failed`` state carrying the error, rather than raising it: the run shows the one-line message and the
  gate's artifacts, and Prefect logs no traceback for it. The flow turns that state into its own failure.
* Stages are not retried: they are deterministic, so a rerun fails the same way. The exceptions are the I/O
  edges: a stage that failed because the MLflow server did not answer (``RegistryUnavailable``; register and the
  gates that read the registry are idempotent) and ``dvc commit`` finding DVC's repository lock taken (a
  ``dvc status`` run by hand, say). Both are retried with backoff.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from lesionflow.caching import read_record, run_cached, stage_state
from lesionflow.errors import GateFailed, LesionflowError
from lesionflow.hashing import sha256_json
from lesionflow.params import Params
from lesionflow.stages.registry import STAGES
from lesionflow.tasks.artifacts import publish, stage_artifacts
from lesionflow.workspace import Workspace

# Backoff for the I/O edges: an MLflow server restarting takes tens of seconds; a DVC lock is held for seconds.
REGISTRY_RETRY_DELAYS_S: list[float] = [10.0, 30.0, 90.0]
DVC_RETRY_DELAYS_S: list[float] = [2.0, 5.0, 15.0]


def cache_key(context: TaskRunContext, arguments: dict[str, Any]) -> str | None:
    """Prefect ``cache_key_fn``: the digest of the stage's state (lesionflow.caching.stage_state).

    Only offered when this workspace's own record (written after the stage last ran here) has that same
    state: before a first run the state of a fresh workspace is the same as that of a deleted one that was
    recreated at the same path, and a key computed then would let Prefect skip work whose outputs are gone.
    """
    ws = Workspace.at(arguments["workspace"])
    state = stage_state(arguments["stage"], ws, arguments["params"])
    if state is None:
        return None
    key = sha256_json(state)
    record = read_record(ws, arguments["stage"])
    return key if record is not None and record["key"] == key else None


def _error_of(state: State[Any]) -> BaseException | None:
    """The exception a failed state carries (Prefect wraps a raised one as ``Failed(data=exc)`` for the check)."""
    data = state.data
    return data if isinstance(data, BaseException) else None


def registry_unreachable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn`` of the stage task: retry only when the MLflow server did not answer."""
    from lesionflow.registry.tracking import RegistryUnavailable

    return isinstance(_error_of(state), RegistryUnavailable)


def dvc_lock_busy(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn`` of ``dvc commit``: retry only when DVC's repository lock was taken."""
    error = _error_of(state)
    # DVC's words: "Unable to acquire lock. Most likely another DVC process is running..."; not any "dvc.lock".
    return error is not None and "acquire lock" in str(error).lower()


@task(
    name="stage",
    task_run_name="{stage}",
    cache_key_fn=cache_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    result_serializer="json",
    retries=len(REGISTRY_RETRY_DELAYS_S),
    retry_delay_seconds=REGISTRY_RETRY_DELAYS_S,
    retry_condition_fn=registry_unreachable,
)
def run_stage(stage: str, workspace: str, params: Params) -> dict[str, Any]:
    """Run registered stage ``stage`` in ``workspace`` with ``params``; publish its artifacts.

    ``params`` is the run's model, validated once by the flow and handed down as is (no JSON round trip).
    """
    ws = Workspace.at(workspace)
    try:
        run = functools.partial(STAGES[stage].run, flow_run_id=_flow_run_id())
        result = run_cached(stage, ws, params, run).to_json()
    except LesionflowError as error:
        # A failed gate wrote its report before failing: attach it to this run, then fail with the one line.
        publish(stage_artifacts(stage, ws, params, None, gate_failed=isinstance(error, GateFailed)))
        get_run_logger().error("%s failed: %s", stage, error)
        # A returned Failed state: Prefect logs no traceback for it, and the caller gets ``error`` back.
        failed: Any = Failed(message=f"{stage}: {error}", data=error)
        return failed
    publish(stage_artifacts(stage, ws, params, result))
    return result


def _flow_run_id() -> str:
    """The Prefect flow run this task belongs to ("none" outside a flow run): register records it as lineage."""
    from prefect.runtime import flow_run

    return str(flow_run.id or "none")


@task(
    name="dvc-commit",
    retries=len(DVC_RETRY_DELAYS_S),
    retry_delay_seconds=DVC_RETRY_DELAYS_S,
    retry_condition_fn=dvc_lock_busy,
)
def dvc_commit(workspace: str, targets: list[str]) -> bool:
    """Record the outputs of stages run by the flow in dvc.lock / data.dvc (DVC holds a repo lock: serial)."""
    from lesionflow.dvc import commit

    try:
        return commit(Workspace.at(workspace), targets)
    except LesionflowError as error:
        # One line, no traceback; retried by ``dvc_lock_busy`` when DVC's lock was taken, else final.
        get_run_logger().error("%s", error)
        failed: Any = Failed(message=str(error), data=error)
        return failed
