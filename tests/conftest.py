"""Shared fixtures: a fresh workspace per test with the repository's params.yaml, telemetry off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lesionflow.cli import QUIET_ENV

REPO = Path(__file__).resolve().parents[1]

for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

pytest_plugins = ["tests.helpers.moto_server"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty workspace (params.yaml copied from the repository) under tmp_path."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    return ws
