"""Stage-level content-hash caching, shared by the CLI, dvc.yaml commands and the Prefect tasks.

A stage's state = code version + its params keys + the workspace + digests (bytes only) of its inputs
and of its outputs as they are now. Its key is the digest of that state. After a stage runs, the state
is measured again and written to ``reports/<stage>/stage.json`` with the result; a later call whose
current state has that same key does no work and returns the recorded result. Because outputs are part
of the state, a deleted or edited output is a miss; because the state is taken after the run, a stage
whose run changes its own inputs (the raw gate moves cases out of data/raw) is still a hit next time.
``lesionflow status`` compares the parts to say what changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionflow.catalog.artifacts import Kind, stage_report_dir
from lesionflow.catalog.digests import digest
from lesionflow.errors import Finding
from lesionflow.files import write_json
from lesionflow.hashing import sha256_json
from lesionflow.params import Params
from lesionflow.stages.base import CODE_VERSION, StageResult
from lesionflow.workspace import Workspace


def param_values(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    dumped = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def stage_state(name: str, ws: Workspace, params: Params) -> dict[str, Any] | None:
    """The parts of a stage's key, derived from its declaration (params keys, reads, writes).

    None when the stage has no key: it writes remote state, or one of its inputs cannot be digested cheaply
    (an s3:// source, the model registry).
    """
    from lesionflow.stages.registry import STAGES

    spec = STAGES[name]
    if spec.writes_remote:
        return None
    inputs = {a.name: digest(a, ws, params) for a in spec.reads}
    if any(value is None for value in inputs.values()):
        return None
    return {
        "stage": name,
        "code": CODE_VERSION,
        "workspace": str(ws.root),
        "params": param_values(params, spec.params),
        "inputs": inputs,
        "outputs": {a.name: digest(a, ws, params) for a in spec.state_outputs},
    }


def record_path(ws: Workspace, name: str) -> Path:
    return stage_report_dir(ws, name) / "stage.json"


def read_record(ws: Workspace, name: str) -> dict[str, Any] | None:
    path = record_path(ws, name)
    return json.loads(path.read_text()) if path.exists() else None


def matching_record(name: str, ws: Workspace, params: Params) -> dict[str, Any] | None:
    """The stage's record when its current state has the recorded key (the stage is up to date), else None."""
    record = read_record(ws, name)
    if record is None or record["key"] is None:
        return None  # never ran, or reads remote state: no key to match
    state = stage_state(name, ws, params)
    return record if state is not None and record["key"] == sha256_json(state) else None


def run_cached(
    name: str, ws: Workspace, params: Params, run: Callable[[Workspace, Params], StageResult]
) -> StageResult:
    """Run stage ``name`` unless its current state matches the recorded one; record the state after a run."""
    record = matching_record(name, ws, params)
    if record is not None:
        r = record["result"]
        findings = tuple(Finding(**f) for f in r["findings"])
        return StageResult(r["stage"], r["ok"], r["summary"], r["outputs"], findings, cached=True)
    result = run(ws, params)
    after = stage_state(name, ws, params)
    # A stage that reads remote state (s3:// source, model registry) has no key, but its record says it ran.
    key = None if after is None else sha256_json(after)
    write_json(record_path(ws, name), {"key": key, "state": after, "result": result.to_json()})
    return result


@dataclass(frozen=True)
class StageStatus:
    stage: str
    up_to_date: bool
    reason: str


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = []
    old = {**old, "params": _flatten(old.get("params", {}), "")}
    new = {**new, "params": _flatten(new.get("params", {}), "")}
    for part in ("code", "workspace"):
        if old.get(part) != new.get(part):
            changed.append(f"{part} changed")
    for part in ("params", "inputs", "outputs"):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                what = "missing" if b.get(key) == "absent" else "changed"
                changed.append(f"{part[:-1] if part != 'params' else 'param'} {key} {what}")
    return "; ".join(changed) or "state changed"


def _keyless_reason(name: str, ws: Workspace, params: Params) -> str:
    """Why a stage has no key, from its declaration: the remote state it writes or the inputs it cannot digest."""
    from lesionflow.stages.registry import STAGES

    spec = STAGES[name]
    if spec.writes_remote:
        written = ", ".join(a.description.split(":")[0] for a in spec.writes if a.kind is Kind.REMOTE)
        return f"writes remote state ({written}): runs every time"
    unknown = [a for a in spec.reads if digest(a, ws, params) is None]
    what = ", ".join(f"{a.name} ({a.param_key or a.path})" for a in unknown)
    return f"reads remote state ({what}): rechecked on every run"


def status(ws: Workspace, params: Params) -> list[StageStatus]:
    """For each registered stage in pipeline order: up to date, or stale with the reason."""
    from lesionflow.stages.registry import STAGES

    out: list[StageStatus] = []
    for name in STAGES:
        record = read_record(ws, name)
        state = stage_state(name, ws, params)
        stale_before = [s.stage for s in out if not s.up_to_date]
        if record is None:
            out.append(StageStatus(name, False, "never run"))
        elif state is None or record["key"] is None:
            out.append(StageStatus(name, False, _keyless_reason(name, ws, params)))
        elif record["key"] != sha256_json(state):
            out.append(StageStatus(name, False, _diff(record["state"], state)))
        elif stale_before:
            out.append(StageStatus(name, False, f"runs after stale stage {stale_before[-1]}"))
        else:
            out.append(StageStatus(name, True, "up to date"))
    return out
