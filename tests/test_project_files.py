"""Project files (infra/prefect.yaml, presets/) are found from the workspace, never from the package's location."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lesionflow.cli import _with_preset
from lesionflow.errors import ParamsError
from lesionflow.serve import ServeError, resolve_settings

REPO = Path(__file__).resolve().parents[1]


def test_serve_refuses_a_workspace_without_the_deployments(workspace: Path) -> None:
    with pytest.raises(ServeError, match=r"has no infra/prefect\.yaml.*--workspace"):
        resolve_settings(workspace)


def test_serve_takes_the_deployments_and_flow_folder_from_the_workspace(workspace: Path) -> None:
    (workspace / "infra").mkdir()
    shutil.copy(REPO / "infra" / "prefect.yaml", workspace / "infra" / "prefect.yaml")
    settings = resolve_settings(workspace)
    assert settings.prefect_file == workspace.resolve() / "infra" / "prefect.yaml"
    assert settings.env()["LESIONFLOW_REPO"] == str(workspace.resolve())  # prefect.yaml's working directory
    assert settings.env()["LESIONFLOW_WORKSPACE"] == str(workspace.resolve())


def test_presets_come_from_the_workspace(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        _with_preset(workspace, "gpu", [])  # the package's checkout is not searched
    (workspace / "presets").mkdir()
    shutil.copy(REPO / "presets" / "gpu.yaml", workspace / "presets" / "gpu.yaml")
    from_workspace = _with_preset(workspace, "gpu", ["train.steps=3"])
    assert from_workspace[-1] == "train.steps=3"  # --set still wins, applied last
    assert from_workspace == _with_preset(tmp_path, str(REPO / "presets" / "gpu.yaml"), ["train.steps=3"])
