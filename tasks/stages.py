"""One Prefect task per registered stage, with a content-hash cache key and persisted JSON results.

The key is the digest of the stage's state as ``lesionflow.caching`` defines it (code version, params
keys, workspace, digests of inputs and outputs: bytes, never mtimes), the same state the CLI and
``dvc repro`` path uses to skip work. Inside the task ``run_cached`` also skips a stage whose recorded
state still matches, so both caches agree. Results hold the StageResult summary, never volumes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from lesionflow.caching import read_record, run_cached, stage_state
from lesionflow.hashing import sha256_json
from lesionflow.params import validate_params
from lesionflow.stages import STAGES
from lesionflow.workspace import Workspace


def cache_key(context: TaskRunContext, arguments: dict[str, Any]) -> str | None:
    """Prefect ``cache_key_fn``: the digest of the stage's state (lesionflow.caching.stage_state).

    Only offered when this workspace's own record (written after the stage last ran here) has that same
    state: before a first run the state of a fresh workspace is the same as that of a deleted one that was
    recreated at the same path, and a key computed then would let Prefect skip work whose outputs are gone.
    """
    ws = Workspace.at(arguments["workspace"])
    state = stage_state(arguments["stage"], ws, validate_params(arguments["params"]))
    if state is None:
        return None
    key = sha256_json(state)
    record = read_record(ws, arguments["stage"])
    return key if record is not None and record["key"] == key else None


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
    with _flow_run_env():
        result = run_cached(stage, Workspace.at(workspace), validate_params(params), STAGES[stage].run)
    return result.to_json()


@contextmanager
def _flow_run_env() -> Iterator[None]:
    """Expose the Prefect flow-run id to the stage (register records it as lineage); restored afterwards.

    Stages never import Prefect, so the adapter hands the id over through the environment.
    """
    from prefect.runtime import flow_run

    from lesionflow.stages.register import FLOW_RUN_ENV

    before = os.environ.get(FLOW_RUN_ENV)
    run_id = flow_run.id
    if run_id:
        os.environ[FLOW_RUN_ENV] = str(run_id)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FLOW_RUN_ENV, None)
        else:
            os.environ[FLOW_RUN_ENV] = before


@task(name="dvc-commit", retries=0)
def dvc_commit(workspace: str, targets: list[str]) -> bool:
    """Record the outputs of stages run by the flow in dvc.lock / data.dvc (DVC holds a repo lock: serial)."""
    from lesionflow.dvc import commit

    return commit(Workspace.at(workspace), targets)
