"""One quiet-telemetry environment: the Makefile and the compose file hold exactly lesionflow.quiet_env.QUIET_ENV."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from lesionflow.quiet_env import QUIET_ENV, apply_quiet_env

REPO = Path(__file__).resolve().parents[1]
EXPORT = re.compile(r"^export\s+([A-Za-z_][A-Za-z0-9_]*)\s*:=\s*(.*?)\s*$")
NOT_TELEMETRY = {"PYTHONDONTWRITEBYTECODE"}  # Makefile exports that are not about telemetry


def test_makefile_exports_are_exactly_the_quiet_env() -> None:
    exports = dict(m.groups() for line in (REPO / "Makefile").read_text().splitlines() if (m := EXPORT.match(line)))
    assert set(exports) >= NOT_TELEMETRY  # the exception above is still real
    assert {k: v for k, v in exports.items() if k not in NOT_TELEMETRY} == dict(QUIET_ENV)


def test_compose_telemetry_block_is_exactly_the_quiet_env() -> None:
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    assert compose["x-telemetry-off"] == dict(QUIET_ENV)


def test_no_other_copy_of_the_variables_in_python() -> None:
    """src/, tests/ and bench/ read QUIET_ENV; none spells the variables out again."""
    definition = REPO / "src" / "lesionflow" / "quiet_env.py"
    copies = []
    for folder in ("src", "tests", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in (definition, Path(__file__).resolve()):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in QUIET_ENV:
                    copies.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value}")
    assert copies == []


def test_apply_keeps_a_value_the_user_set() -> None:
    env = {"DO_NOT_TRACK": "0"}
    apply_quiet_env(env)
    assert env == {**QUIET_ENV, "DO_NOT_TRACK": "0"}


def test_the_definition_imports_nothing_from_lesionflow() -> None:
    code = "import sys, lesionflow.quiet_env; print(sorted(m for m in sys.modules if m.startswith('lesionflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lesionflow', 'lesionflow.quiet_env']"
