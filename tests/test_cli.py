"""The lesionflow command: help lists every command; user errors are one line with exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib

from lesionflow.stages import STAGES

EXE = str(Path(sys.executable).with_name("lesionflow"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_every_command(tmp_path: Path) -> None:
    proc = _cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("demo-data", "stage", "stages", "run", "params"):
        assert command in proc.stdout
    listing = _cli("stages", cwd=tmp_path)
    for name in STAGES:
        assert name in listing.stdout


def test_params_check_ok_and_bad(workspace: Path) -> None:
    ok = _cli("params", "check", cwd=workspace)
    assert ok.returncode == 0
    assert "params.yaml is valid" in ok.stdout
    bad = _cli("params", "check", "--set", "quality.max_reject_fraction=-1", cwd=workspace)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "quality.max_reject_fraction" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unknown_stage_is_one_line(workspace: Path) -> None:
    proc = _cli("stage", "trian", cwd=workspace)
    assert proc.returncode == 2
    assert "stage 'trian' is unknown" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_data_then_stages_from_the_command_line(workspace: Path) -> None:
    built = _cli("demo-data", "chest-ct", "--cases", "3", "--size", "32", "--seed", "4", cwd=workspace)
    assert built.returncode == 0, built.stderr
    assert "3 chest-ct cases" in built.stdout
    assert "say nothing clinical" in built.stdout
    ingest = _cli("stage", "ingest", cwd=workspace)
    assert ingest.returncode == 0, ingest.stderr
    assert "data/raw/manifest.csv" in ingest.stdout  # where the outputs went
    gate = _cli("stage", "validate-raw", cwd=workspace)
    assert gate.returncode == 0, gate.stderr
    assert "reports/quality/raw/index.html" in gate.stdout
    cases = sorted(p.name for p in (workspace / "data" / "raw" / "cases").iterdir())
    assert len(cases) == 3
    organ = nib.load(workspace / "data" / "raw" / "cases" / cases[0] / "organ.nii.gz")
    assert organ.shape == nib.load(workspace / "data" / "raw" / "cases" / cases[0] / "image.nii.gz").shape
