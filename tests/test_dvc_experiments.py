"""DVC experiments can be compared: real `dvc exp run --set-param`, `dvc exp show`, `dvc metrics diff`, `dvc plots`.

Each stage's numbers are ``metrics/<stage>.json`` (git-versioned, numbers only), so an experiment's commit holds
them; the generator-loss plot draws one line per generator; `dvc plots show` writes a page that loads nothing
from the network. The workspace is this project's dvc.yaml, params.yaml and .dvc/ files on a 3 + 1 case MSD
dataset; only ingest, validate-raw and plan run (the cheapest stages whose numbers a param changes).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lesionflow.catalog.readers import numeric_metrics
from lesionflow.dvc import PLOTS_PAGE, derived_dvc_files, series_template_name
from tests.test_dvc_consistency import REPO, _run, init_dvc_workspace

DVC = [sys.executable, "-m", "dvc"]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def test_numeric_metrics_keeps_numbers_and_drops_hashes_paths_and_notes() -> None:
    summary = {
        "plan_hash": "9f2c" * 16,
        "source": "/data/demo",
        "n_cases": 4,
        "ok": True,
        "loss": 0.25,
        "nan": float("nan"),
        "none": None,
        "target_spacing": [1.5, 1.5, 2.0],
        "history": list(range(20)),  # a per-step history stays in the summary
        "mixed": [1, "a"],
        "rejected": {"case_1": "unreadable"},  # left empty: dropped
        "generators": {"ddpm": {"final_loss": 0.5, "model_sha256": "ab" * 32}},
    }
    assert numeric_metrics(summary) == {
        "n_cases": 4,
        "ok": 1,
        "loss": 0.25,
        "target_spacing": {"0": 1.5, "1": 1.5, "2": 2.0},
        "generators": {"ddpm": {"final_loss": 0.5}},
    }


def test_derived_dvc_files_are_committed_and_the_dvc_config_uses_the_offline_page() -> None:
    """The plot template and the offline page are derived like dvc.yaml (`lesionflow dvc-yaml` writes all three)."""
    for rel, text in derived_dvc_files().items():
        assert (REPO / rel).read_text() == text, f"{rel} is stale; run `lesionflow dvc-yaml`"
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"^\s*html_template\s*=\s*plots\.html\s*$", config, re.M), config
    assert (REPO / ".dvc" / "plots.html").resolve() == (REPO / PLOTS_PAGE).resolve()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    plot = stages["train-generator"]["plots"][0]["reports/train-generator/curves.csv"]
    assert plot["template"] == series_template_name("method")
    for name, stage in stages.items():  # every stage's numbers are a git-versioned metric outside reports/
        metrics = [next(iter(m)) for m in stage["metrics"]]
        assert metrics == [f"metrics/{name}.json"], name
        assert all(not m.startswith("reports/") for m in metrics)


def _copy_dvc_files(ws: Path) -> None:
    """This project's .dvc/ settings (the offline page, the plot templates) into a workspace `dvc init` made."""
    shutil.copy(REPO / ".dvc" / "config", ws / ".dvc" / "config")
    shutil.copy(REPO / PLOTS_PAGE, ws / PLOTS_PAGE)
    shutil.copytree(REPO / ".dvc" / "plots", ws / ".dvc" / "plots")


