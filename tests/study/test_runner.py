"""The utility study end to end on tiny volumes, through the Prefect flow: cells, caching, reports, no leakage."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.study import utility_study
from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import ROIS_TABLE, STUDY_CELLS, STUDY_CURVES_PNG, STUDY_EFFECTS_PNG, STUDY_SUMMARY
from lesionflow.catalog.readers import splits
from lesionflow.params import load_params
from lesionflow.stages import STAGES
from lesionflow.study.stats import paired_effect
from lesionflow.workspace import Workspace
from tests.helpers.volumes import use_tiny_training, write_msd

REPO = Path(__file__).resolve().parents[2]
PREPARE = ("ingest", "validate-raw", "plan", "preprocess", "validate-processed")
GRID = ["study.arms=[real,copies,lefusion]", "study.fractions=[0.5,1.0]", "study.bootstrap_resamples=999"]
QUIET = ["preprocess.workers=1", "synth.workers=1"]


def processed_workspace(root: Path, n_train: int = 8, n_test: int = 3) -> Workspace:
    """A workspace through validate-processed: tiny sphere cases, tiny training params."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    use_tiny_training(root / "params.yaml")
    write_msd(root / "data" / "demo", n_train=n_train, n_test=n_test)
    ws = Workspace.at(root)
    params = load_params(ws.params_file, QUIET)
    for name in PREPARE:
        assert run_cached(name, ws, params, STAGES[name].run).ok
    return ws


@pytest.fixture(scope="module", autouse=True)
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_study_runs_every_cell_reports_and_trains_only_new_cells(tmp_path: Path) -> None:
    ws = processed_workspace(tmp_path / "ws")
    first = utility_study(workspace=str(ws.root), overrides=[*GRID, "study.seeds=[0,1]", *QUIET])
    assert (first["n_cells"], first["n_trained"], first["n_cached"]) == (12, 12, 0)  # 3 arms x 2 fractions x 2 seeds
    for artifact in (STUDY_CELLS, STUDY_SUMMARY, STUDY_CURVES_PNG, STUDY_EFFECTS_PNG):
        assert artifact.at(ws).is_file(), artifact.path
    cells = pd.read_csv(STUDY_CELLS.at(ws), dtype={"case_id": str})
    params = load_params(ws.params_file)
    test = set(splits(ws, params).test)
    assert set(cells["case_id"]) == test  # every cell is scored on the same, whole test split
    assert len(cells) == 12 * len(test)

    # The summary's effects are the paired statistics of cells.csv.
    summary = json.loads(STUDY_SUMMARY.at(ws).read_text())
    row = next(e for e in summary["effects"] if e["arm"] == "lefusion" and e["fraction"] == 0.5)

    def scores(arm: str) -> dict[tuple[str, int], float]:
        part = cells[(cells["arm"] == arm) & (cells["fraction"] == 0.5)]
        return {(r.case_id, int(r.seed)): float(r.dice) for r in part.itertuples()}

    again = paired_effect(scores("lefusion"), scores("real"), seed=params.project.seed, n_resamples=999)
    assert row["mean"] == pytest.approx(again.mean)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((again.ci_low, again.ci_high))
    assert set(summary["real_cases_saved"]) == {"real", "copies", "lefusion"}

    # No leakage: the generators of the half fraction saw only that subset's training cases (not val, not test).
    half = Workspace.at(ws.root / "data" / "study" / "f050")
    subset = set(summary["fractions"]["0.5"]["cases"])
    with ROIS_TABLE.at(half).open() as fh:
        roi_cases = {r["case_id"] for r in csv.DictReader(fh)}
    assert roi_cases
    assert roi_cases <= subset - set(splits(half, params).val)
    assert not roi_cases & test

    # A rerun trains nothing; one more seed trains only its cells.
    assert utility_study(workspace=str(ws.root), overrides=[*GRID, "study.seeds=[0,1]", *QUIET])["n_trained"] == 0
    more = utility_study(workspace=str(ws.root), overrides=[*GRID, "study.seeds=[0,1,2]", *QUIET])
    assert (more["n_trained"], more["n_cached"]) == (6, 12)
