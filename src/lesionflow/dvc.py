"""Calls to the DVC command line (the flow records its outputs so `dvc status` stays clean, then pushes them)."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from lesionflow.errors import LesionflowError
from lesionflow.workspace import Workspace

# The remote the flow pushes to when storage.remote is set; configured in .dvc/config.local (machine-local, not
# versioned), so a team's own default remote in .dvc/config is left alone.
STORAGE_REMOTE = "lesionflow-storage"
# Words of DVC/botocore failures that retrying may cure (the endpoint did not answer).
_TRANSIENT = ("connect", "timed out", "timeout", "temporarily", "503", "500 ", "slowdown")


def is_dvc_repo(ws: Workspace) -> bool:
    return (ws.root / ".dvc").is_dir()


def _dvc(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ws.root, capture_output=True, text=True, check=False
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("ERROR")]
    return " ".join(lines[-1].split()) if lines else f"exit status {proc.returncode}"


def commit(ws: Workspace, targets: list[str]) -> bool:
    """``dvc commit -f TARGETS`` in the workspace; False (and nothing done) outside a DVC repository."""
    if not is_dvc_repo(ws):
        return False
    targets = [t for t in targets if not t.endswith(".dvc") or (ws.root / t).exists()]
    proc = _dvc(ws, "commit", "-f", *targets)
    if proc.returncode != 0:
        raise LesionflowError(f"dvc commit {' '.join(targets)} failed: {_error_line(proc)}")
    return True


def push(ws: Workspace, url: str) -> int:
    """Push what dvc.lock and data.dvc record to the DVC remote at ``url`` (s3://...); returns the files pushed.

    The remote is (re)configured as ``lesionflow-storage`` in ``.dvc/config.local``; the endpoint and credentials
    come from the AWS_* environment (dvc-s3 reads it). Outside a DVC repository nothing is pushed (0).

    Raises:
        StorageError: one line naming the remote and DVC's message; StorageUnavailable when the endpoint did not
            answer (worth retrying).
    """
    from lesionflow.io.publish import StorageError, StorageUnavailable
    from lesionflow.io.remote import redact_uri

    if not is_dvc_repo(ws):
        return 0
    added = _dvc(ws, "remote", "add", "--local", "--force", STORAGE_REMOTE, url)
    if added.returncode != 0:
        raise StorageError(f"cannot configure the DVC remote {redact_uri(url)}: {_error_line(added)}")
    proc = _dvc(ws, "push", "--remote", STORAGE_REMOTE)
    if proc.returncode != 0:
        message = _error_line(proc)
        kind = StorageUnavailable if any(w in message.lower() for w in _TRANSIENT) else StorageError
        raise kind(f"dvc push to {redact_uri(url)} failed: {message}; check AWS_ENDPOINT_URL, the bucket, credentials")
    pushed = re.search(r"(\d+) files? pushed", proc.stdout)  # "Everything is up to date." when none
    return int(pushed.group(1)) if pushed else 0


DVC_YAML_HEADER = """\
# Generated from the stage registry (lesionflow.stages) and the artifact catalog (lesionflow.catalog.artifacts)
# by `lesionflow dvc-yaml`; tests/test_dvc_consistency.py fails on any difference. Do not edit by hand.
# Every cmd is the same function the Prefect flow runs.
"""


def dvc_stages() -> dict[str, dict[str, Any]]:
    """The ``stages:`` mapping of dvc.yaml, derived from each stage's declaration."""
    from lesionflow.catalog.artifacts import Dvc
    from lesionflow.stages import STAGES
    from lesionflow.stages.spec import dvc_deps

    out: dict[str, dict[str, Any]] = {}
    for name, spec in STAGES.items():
        entry: dict[str, Any] = {"cmd": f"lesionflow stage {name}", "params": list(spec.params)}
        entry["deps"] = list(dvc_deps(spec, STAGES))
        outs: list[Any] = [
            *spec.outs(Dvc.OUT),
            *({path: {"persist": True}} for path in spec.outs(Dvc.PERSIST)),
            *({path: {"cache": False}} for path in spec.outs(Dvc.REPORT)),
        ]
        if outs:
            entry["outs"] = outs
        metrics = [{a.path: {"cache": False}} for a in spec.writes if a.dvc is Dvc.METRIC]
        plots = [{a.path: {"cache": False, **_axes(a.plot_axes)}} for a in spec.writes if a.dvc is Dvc.PLOT]
        entry.update({k: v for k, v in (("metrics", metrics), ("plots", plots)) if v})
        out[name] = entry
    return out


def _axes(axes: tuple[str, str] | None) -> dict[str, str]:
    return {} if axes is None else {"x": axes[0], "y": axes[1]}


def dvc_top_level() -> dict[str, list[Any]]:
    """Metrics and plots no stage writes (the utility study's reports): dvc.yaml's top-level lists."""
    from lesionflow.catalog.artifacts import ARTIFACTS, Dvc

    loose = [a for a in ARTIFACTS.values() if a.producer is None]
    out: dict[str, list[Any]] = {}
    metrics = [a.path for a in loose if a.dvc is Dvc.METRIC]
    plots = [{a.path: _axes(a.plot_axes)} for a in loose if a.dvc is Dvc.PLOT]
    if metrics:
        out["metrics"] = metrics
    if plots:
        out["plots"] = plots
    return out


def render_dvc_yaml() -> str:
    """dvc.yaml's exact text: the header, then the derived stages and top-level metrics and plots."""
    import yaml

    body = {"stages": dvc_stages(), **dvc_top_level()}
    return DVC_YAML_HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
