"""One Prefect task per registered stage, with a content-hash cache key and persisted JSON results.

The cache key is ``stage_cache_key(stage, code version, params section(s), digests)``. The data part is
digests of bytes (the source tree for ingest, data/raw's manifest for later stages), never mtimes. Two
more entries make a hit mean "these outputs already exist here": the workspace the stage writes into
(a stage's outputs are side effects in it) and whether the stage's own summary exists, so deleted
outputs are a miss (their content is covered by the data digests). A rerun with nothing changed
therefore computes once more (its summary now exists) and hits from then on. Results hold the
StageResult summary, never volumes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from lesionflow.hashing import sha256_tree, stage_cache_key
from lesionflow.params import Params, validate_params
from lesionflow.stages import STAGES
from lesionflow.stages.base import CODE_VERSION
from lesionflow.stages.ingest import raw_digest
from lesionflow.workspace import Workspace


def _param_values(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    dumped = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def input_digests(stage: str, ws: Workspace, params: Params) -> dict[str, str] | None:
    """Digests of what ``stage`` reads; None when they cannot be known cheaply (then: no caching)."""
    from lesionflow.io.remote import is_remote

    summary = ws.stage_report_dir(stage) / "summary.json"
    digests = {
        "raw": raw_digest(ws),
        "workspace": str(ws.root),
        "own_summary": "present" if summary.exists() else "absent",
    }
    if stage == "ingest":
        if is_remote(params.ingest.source):
            return None  # a remote prefix's content is only known after mirroring it
        source = ws.path(params.ingest.source)
        if not source.exists():
            return None
        digests["source"] = sha256_tree(source if source.is_dir() else source.parent)
    return digests


def cache_key(context: TaskRunContext, arguments: dict[str, Any]) -> str | None:
    """Prefect ``cache_key_fn``: stage + code version + params section + input digests."""
    stage = arguments["stage"]
    ws = Workspace.at(arguments["workspace"])
    params = validate_params(arguments["params"])
    digests = input_digests(stage, ws, params)
    if digests is None:
        return None
    return stage_cache_key(stage, CODE_VERSION, _param_values(params, STAGES[stage].params), digests)


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
    result = STAGES[stage].run(Workspace.at(workspace), validate_params(params))
    return result.to_json()


@task(name="dvc-commit", retries=0)
def dvc_commit(workspace: str, targets: list[str]) -> bool:
    """Record the outputs of stages run by the flow in dvc.lock / data.dvc (DVC holds a repo lock: serial)."""
    from lesionflow.dvc import commit

    return commit(Workspace.at(workspace), targets)
