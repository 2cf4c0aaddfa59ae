"""What the flows share: typed params sections merged over params.yaml, the workspace lock, and running stages.

Every flow is ``run_flow(title, stage names, ...)``: it resolves the params, takes the workspace lock for the
whole run, runs the stages in order as ``lesionflow.tasks.stages.run_stage`` tasks, records each one in dvc.lock, and
publishes a table of the stages. Flows never call each other (a nested flow would wait for the lock its
caller holds): they share this module instead.

Failures a user can fix (a failed gate, bad params, a missing prerequisite, a busy workspace) end the flow in a
``Failed`` state whose message is the one-line error; a caller that invoked the flow directly (``lesionflow
run``) gets the error itself back, raised, with its findings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect.states import Failed, State
from pydantic import BaseModel

from lesionflow.caching import matching_record, read_record, status
from lesionflow.dvc import is_dvc_repo
from lesionflow.errors import LesionflowError
from lesionflow.files import file_system_error
from lesionflow.params import (
    SECRET_OVERRIDES_ENV,
    Params,
    apply_overrides,
    check_params_paths,
    deep_merge,
    load_params,
    read_params_file,
    restore_secret_overrides,
    validate_params,
)
from lesionflow.stages.registry import STAGES
from lesionflow.workspace import Workspace
from lesionflow.workspace_lock import LOCK_DIR, workspace_lock

# How long a flow waits for another run in the same workspace by default. A nightly run started while someone's
# manual run is still going waits for it; an hour bounds a run stuck behind a hung one.
DEFAULT_LOCK_TIMEOUT_S = 3600.0


def section_overrides(sections: Mapping[str, BaseModel | None]) -> dict[str, Any]:
    """The keys each given section fills in, nested like params.yaml; an empty key (None) is not given.

    A section is a partial model (``lesionflow.flows.forms.Overrides``): the Prefect form submits only the keys
    typed into it, ``--param`` and Python callers only the keys they name; params.yaml keeps every other value.
    Sections and nested sections left empty give nothing.
    """

    def filled(model: BaseModel) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key in type(model).model_fields:
            value = getattr(model, key)
            if isinstance(value, BaseModel):  # a nested section: its own filled keys, if any
                value = filled(value) or None
            elif value is not None:  # a value (a mapping too) is given whole
                value = model.model_dump(mode="json", include={key})[key]
            if value is not None:
                values[key] = value
        return values

    given = {name: filled(model) for name, model in sections.items() if model is not None}
    return {name: values for name, values in given.items() if values}


def resolve_params(
    ws: Workspace, params_file: str, overrides: Sequence[str] | None, sections: Mapping[str, BaseModel | None]
) -> Params:
    """params.yaml, then the typed section overrides, then ``section.key=value`` overrides; validated once."""
    raw = read_params_file(ws.path(params_file))
    merged = deep_merge(raw, section_overrides(sections))
    # `lesionflow run` hands Prefect (which stores flow parameters) the overrides with URL credentials redacted and
    # the originals through the environment of this process (lesionflow.cli._prefect_flow_call).
    given = restore_secret_overrides(list(overrides or []), os.environ.get(SECRET_OVERRIDES_ENV))
    params = validate_params(apply_overrides(merged, given))
    check_params_paths(ws.root, params)
    return params


def matches_workspace_params(ws: Workspace, params: Params) -> bool:
    """True when ``params`` equal the workspace's params.yaml, the file dvc.yaml (and so dvc.lock) reads."""
    try:
        return ws.params_file.exists() and load_params(ws.params_file) == params
    except LesionflowError:
        return False


def require_done(ws: Workspace, params: Params, first: str, flow_title: str) -> None:
    """Refuse (one line) when a stage before ``first`` never ran in ``ws``; print a line for stale ones.

    A stale prerequisite is only reported: it may be stale because this run overrides a params section that
    the earlier stage also reads, and its outputs are still consistent with each other.
    """
    before = list(STAGES)[: list(STAGES).index(first)]
    missing = [name for name in before if read_record(ws, name) is None]
    if missing:
        raise LesionflowError(
            f"{flow_title} starts at {first} and needs the stages before it done in {ws.root}; never run there: "
            f"{', '.join(missing)}. Run the training pipeline (lesionflow run -w {ws.root}) or those stages "
            f"first (lesionflow stage {missing[0]} -w {ws.root}, and so on)"
        )
    stale = [row for row in status(ws, params) if row.stage in before and not row.up_to_date]
    for row in stale:
        print(f"{flow_title}: note: prerequisite {row.stage} is stale ({row.reason}); using its current outputs")


