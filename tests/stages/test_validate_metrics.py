"""The metrics gate's table from evaluate's cases.csv: undefined metrics by convention are not "NaN failures"."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionflow.seg.detection import case_detection
from lesionflow.seg.evaluation import CaseEvaluation, report_tables, write_cases_csv
from lesionflow.seg.metrics import case_metrics
from lesionflow.stages.validate_metrics import case_table, champion_deltas

SHAPE = (12, 12, 10)
SPACING = (1.0, 1.0, 1.5)
EDGES = (6.0, 10.0)


def _box(lo: int, edge: int) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8)
    out[lo : lo + edge, lo : lo + edge, lo : lo + edge] = 1
    return out


def _cases_csv(tmp_path: Path) -> Path:
    empty = np.zeros(SHAPE, dtype=np.uint8)
    scenes = {"lesion": (_box(2, 4), _box(3, 4)), "clean_fp": (_box(7, 2), empty), "clean": (empty, empty)}
    names = {1: "tumour", 2: "cyst"}
    results = [
        CaseEvaluation(
            case,
            pred,
            case_metrics(pred, truth, SPACING, [0, 1, 2], names),
            case_detection(pred, truth, SPACING, [0, 1, 2], names, EDGES),
        )
        for case, (pred, truth) in scenes.items()
    ]
    table, _, _ = report_tables(results, EDGES)
    return write_cases_csv(table, tmp_path / "cases.csv")


def test_gate_table_means_defined_values_and_counts_only_unexpected_nan(tmp_path: Path) -> None:
    path = _cases_csv(tmp_path)
    gate = case_table(path).set_index("case_id")
    assert gate["n_nan"].tolist() == [0, 0, 0]  # every NaN here is the convention's, none hides a failure
    assert gate.loc["lesion", "dice"] == pytest.approx(2 * 27 / 128, abs=1e-6)  # cyst (absent) left out
    assert gate.loc["clean_fp", "dice"] == 0.0  # a false positive without any lesion scores 0
    assert math.isnan(gate.loc["clean", "dice"])  # nothing to find, nothing found: no Dice, not 1 and not 0
    assert math.isnan(gate.loc["clean_fp", "hd95_mm"])

    broken = pd.read_csv(path, dtype={"case_id": str})
    broken.loc[(broken["case_id"] == "lesion") & (broken["label"] == 1), "nsd"] = np.nan  # defined, yet missing
    broken.to_csv(tmp_path / "broken.csv", index=False)
    assert case_table(tmp_path / "broken.csv").set_index("case_id").loc["lesion", "n_nan"] == 1


def test_champion_deltas_pair_only_cases_both_models_score(tmp_path: Path) -> None:
    gate = case_table(_cases_csv(tmp_path))
    deltas = champion_deltas(gate, {"lesion": 0.25, "clean_fp": 0.5, "clean": float("nan")})
    by_case = dict(zip(gate["case_id"], deltas, strict=True))
    assert by_case["lesion"] == pytest.approx(2 * 27 / 128 - 0.25, abs=1e-6)
    assert by_case["clean_fp"] == -0.5
    assert math.isnan(by_case["clean"])  # undefined on either side: left out of the champion mean
    assert champion_deltas(gate, {}) == [0.0, 0.0, 0.0]  # no champion: no difference
