"""Shared fixtures: a fresh workspace per test with the repository's params.yaml, telemetry off."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lesionflow.quiet_env import apply_quiet_env

REPO = Path(__file__).resolve().parents[1]

apply_quiet_env()

pytest_plugins = ["tests.helpers.moto_server"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty workspace (params.yaml copied from the repository) under tmp_path."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    return ws
