"""pyproject.toml declares what the package imports: deptry passes on the project and fails on an undeclared import.

``pip install .`` must give a working ``lesionflow`` command, so every third-party package that src/lesionflow
(flows and tasks included) imports has to be in ``[project].dependencies`` (or an extra). deptry compares the two; its
settings are ``[tool.deptry]`` in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ("src/lesionflow",)  # the package the wheel holds ([tool.setuptools.packages.find]), flows and tasks inside


def _deptry(cwd: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("deptry") is None:
        pytest.fail("deptry is not installed in this environment: pip install 'deptry>=0.25' (requirements.txt)")
    return subprocess.run(
        [sys.executable, "-m", "deptry", ".", "--no-ansi"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_deptry_passes_on_the_project() -> None:
    proc = _deptry(ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"deptry found dependency issues (fix pyproject.toml [project]):\n{output}"
    # Not vacuous: deptry scanned at least every module of the packaged code.
    scanned = re.search(r"Scanning (\d+) files?", output)
    assert scanned is not None, f"deptry's output no longer says how many files it scanned:\n{output}"
    packaged = sum(1 for folder in PACKAGED for _ in (ROOT / folder).rglob("*.py"))
    assert packaged > 0
    assert int(scanned.group(1)) >= packaged, f"deptry scanned {scanned.group(1)} files, the package has {packaged}"


def _probe_project(tmp_path: Path, dependencies: list[str]) -> Path:
    """A minimal project whose only module imports ``yaml`` (PyYAML: installed here, as lesionflow needs it)."""
    (tmp_path / "pyproject.toml").write_text(
        "[project]\n"
        'name = "probe"\n'
        'version = "0.0.1"\n'
        f"dependencies = {json.dumps(dependencies)}\n"  # a JSON list of strings is a TOML array
    )
    package = tmp_path / "probe"
    package.mkdir()
    (package / "__init__.py").write_text("import yaml\n\nLOADED = yaml.safe_load('a: 1')\n")
    return tmp_path


def test_deptry_reports_an_import_that_is_not_declared(tmp_path: Path) -> None:
    assert importlib.util.find_spec("yaml") is not None  # the probe relies on PyYAML being installed
    proc = _deptry(_probe_project(tmp_path, []))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"deptry accepted an undeclared import:\n{output}"
    assert re.search(r"DEP00[13] 'yaml' imported but", output), output


def test_deptry_accepts_the_same_import_once_declared(tmp_path: Path) -> None:
    """The control for the test above: the probe project itself is sound, only the missing declaration fails."""
    proc = _deptry(_probe_project(tmp_path, ["PyYAML"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
