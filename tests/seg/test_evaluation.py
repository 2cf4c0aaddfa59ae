"""Evaluation reports under the empty-mask convention: the montage shows lesion cases only, NaN metrics pass."""

from __future__ import annotations

import math

import numpy as np

from lesionflow.seg.detection import case_detection
from lesionflow.seg.evaluation import CaseEvaluation, MontagePick, montage_picks, report_tables
from lesionflow.seg.metrics import case_metrics, metrics_table

SHAPE = (16, 14, 12)
SPACING = (1.0, 1.0, 2.0)
NAMES = {1: "tumour", 2: "cyst"}
EDGES = (6.0, 10.0)


def _box(lo: tuple[int, int, int], edge: int, value: int = 1) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8)
    out[lo[0] : lo[0] + edge, lo[1] : lo[1] + edge, lo[2] : lo[2] + edge] = value
    return out


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, truth) per case: two with a lesion, one without lesion but a false positive, one empty."""
    truth = _box((3, 3, 3), 5)
    return {
        "good": (_box((3, 3, 3), 5), truth),  # Dice 1 on tumour, cyst absent
        "poor": (_box((5, 5, 3), 5), truth),  # 3x3x5 of 125 voxels shared: Dice 0.36
        "clean_fp": (_box((9, 9, 6), 2), np.zeros(SHAPE, np.uint8)),  # issue 19's "best" case (Dice 0.5 before)
        "clean": (np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)),
    }


def test_montage_picks_only_cases_with_a_lesion_in_the_reference() -> None:
    table = metrics_table({c: case_metrics(p, t, SPACING, [0, 1, 2], NAMES) for c, (p, t) in _cases().items()})
    picks = montage_picks(table, 2)
    assert [(p.case_id, p.rank) for p in picks] == [("good", "best"), ("poor", "worst")]
    assert picks[0].dice == 1.0
    assert abs(picks[1].dice - 2 * 45 / 250) < 1e-12
    assert montage_picks(table, 1) == [MontagePick("good", "best", 1.0), MontagePick("poor", "worst", picks[1].dice)]
    no_lesion = table[table["case_id"].isin(["clean_fp", "clean"])]
    assert montage_picks(no_lesion, 2) == []


def test_report_tables_keep_undefined_metrics_and_count_the_false_positive_case() -> None:
    results = [
        CaseEvaluation(
            case,
            pred,
            case_metrics(pred, truth, SPACING, [0, 1, 2], NAMES),
            case_detection(pred, truth, SPACING, [0, 1, 2], NAMES, EDGES),
        )
        for case, (pred, truth) in _cases().items()
    ]
    table, lesions, summary = report_tables(results, EDGES)
    assert len(table) == 8
    cyst = table[table["name"] == "cyst"]
    assert cyst["dice"].isna().all()
    assert cyst["outcome"].eq("absent").all()
    clean_fp = table[(table["case_id"] == "clean_fp") & (table["name"] == "tumour")].iloc[0]
    assert (clean_fp["dice"], clean_fp["false_positives"], clean_fp["outcome"]) == (0.0, 1, "false_positive")
    assert math.isnan(clean_fp["hd95_mm"])
    assert summary["n_lesions"] == 2
    assert summary["sensitivity"] == 1.0
    assert summary["false_positives"] == 1
    assert len(lesions) == 2
