"""Lesion-level detection: components, any-overlap hits, false positives and size bins in mm on tiny label maps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lesionflow.errors import ParamsError
from lesionflow.params import load_params
from lesionflow.seg.detection import (
    LESION_COLUMNS,
    case_detection,
    class_detection,
    detection_columns,
    detection_table,
    equivalent_diameter_mm,
    lesions_table,
    size_bin_names,
    summarize_detection,
)
from lesionflow.seg.evaluation import CaseEvaluation, report_tables
from lesionflow.seg.metrics import COLUMNS, case_metrics

SHAPE = (24, 20, 16)
EDGES = (6.0, 10.0)
BINS = ("lt6mm", "6to10mm", "ge10mm")


def _box(out: np.ndarray, lo: tuple[int, int, int], edge: int, value: int = 1) -> np.ndarray:
    out[lo[0] : lo[0] + edge, lo[1] : lo[1] + edge, lo[2] : lo[2] + edge] = value
    return out


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Truth: a 3-voxel cube (27 voxels) and a 7-voxel cube (343); prediction: part of the big one + a stray blob."""
    truth = np.zeros(SHAPE, dtype=np.uint8)
    _box(truth, (1, 1, 1), 3)
    _box(truth, (10, 8, 5), 7)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    _box(pred, (12, 10, 7), 2)  # inside the big lesion: a hit
    _box(pred, (20, 1, 12), 2)  # far from every lesion: a false positive
    return pred, truth


def test_two_lesions_one_found_one_false_positive_in_the_right_bins() -> None:
    pred, truth = _scene()
    d = class_detection(pred == 1, truth == 1, (1.0, 1.0, 1.0), EDGES, label=1, name="nodule")
    assert d.bins == BINS
    # 27 mm3 -> (6*27/pi)^(1/3) = 3.72 mm (< 6); 343 mm3 -> 8.68 mm (6 to 10)
    assert d.n_lesions == (1, 1, 0)
    assert d.n_detected == (0, 1, 0)
    assert (d.total_lesions, d.total_detected, d.n_false_positives) == (2, 1, 1)
    small, big = d.lesions
    assert (small.lesion, small.voxels, small.size_bin, small.detected) == (1, 27, "lt6mm", False)
    assert (big.lesion, big.voxels, big.size_bin, big.detected) == (2, 343, "6to10mm", True)
    assert small.diameter_mm == pytest.approx((6 * 27 / math.pi) ** (1 / 3))
    assert big.volume_mm3 == pytest.approx(343.0)

    table = detection_table([("c1", d)], BINS)
    assert list(table.columns) == ["case_id", "label", *detection_columns(BINS)]
    row = table.iloc[0].to_dict()
    assert (row["lesions"], row["detected"], row["false_positives"]) == (2, 1, 1)
    assert (row["lesions_lt6mm"], row["detected_lt6mm"]) == (1, 0)
    assert (row["lesions_6to10mm"], row["detected_6to10mm"]) == (1, 1)
    assert (row["lesions_ge10mm"], row["detected_ge10mm"]) == (0, 0)
    summary = summarize_detection(table, BINS, n_cases=1)
    assert summary["sensitivity"] == 0.5
    assert summary["sensitivity_lt6mm"] == 0.0
    assert summary["sensitivity_6to10mm"] == 1.0
    assert summary["sensitivity_ge10mm"] is None  # no lesion of that size: undefined, not NaN
    assert summary["fp_per_case"] == 1.0
    json.dumps(summary, allow_nan=False)  # strict JSON: DVC metrics and MLflow read it


def test_anisotropic_spacing_moves_a_lesion_to_the_next_bin() -> None:
    truth = _box(np.zeros(SHAPE, dtype=np.uint8), (4, 4, 4), 4)  # 64 voxels
    iso = class_detection(truth == 1, truth == 1, (1.0, 1.0, 1.0), EDGES)
    thick = class_detection(truth == 1, truth == 1, (1.0, 1.0, 2.5), EDGES)  # 160 mm3: CT-like thick slices
    assert iso.lesions[0].diameter_mm == pytest.approx(4.96, abs=0.01)
    assert thick.lesions[0].diameter_mm == pytest.approx(6.74, abs=0.01)
    assert (iso.n_lesions, thick.n_lesions) == ((1, 0, 0), (0, 1, 0))
    assert thick.lesions[0].volume_mm3 == pytest.approx(160.0)


def test_empty_truth_and_prediction_have_no_lesions_and_no_false_positives() -> None:
    empty = np.zeros(SHAPE, dtype=np.uint8)
    [d] = case_detection(empty, empty, (0.8, 0.8, 2.0), [0, 1], {1: "nodule"}, EDGES)
    assert (d.n_lesions, d.n_detected, d.n_false_positives, d.lesions) == ((0, 0, 0), (0, 0, 0), 0, ())
    summary = summarize_detection(detection_table([("c", d)], BINS), BINS, n_cases=1)
    assert (summary["n_lesions"], summary["sensitivity"], summary["fp_per_case"]) == (0, None, 0.0)
    assert lesions_table([("c", d)]).empty
    assert list(lesions_table([("c", d)]).columns) == list(LESION_COLUMNS)


