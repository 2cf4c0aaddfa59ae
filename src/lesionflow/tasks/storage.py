"""Prefect tasks at the team-storage edge: publish a stage's Zarr stores, push the DVC data, store task results.

These are the flow's S3 calls, so they are the ones retried: only when the endpoint did not answer
(:class:`StorageUnavailable`), ``storage.retries`` times with a doubling backoff from ``storage.retry_delay_s``.
A missing bucket or denied access fails at once with its one line. Nothing here runs when ``storage.remote`` is
empty.
"""

from __future__ import annotations

from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.filesystems import RemoteFileSystem
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from lesionflow.errors import LesionflowError
from lesionflow.hashing import sha256_bytes
from lesionflow.io.publish import StorageUnavailable, publish_tree, remote_url
from lesionflow.params import StorageParams
from lesionflow.workspace import Workspace

P = ParamSpec("P")
R = TypeVar("R")

RESULTS_PREFIX = "prefect-results"  # under storage.remote
DVC_PREFIX = "dvc"


def storage_unavailable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn``: retry only when the storage endpoint did not answer."""
    return isinstance(state.data, StorageUnavailable)


def _failed(error: LesionflowError) -> Any:
    get_run_logger().error("%s", error)
    return Failed(message=str(error), data=error)  # one line in the UI, no traceback; the flow raises it


@task(name="publish", task_run_name="publish-{stage}", retry_condition_fn=storage_unavailable)
def publish_stage_stores(stage: str, workspace: str, remote: str, stores: list[str]) -> list[dict[str, Any]]:
    """Publish the Zarr stores ``stores`` (workspace-relative) of ``stage`` to ``<remote>/<path>``."""
    ws = Workspace.at(workspace)
    out = []
    try:
        for rel in stores:
            if not ws.path(rel).is_dir():
                continue  # the stage wrote none this time (e.g. no PIE trajectories)
            result = publish_tree(ws.path(rel), remote_url(remote, rel))
            print(f"{stage}: published {rel} -> {result.url} ({result.n_uploaded} of {result.n_files} files sent)")
            out.append({"path": rel, "url": result.url, "uploaded": result.n_uploaded, "digest": result.digest})
    except LesionflowError as error:
        return _failed(error)
    return out


@task(name="dvc-push", retry_condition_fn=storage_unavailable)
def dvc_push(workspace: str, remote: str) -> int:
    """``dvc push`` of the recorded data to ``<remote>/dvc``."""
    from lesionflow.dvc import push

    try:
        n = push(Workspace.at(workspace), remote_url(remote, DVC_PREFIX))
    except LesionflowError as error:
        return _failed(error)
    print(f"dvc: {n} file(s) pushed to {remote_url(remote, DVC_PREFIX)}")
    return n


def with_retries(storage_task: Task[P, R], storage: StorageParams) -> Task[P, R]:
    """The task with the configured number of retries and backoff delays."""
    return storage_task.with_options(retries=storage.retries, retry_delay_seconds=storage.retry_delays())


def result_storage(storage: StorageParams) -> RemoteFileSystem | None:
    """Where stage tasks persist their results (and so their cache records): ``<remote>/prefect-results``.

    s3fs reads the endpoint and credentials from the environment, as everywhere else; None = Prefect's default.
    Prefect wants the block saved on the server (the result records refer to it); its name is derived from the
    URL, so every run with the same storage reuses one block.
    """
    if not storage.remote:
        return None
    url = remote_url(storage.remote, RESULTS_PREFIX)
    block = RemoteFileSystem(basepath=url)
    block.save(f"lesionflow-results-{sha256_bytes(url.encode())[:12]}", overwrite=True)
    return block