def _exp_rows(ws: Path) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json` as {name or rev: {metrics file: flat numbers}} for the workspace, baseline and exps."""
    shown = json.loads(_run([*DVC, "exp", "show", "--json"], ws).stdout)
    rows: dict[str, dict[str, Any]] = {}

    def add(entry: dict[str, Any]) -> None:
        data = entry.get("data") or {}
        name = entry.get("name") or entry.get("rev")
        files = data.get("metrics") or {}
        rows[str(name)] = {path: _leaves(m.get("data", {})) for path, m in files.items() if "error" not in m}
        rows[str(name)]["__errors__"] = {path: m["error"] for path, m in files.items() if "error" in m}

    for entry in shown:
        add(entry)
        for exp in entry.get("experiments") or []:
            for run in exp.get("revs") or []:
                add(run)
    return rows


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_exp_run_and_show_compare_the_numbers_and_metrics_diff_loads_head(tmp_path: Path) -> None:
    ws = init_dvc_workspace(tmp_path / "repo")
    _copy_dvc_files(ws)
    _run([*DVC, "repro", "plan"], ws)
    committed = json.loads((ws / "metrics" / "plan.json").read_text())
    assert committed["n_cases"] == 4
    assert "plan_hash" not in committed
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], ws).stdout
    assert "metrics/plan.json" in status  # versioned by git, not ignored like reports/
    _run(["git", "config", "user.name", "lesionflow-test"], ws)  # dvc exp run commits the experiment
    _run(["git", "config", "user.email", "test@example.invalid"], ws)
    _run(["git", "add", "-A"], ws)
    _run(["git", "commit", "-q", "-m", "baseline"], ws)

    ran = _run([*DVC, "exp", "run", "plan", "--name", "coarse", "--set-param", "plan.target_spacing=[3.0,3.0,3.0]"], ws)
    assert "Running stage 'plan'" in ran.stdout
    assert "Running stage 'ingest'" not in ran.stdout

    rows = _exp_rows(ws)
    baseline = next(v for k, v in rows.items() if k not in ("workspace", "coarse"))
    coarse = rows["coarse"]
    ran_stages = {f"metrics/{name}.json" for name in ("ingest", "validate-raw", "plan")}
    for row in (baseline, coarse):
        assert ran_stages <= set(row), row  # no "!" cells for the stages that ran ...
        assert set(row["__errors__"]).isdisjoint(ran_stages), row["__errors__"]  # (the others have no file yet)
    assert coarse["metrics/plan.json"]["target_spacing.0"] == 3.0
    assert baseline["metrics/plan.json"]["target_spacing.0"] == committed["target_spacing"]["0"] != 3.0
    assert coarse["metrics/ingest.json"] == baseline["metrics/ingest.json"]  # ingest did not run again
    assert coarse["metrics/ingest.json"]["n_stored"] == 4
    for row in (baseline, coarse):  # only numbers: nothing for a wide table of hashes and paths
        assert all(isinstance(v, int | float) for f in ran_stages for v in row[f].values()), row

    diff = json.loads(_run([*DVC, "metrics", "diff", "--json"], ws).stdout)  # HEAD (baseline) vs workspace (exp)
    changed = diff["metrics/plan.json"]["target_spacing.0"]
    assert changed["old"] == committed["target_spacing"]["0"]
    assert changed["new"] == 3.0
    assert "metrics/ingest.json" not in diff  # unchanged files are not listed


def test_dvc_plots_show_draws_one_line_per_generator_on_a_page_that_loads_nothing_remote(tmp_path: Path) -> None:
    ws = tmp_path / "repo"
    ws.mkdir()
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    _run([*DVC, "init", "-q"], ws)
    _copy_dvc_files(ws)
    curves = ws / "reports" / "train-generator" / "curves.csv"  # the format train-generator writes
    curves.parent.mkdir(parents=True)
    curves.write_text("method,step,loss\nlefusion,1,0.9\nlefusion,2,0.5\nddpm,1,0.8\nddpm,2,0.7\n")
    out = tmp_path / "plots"
    _run([*DVC, "plots", "show", str(curves.relative_to(ws)), "-o", str(out)], ws)
    page = (out / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "the page loads something remote"
    assert "cdn." not in page
    assert "window.vegaEmbed=" in page
    assert "window.vegaLite=" in page
    assert "window.vega=" in page
    spec = json.loads(re.search(r"var spec = (\{.*?\});\n", page, re.S).group(1))  # type: ignore[union-attr]
    assert spec["encoding"]["color"]["field"] == "method"
    assert {row["method"] for row in spec["data"]["values"]} == {"lefusion", "ddpm"}