def _print_findings(stage: str, result: dict[str, Any]) -> None:
    for finding in result["findings"]:
        print(f"{stage}: {finding['subject']}: {finding['detail']} [{finding['code']}]")


def _raise_if_failed(state: State[Any], what: str) -> None:
    """Raise the error a failed (or crashed, cancelled) task state carries; the flow turns it into its failure."""
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        error = state.result(raise_on_failure=False)
        raise error if isinstance(error, BaseException) else LesionflowError(f"{what}: {state.message}")


def run_stages(
    names: Sequence[str],
    ws: Workspace,
    params: Params,
    *,
    record_in_dvc: bool,
    results: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``names`` in order as stage tasks; after each, record it in dvc.lock when ``record_in_dvc``.

    With ``storage.remote`` set, the stage tasks keep their results there, each stage's Zarr stores are
    published there after it (also when the stage was up to date: a run that died while publishing leaves the
    copy behind), and the recorded data is pushed to its DVC remote at the end.

    Each finished stage's result is appended to ``results`` (a new list when None), which is returned. Raises
    the stage's :class:`LesionflowError` when one fails (its artifacts are already published); the stages after
    it do not run, and ``results`` holds those that finished. Outside a DVC repository nothing is recorded (and
    no dvc-commit task runs).
    """
    from lesionflow.tasks.stages import dvc_commit, run_stage
    from lesionflow.tasks.storage import dvc_push, publish_stage_stores, result_storage, with_retries

    results = [] if results is None else results
    in_dvc = is_dvc_repo(ws)
    remote = params.storage.remote
    results_on = result_storage(params.storage)  # None: Prefect's default (local) result storage
    stage_task = run_stage.with_options(result_storage=results_on) if results_on is not None else run_stage
    publish = with_retries(publish_stage_stores, params.storage)
    for stage in names:
        state = stage_task(stage, str(ws.root), params, return_state=True)
        _raise_if_failed(state, stage)
        result: dict[str, Any] = state.result()
        _print_findings(stage, result)
        if not in_dvc or (result["cached"] and dvc_recorded(ws, stage)):
            pass  # no DVC repository to record it in, or dvc.lock already holds this state of the stage
        elif not record_in_dvc:
            print(
                f"{stage}: not recorded in dvc.lock (this run's params differ from params.yaml, which dvc.lock follows)"
            )
        else:
            _raise_if_failed(dvc_commit(str(ws.root), ["data.dvc", stage], return_state=True), f"dvc commit {stage}")
            mark_dvc_recorded(ws, stage)
        if remote and STAGES[stage].zarr_stores:
            stores = list(STAGES[stage].zarr_stores)
            _raise_if_failed(publish(stage, str(ws.root), remote, stores, return_state=True), f"publish {stage}")
        results.append(result)
    if remote and in_dvc and record_in_dvc:
        _raise_if_failed(with_retries(dvc_push, params.storage)(str(ws.root), remote, return_state=True), "dvc push")
    return results


def _dvc_mark(ws: Workspace, stage: str) -> Path:
    return ws.root / LOCK_DIR / "dvc-recorded" / stage


def dvc_recorded(ws: Workspace, stage: str) -> bool:
    """True when the flow recorded the stage's current state (its cache key) in dvc.lock.

    A run killed between a stage and its ``dvc commit`` leaves the stage done but unrecorded; the rerun finds the
    stage up to date (no work), and this tells it that the commit is still owed. Marks live in ``.lesionflow/``
    (ignored by git, not a DVC output), never in an output folder, where they would change DVC's digests.
    """
    record = read_record(ws, stage)
    mark = _dvc_mark(ws, stage)
    return record is not None and record["key"] is not None and mark.is_file() and mark.read_text() == record["key"]


def mark_dvc_recorded(ws: Workspace, stage: str) -> None:
    record = read_record(ws, stage)
    mark = _dvc_mark(ws, stage)
    mark.parent.mkdir(parents=True, exist_ok=True)
    if record is not None and record["key"] is not None:
        mark.write_text(record["key"])
    else:
        mark.unlink(missing_ok=True)


@contextlib.contextmanager
def shared_dask_cluster(ws: Workspace, params: Params, names: Sequence[str]) -> Iterator[None]:
    """One local Dask cluster for the run's Dask stages that have work to do and no scheduler of their own.

    Without it preprocess and synthesize would each start (and import torch, zarr... in) their own worker
    processes. Nothing starts when every such stage is up to date or points at a running scheduler.
    """
    from lesionflow.parallel import run_cluster

    own = {"preprocess": params.preprocess.scheduler_address, "synthesize": params.synth.scheduler_address}
    order = list(STAGES)
    last = max((order.index(n) for n in names if STAGES[n].uses_dask and not own.get(n)), default=-1)
    # Such a stage has work when it, or a stage before it, is not up to date; the scan stops at the first stale
    # stage and never reaches the later ones (whose states query the model registry).
    if not any(matching_record(name, ws, params) is None for name in order[: last + 1]):
        yield
        return
    workers = max(params.preprocess.workers, params.synth.workers)
    with run_cluster(workers, params.preprocess.memory_limit):
        yield


def publish_stage_table(
    flow_key: str, names: Sequence[str], results: Sequence[dict[str, Any]], failed: tuple[str, str] | None = None
) -> None:
    """A table of this run's stages (ok / up to date / failed / not run, outputs) on the flow run.

    ``failed`` is (stage, one-line error) when a stage failed.
    """
    from lesionflow.tasks.artifacts import ArtifactSpec, publish

    done = {r["stage"]: r for r in results}
    rows = []
    for name in names:
        r = done.get(name)
        if r is not None:
            state = "up to date (no work)" if r["cached"] else "ok"
            rows.append({"stage": name, "status": state, "detail": ", ".join(r["outputs"].values())})
        elif failed is not None and failed[0] == name:
            rows.append({"stage": name, "status": "failed", "detail": failed[1]})
        else:
            rows.append({"stage": name, "status": "not run", "detail": ""})
    publish([ArtifactSpec("table", f"{flow_key}-stages", "Stages of this run, in order", table=rows)])


def fail(error: BaseException) -> Any:
    """A ``Failed`` state carrying ``error``, for a flow to return.

    Prefect ends the run Failed with the one-line message and logs no traceback; a caller that called the flow
    directly gets ``error`` raised back (Prefect's documented handling of a returned failed state).
    """
    return Failed(message=str(error), data=error)


def run_flow(
    flow_title: str,
    names: Sequence[str],
    *,
    workspace: str,
    params_file: str,
    overrides: Sequence[str] | None,
    sections: Mapping[str, BaseModel | None],
    wait_for_lock: bool,
    lock_timeout_s: float,
    before: Callable[[Workspace, Params], None] | None = None,
) -> Any:
    """The body every flow shares; returns the stage results, or a ``Failed`` state (see :func:`fail`)."""
    results: list[dict[str, Any]] = []
    running = False  # True once stages run: a failure after that belongs to stage names[len(results)]
    try:
        ws = Workspace.at(workspace)
        params = resolve_params(ws, params_file, overrides, sections)
        with workspace_lock(ws.root, wait=wait_for_lock, timeout_s=lock_timeout_s, purpose=f"flow {flow_title}"):
            if before is not None:
                before(ws, params)
            running = True
            with shared_dask_cluster(ws, params, names):
                run_stages(names, ws, params, record_in_dvc=matches_workspace_params(ws, params), results=results)
    except (LesionflowError, OSError) as caught:
        # a read-only folder or a full disk inside a stage is one line naming the path, like any user error
        error = file_system_error(caught) if isinstance(caught, OSError) else caught
        if error is None:
            raise
        print(f"{flow_title} failed: {error}")
        if running:
            publish_stage_table(flow_title, names, results, (names[len(results)], str(error)))
        return fail(error)
    publish_stage_table(flow_title, names, results)
    return results
