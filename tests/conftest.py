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


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preprocessed synthesis workspace, built once per session (users copy it, never change it)."""
    from tests.stages.test_synthesis import build_prepared

    return build_prepared(tmp_path_factory)


@pytest.fixture(scope="session")
def synthesized(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepared`` after the synthesis stages, built once per session (users copy it, never change it)."""
    from tests.stages.test_synthesis import build_synthesized

    return build_synthesized(prepared, tmp_path_factory)
