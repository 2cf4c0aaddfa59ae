"""The utility study end to end on tiny volumes, through the Prefect flow: cells, caching, reports, no leakage."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from lesionflow.caching import run_cached
from lesionflow.catalog.artifacts import ROIS_TABLE, STUDY_CELLS, STUDY_CURVES_PNG, STUDY_EFFECTS_PNG, STUDY_SUMMARY
from lesionflow.catalog.readers import splits
from lesionflow.flows.study import utility_study
from lesionflow.params import load_params
from lesionflow.registry.tracking import resolve_tracking_uri
from lesionflow.stages.registry import STAGES
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
    # two cells side by side on a local Dask cluster; a dose series at the smallest fraction
    fanned = ["study.workers=2", "study.dose_ratios=[0.5]", "train.num_workers=2"]  # cells load in-process
    first = utility_study(workspace=str(ws.root), overrides=[*GRID, *fanned, "study.seeds=[0,1]", *QUIET])
    # 3 arms x 2 fractions x 2 seeds, plus (copies, lefusion) x dose 0.5 x 2 seeds at 0.5
    assert (first["n_cells"], first["n_trained"], first["n_cached"]) == (16, 16, 0)
    for artifact in (STUDY_CELLS, STUDY_SUMMARY, STUDY_CURVES_PNG, STUDY_EFFECTS_PNG):
        assert artifact.at(ws).is_file(), artifact.path
    cells = pd.read_csv(STUDY_CELLS.at(ws), dtype={"case_id": str})
    params = load_params(ws.params_file)
    test = set(splits(ws, params).test)
    assert set(cells["case_id"]) == test  # every cell is scored on the same, whole test split
    assert len(cells) == 16 * len(test)
    assert set(cells.loc[cells["dose"], "ratio"]) == {0.5}
    assert set(cells.loc[cells["dose"], "fraction"]) == {0.5}
    # lesion-level detection per test case, split by size; every test case here holds one sphere lesion per class
    assert {"lesions", "detected", "false_positives"} <= set(cells.columns)
    bins = [c for c in cells.columns if c.startswith("lesions_")]
    assert bins
    assert (cells[bins].sum(axis=1) == cells["lesions"]).all()
    assert (cells["detected"] <= cells["lesions"]).all()

    # The summary's effects are the paired statistics of cells.csv.
    summary = json.loads(STUDY_SUMMARY.at(ws).read_text())
    row = next(e for e in summary["effects"] if e["arm"] == "lefusion" and e["fraction"] == 0.5)

    def scores(arm: str) -> dict[tuple[str, int], float]:
        part = cells[(cells["arm"] == arm) & (cells["fraction"] == 0.5) & ~cells["dose"]]
        return {(r.case_id, int(r.seed)): float(r.dice) for r in part.itertuples()}

    again = paired_effect(scores("lefusion"), scores("real"), seed=params.project.seed, n_resamples=999)
    assert row["mean"] == pytest.approx(again.mean)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((again.ci_low, again.ci_high))
    assert set(summary["real_cases_saved"]) == {"real", "copies", "lefusion"}
    real_all = next(d for d in summary["detection"] if (d["arm"], d["fraction"], d["size_bin"]) == ("real", 1.0, "all"))
    part = cells[(cells["arm"] == "real") & (cells["fraction"] == 1.0)]
    assert real_all["lesions"] == int(part["lesions"].sum())
    assert real_all["detected"] == int(part["detected"].sum())

    # No leakage: the generators of the half fraction saw only that subset's training cases (not val, not test).
    half = Workspace.at(ws.root / "data" / "study" / "f050")
    subset = set(summary["fractions"]["0.5"]["cases"])
    with ROIS_TABLE.at(half).open() as fh:
        roi_cases = {r["case_id"] for r in csv.DictReader(fh)}
    assert roi_cases
    assert roi_cases <= subset - set(splits(half, params).val)
    assert not roi_cases & test

    # MLflow: one parent run for the study, one child run per cell.
    client = MlflowClient(tracking_uri=resolve_tracking_uri(params.registry.tracking_uri, ws.root))
    parent = client.get_run(first["mlflow_parent_run"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 16
    assert "effect.lefusion.f050.mean" in parent.data.metrics

    # A killed study resumes: a lost cell is retrained alone, in this process (workers 1), to the same bytes as
    # the Dask worker made it, and the study's numbers do not change; the same summary is not logged twice.
    table_before = STUDY_CELLS.at(ws).read_bytes()
    shutil.rmtree(ws.root / "data" / "study" / "f050" / "cells" / "lefusion" / "seed1")
    again = utility_study(workspace=str(ws.root), overrides=[*GRID, *fanned[1:], "study.seeds=[0,1]", *QUIET])
    assert (again["n_trained"], again["n_cached"]) == (1, 15)
    assert STUDY_CELLS.at(ws).read_bytes() == table_before
    assert again["mlflow_parent_run"] == first["mlflow_parent_run"]

    # One more seed trains only its cells (the dose series dropped: its cells are simply not asked for).
    more = utility_study(workspace=str(ws.root), overrides=[*GRID, "study.seeds=[0,1,2]", *QUIET])
    assert (more["n_trained"], more["n_cached"]) == (6, 12)


@pytest.mark.slow
def test_the_acceptance_filter_scores_samples_with_the_fractions_real_segmenter(tmp_path: Path) -> None:
    """study.acceptance_filter: the gate of each synthetic arm uses the real-only segmenter of the fraction (its
    first-seed real cell, trained once), and the arm trains on the samples the gate accepted."""
    from lesionflow.catalog.artifacts import SEGMENTER, SYNTHETIC_GATE_REPORT, SYNTHETIC_STORE
    from lesionflow.catalog.readers import synthetic_verdict
    from lesionflow.quality.synthetic_suite import sample_of_row
    from lesionflow.store.zarr_store import list_cases
    from lesionflow.study.runner import run_study

    ws = processed_workspace(tmp_path / "ws", n_train=6, n_test=2)
    grid = ["study.arms=[real,lefusion]", "study.fractions=[1.0]", "study.seeds=[0]", "study.mlflow=false"]
    # the real-only segmenter finds 86-88% of each synthetic lesion here: this bound rejects most, not all, so the
    # arm's gate fails as a whole and the study keeps the accepted samples (the filter's purpose)
    strict = "quality.synthetic.min_detected_fraction=0.878"
    gate_limit = "quality.synthetic.max_reject_fraction=0.5"  # the tiny params tolerate every rejection
    filtered = ["study.acceptance_filter=true", strict, gate_limit]
    params = load_params(ws.params_file, [*grid, *filtered, "study.workers=1", *QUIET])
    lines: list[str] = []
    report = run_study(ws, params, say=lines.append)
    # the real cell trained once, for the filter, and its row then comes from the cache: no extra budget
    assert (report.n_trained, report.n_cached) == (1, 1)
    assert report.summary["acceptance_filter"] is True
    fraction = ws.root / "data" / "study" / "f100"
    real_model = SEGMENTER.at(Workspace.at(fraction / "cells" / "real" / "seed0")).resolve()
    arm = Workspace.at(fraction / "arms" / "lefusion")
    assert load_params(arm.params_file).quality.synthetic.acceptance_model == str(real_model)
    lesions = pd.read_csv(arm.root / "reports" / "validate-synthetic" / "lesions.csv")
    assert lesions["detected_fraction"].between(0.0, 1.0).all()  # every lesion scored by the real-only segmenter
    gate = json.loads((SYNTHETIC_GATE_REPORT.at(arm) / "summary.json").read_text())
    verdict = synthetic_verdict(SYNTHETIC_STORE.at(arm), "synthetic store")
    every = set(list_cases(SYNTHETIC_STORE.at(arm)))
    rejected = {sample_of_row(row) for row in gate["rejected"]}  # the gate rejects lesion rows, "<sample>#<k>"
    assert rejected
    assert every - rejected  # some, not all: the filtered branch
    assert not gate["success"]
    assert verdict.accepted == every - rejected  # rejected samples never reach training
    assert "the samples it accepted used by the study" in verdict.gate
    assert any("acceptance filter @ f100" in line for line in lines)
