"""Calls to the DVC command line (the flow records its outputs so `dvc status` stays clean)."""

from __future__ import annotations

import subprocess
import sys

from lesionflow.errors import LesionflowError
from lesionflow.workspace import Workspace


def is_dvc_repo(ws: Workspace) -> bool:
    return (ws.root / ".dvc").is_dir()


def commit(ws: Workspace, targets: list[str]) -> bool:
    """``dvc commit -f TARGETS`` in the workspace; False (and nothing done) outside a DVC repository."""
    if not is_dvc_repo(ws):
        return False
    targets = [t for t in targets if not t.endswith(".dvc") or (ws.root / t).exists()]
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", *targets],
        cwd=ws.root,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("ERROR")]
        raise LesionflowError(f"dvc commit {' '.join(targets)} failed: {lines[-1] if lines else proc.returncode}")
    return True