def test_corner_neighbours_are_one_lesion_and_one_prediction_can_hit_two() -> None:
    truth = np.zeros(SHAPE, dtype=np.uint8)
    truth[2, 2, 2] = truth[3, 3, 3] = 1  # touch by a corner only: one lesion under 26-connectivity
    truth[8, 2, 2] = truth[8, 4, 2] = 1  # one voxel apart: two lesions
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[8, 2:5, 2] = 1  # one predicted component over both
    d = class_detection(pred == 1, truth == 1, (1.0, 1.0, 1.0), EDGES)
    assert [lesion.voxels for lesion in d.lesions] == [2, 1, 1]
    assert [lesion.detected for lesion in d.lesions] == [False, True, True]
    assert d.n_false_positives == 0


def test_classes_are_scored_apart_and_a_wrong_class_is_a_false_positive() -> None:
    truth = _box(np.zeros(SHAPE, dtype=np.uint8), (2, 2, 2), 4, value=1)
    _box(truth, (12, 10, 6), 3, value=2)
    pred = _box(np.zeros(SHAPE, dtype=np.uint8), (2, 2, 2), 4, value=2)  # right place, wrong class
    one, two = case_detection(pred, truth, (1.0, 1.0, 1.0), [0, 1, 2], {1: "edema"}, EDGES)
    assert (one.name, one.total_detected, one.n_false_positives) == ("edema", 0, 0)
    assert (two.name, two.total_lesions, two.total_detected, two.n_false_positives) == ("label_2", 1, 0, 1)


def test_bin_names_and_bad_edges() -> None:
    assert size_bin_names([5]) == ("lt5mm", "ge5mm")
    assert size_bin_names([3.25, 7.5, 20]) == ("lt3p25mm", "3p25to7p5mm", "7p5to20mm", "ge20mm")
    for bad in ([], [10, 6], [6, 6.001], [0, 5], [float("nan")]):
        with pytest.raises(ValueError, match="lesion size bins") as err:
            size_bin_names(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expected the same grid"):
        class_detection(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), (1, 1, 1), EDGES)
    assert equivalent_diameter_mm(0, (1, 1, 1)) == 0.0


def test_report_tables_append_detection_and_keep_the_metric_columns() -> None:
    pred, truth = _scene()
    spacing = (1.0, 1.0, 1.0)
    names = {1: "nodule"}
    results = [
        CaseEvaluation(
            case,
            p,
            case_metrics(p, t, spacing, [0, 1], names),
            case_detection(p, t, spacing, [0, 1], names, EDGES),
        )
        for case, p, t in (("a", pred, truth), ("b", truth, truth))
    ]
    table, lesions, summary = report_tables(results, EDGES)
    assert tuple(table.columns[: len(COLUMNS)]) == COLUMNS  # metric columns first, unchanged
    assert list(table.columns[len(COLUMNS) :]) == detection_columns(BINS)
    assert table["case_id"].tolist() == ["a", "b"]
    assert table["dice"].iloc[1] == 1.0
    assert table["lesions"].tolist() == [2, 2]
    assert table["detected"].tolist() == [1, 2]
    assert table["false_positives"].tolist() == [1, 0]
    assert str(table["lesions_lt6mm"].dtype) == "int64"
    assert lesions["detected"].tolist() == [False, True, True, True]
    assert summary["sensitivity"] == 0.75
    assert summary["sensitivity_lt6mm"] == 0.5
    assert summary["n_lesions_6to10mm"] == 2
    assert summary["fp_per_case"] == 0.5


@settings(max_examples=40, deadline=None)
@given(
    truth=arrays(np.uint8, (6, 5, 4), elements=st.integers(0, 2)),
    spacing=st.tuples(*[st.floats(0.3, 3.0)] * 3),
)
def test_a_perfect_prediction_detects_every_lesion_without_false_positives(
    truth: np.ndarray, spacing: tuple[float, float, float]
) -> None:
    for d in case_detection(truth.copy(), truth, spacing, [0, 1, 2], {}, EDGES):
        assert d.total_detected == d.total_lesions
        assert d.n_false_positives == 0
        assert all(lesion.detected for lesion in d.lesions)
        assert sum(lesion.voxels for lesion in d.lesions) == int((truth == d.label).sum())


def test_the_size_bins_param_is_checked_at_load_time(tmp_path: Path) -> None:
    file = tmp_path / "params.yaml"
    file.write_text("{}\n")
    assert size_bin_names(load_params(file).evaluate.lesion_size_bins_mm) == BINS  # the default: < 6, 6-10, >= 10
    assert load_params(file, ["evaluate.lesion_size_bins_mm=[4, 8, 15]"]).evaluate.lesion_size_bins_mm == (4, 8, 15)
    for bad in ("[10, 6]", "[]", "[0, 5]", "[6, 6.001]"):
        with pytest.raises(ParamsError, match=r"evaluate\.lesion_size_bins_mm") as err:
            load_params(file, [f"evaluate.lesion_size_bins_mm={bad}"])
        assert "\n" not in str(err.value)
