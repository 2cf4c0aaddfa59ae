"""dvc.yaml and the stage registry cannot drift apart; `dvc repro` twice does nothing the second time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lesionflow.dvc import render_dvc_yaml
from lesionflow.stages.registry import STAGES
from tests.helpers.declarations import opened_for_reading, undeclared_reads
from tests.helpers.volumes import use_tiny_training, write_msd

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_what_the_stage_declarations_derive() -> None:
    """dvc.yaml is generated (`lesionflow dvc-yaml`); any hand edit or registry change without it fails here."""
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        spec = STAGES[name]
        assert stage["cmd"] == f"lesionflow stage {name}"
        assert tuple(stage["params"]) == spec.params
        assert spec.module_path in stage["deps"]  # the stage's own code
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        assert set(outs) >= set(spec.zarr_stores)


def test_a_changed_declaration_changes_the_derived_dvc_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The derivation follows the declaration: drop a read and its dep leaves dvc.yaml, so the test above fails."""
    import dataclasses

    from lesionflow.catalog.artifacts import PLANS

    before = render_dvc_yaml()
    forgetful = dataclasses.replace(
        STAGES["preprocess"], reads=tuple(a for a in STAGES["preprocess"].reads if a != PLANS)
    )
    monkeypatch.setitem(STAGES, "preprocess", forgetful)
    after = render_dvc_yaml()
    assert after != before
    preprocess = yaml.safe_load(after)["stages"]["preprocess"]
    assert "data/processed/plans.json" not in preprocess["deps"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def init_dvc_workspace(ws: Path) -> Path:
    """Make ``ws`` a git + DVC repository holding this project's dvc.yaml, params.yaml, data.dvc and code deps.

    Tiny training params; an MSD dataset of 3 training and 1 test case in data/demo (the ingest source).
    """
    ws.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "data.dvc", ".gitignore"):
        shutil.copy(REPO / name, ws / name)
    use_tiny_training(ws / "params.yaml")
    shutil.copytree(REPO / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run(["git", "init", "-q"], ws)
    _run([sys.executable, "-m", "dvc", "init", "-q"], ws)
    write_msd(ws / "data" / "demo", n_train=3, n_test=1)
    return ws


@pytest.fixture
def dvc_workspace(tmp_path: Path) -> Path:
    """A git + DVC repository holding this project's dvc.yaml, params.yaml, data.dvc and code deps."""
    return init_dvc_workspace(tmp_path / "repo")


@pytest.mark.slow
def test_dvc_repro_twice_does_nothing_the_second_time_and_matches_direct_stage_calls(
    dvc_workspace: Path, tmp_path: Path
) -> None:
    from lesionflow.caching import run_cached
    from lesionflow.params import load_params
    from lesionflow.workspace import Workspace

    ws = dvc_workspace
    first = _run([sys.executable, "-m", "dvc", "repro"], ws)
    assert "Running stage 'ingest'" in first.stdout
    assert "Running stage 'validate-raw'" in first.stdout
    summary = (ws / "reports" / "ingest" / "summary.json").read_text()
    second = _run([sys.executable, "-m", "dvc", "repro"], ws)
    assert "Running stage" not in second.stdout
    assert "Stage 'ingest' didn't change, skipping" in second.stdout
    assert (ws / "reports" / "ingest" / "summary.json").read_text() == summary
    _run([sys.executable, "-m", "dvc", "commit", "-f", "-q", "data.dvc"], ws)  # record the raw data version
    status = _run([sys.executable, "-m", "dvc", "status"], ws)
    assert "up to date" in status.stdout, status.stdout
    assert "md5:" in (ws / "data.dvc").read_text()

    # The same stages called directly (the path the Prefect tasks take) in another workspace: the same bytes.
    other = tmp_path / "direct"
    other.mkdir()
    shutil.copy(REPO / "params.yaml", other / "params.yaml")
    use_tiny_training(other / "params.yaml")
    write_msd(other / "data" / "demo", n_train=3, n_test=1)
    direct = Workspace.at(other)
    params = load_params(direct.params_file)
    for name in STAGES:  # each stage reads only what it declares (files this process opened)
        with opened_for_reading() as seen:
            run_cached(name, direct, params, STAGES[name].run)
        assert undeclared_reads(STAGES[name], seen, direct, params) == {}, name
    for rel in (
        "data/processed/plans.json",
        "data/processed/metadata.csv",
        "data/processed/accepted.json",
        "data/raw/manifest.csv",
        "models/segmenter/model.safetensors",  # CPU training is bit-reproducible: dvc repro == direct calls
        "models/segmenter/config.json",
        "reports/metrics.json",
    ):
        assert (ws / rel).read_bytes() == (other / rel).read_bytes(), rel
