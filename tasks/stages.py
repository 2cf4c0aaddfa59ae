"""One Prefect task per registered stage, with a content-hash cache key and persisted JSON results.

The key is the digest of the stage's state as ``lesionflow.caching`` defines it (code version, params
keys, workspace, digests of inputs and outputs: bytes, never mtimes), the same state the CLI and
``dvc repro`` path uses to skip work. Inside the task ``run_cached`` also skips a stage whose recorded
state still matches, so both caches agree. Results hold the StageResult summary, never volumes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from lesionflow.caching import run_cached, stage_state
from lesionflow.hashing import sha256_json
from lesionflow.params import validate_params
from lesionflow.stages import STAGES
from lesionflow.workspace import Workspace


def cache_key(context: TaskRunContext, arguments: dict[str, Any]) -> str | None:
    """Prefect ``cache_key_fn``: the digest of the stage's state (lesionflow.caching.stage_state)."""
    state = stage_state(arguments["stage"], Workspace.at(arguments["workspace"]), validate_params(arguments["params"]))
    return None if state is None else sha256_json(state)


@task(
    name="stage",
    task_run_name="{stage}",
    cache_key_fn=cache_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    result_serializer="json",
)
def run_stage(stage: str, workspace: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run registered stage ``stage`` in ``workspace`` with the validated ``params``."""
    result = run_cached(stage, Workspace.at(workspace), validate_params(params), STAGES[stage].run)
    return result.to_json()


@task(name="dvc-commit", retries=0)
def dvc_commit(workspace: str, targets: list[str]) -> bool:
    """Record the outputs of stages run by the flow in dvc.lock / data.dvc (DVC holds a repo lock: serial)."""
    from lesionflow.dvc import commit

    return commit(Workspace.at(workspace), targets)
