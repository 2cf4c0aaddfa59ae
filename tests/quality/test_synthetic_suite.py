"""The synthetic gate on hand-made per-sample tables (GX import ~3 s per session, ~1 s per gate run)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lesionflow.quality.report import verdict
from lesionflow.quality.synthetic_suite import (
    STATS_COLUMNS,
    SyntheticStats,
    SyntheticThresholds,
    run_synthetic_gate,
    synthetic_expectations,
    with_stats_columns,
)

NAN = float("nan")
T = SyntheticThresholds()
GOOD_STATS = SyntheticStats(volume_ks_pvalue=0.4, diversity=0.3, acceptance_rate=0.9)
GOOD_ROW: dict[str, Any] = {
    "background_max_abs_diff": 0.0,
    "mask_binary": True,
    "components": 1,
    "inside_organ": 1.0,
    "histogram_w1": 0.1,
    "boundary_gradient_ratio": 1.2,
    "nn_similarity": 0.6,
    "detected_fraction": 0.9,
}


def table(n: int = 4, **bad: Mapping[str, Any]) -> pd.DataFrame:
    """``n`` good samples ``s0..``; ``bad={"s1": {"column": value}}`` spoils chosen rows."""
    rows = []
    for i in range(n):
        sid = f"s{i}"
        rows.append({"sample_id": sid, **GOOD_ROW, **bad.get(sid, {})})
    return pd.DataFrame(rows)


def test_all_good_rows_pass(tmp_path: Path) -> None:
    result = run_synthetic_gate(table(), GOOD_STATS, T, tmp_path / "r")
    assert result.success, result.dataset_failures
    assert (result.gate, result.n_cases, result.n_rejected) == ("synthetic", 4, 0)
    assert result.rejected == {}
    summary = json.loads(result.summary_json.read_text())
    assert summary["success"] is True
    page = result.report_html.read_text()
    assert "PASSED" in page
    for key in ("min_volume_ks_pvalue", "max_diversity", "min_detected_fraction", "max_histogram_w1"):
        assert f"quality.synthetic.{key}" in page  # every threshold is listed with its params key


def test_bad_rows_are_rejected_and_named(tmp_path: Path) -> None:
    bad: dict[str, dict[str, Any]] = {
        "s1": {"background_max_abs_diff": 0.5},
        "s2": {"components": 2, "mask_binary": False},
        "s4": {"boundary_gradient_ratio": 9.0},
        "s5": {"histogram_w1": NAN},  # a hard invariant that was not computed
        "s6": {"detected_fraction": 0.2, "nn_similarity": 0.999},
    }
    result = run_synthetic_gate(table(10, **bad), GOOD_STATS, T, tmp_path / "r")
    assert result.success  # 5 of 10 rejected: at the tolerated fraction
    assert sorted(result.rejected) == ["s1", "s2", "s4", "s5", "s6"]
    ((check,),) = [result.rejected["s1"]]
    assert check.column == "background_max_abs_diff"
    assert "background_max_abs_diff = 0.5, expected exactly 0" in check.detail
    assert {c.column for c in result.rejected["s2"]} == {"components", "mask_binary"}
    (ratio,) = result.rejected["s4"]
    assert "between 0.25 and 4" in ratio.detail
    assert "[quality.synthetic.boundary_gradient_ratio]" in ratio.detail
    (missing,) = result.rejected["s5"]
    assert missing.expectation == "expect_column_values_to_not_be_null"
    assert {c.column for c in result.rejected["s6"]} == {"detected_fraction", "nn_similarity"}
    page = result.report_html.read_text()
    assert "s1" in page
    assert "background_max_abs_diff = 0.5" in page


def test_too_many_rejections_fail_the_gate(tmp_path: Path) -> None:
    bad = {f"s{i}": {"inside_organ": 0.5} for i in range(3)}
    result = run_synthetic_gate(table(4, **bad), GOOD_STATS, T, tmp_path / "r")
    assert not result.success
    assert result.n_rejected == 3
    (policy,) = result.dataset_failures
    assert "[quality.synthetic.max_reject_fraction]" in policy.detail


def test_stats_below_threshold_fail_and_report_names_the_param(tmp_path: Path) -> None:
    stats = SyntheticStats(volume_ks_pvalue=0.001, diversity=0.999, acceptance_rate=0.2)
    result = run_synthetic_gate(table(), stats, T, tmp_path / "r")
    assert not result.success
    assert result.rejected == {}
    details = {f.column: f.detail for f in result.dataset_failures}
    assert details == {
        "volume_ks_pvalue": "volume_ks_pvalue = 0.001, expected at least 0.01 [quality.synthetic.min_volume_ks_pvalue]",
        "diversity": "diversity = 0.999, expected at most 0.99 [quality.synthetic.max_diversity]",
        "acceptance_rate": "acceptance_rate = 0.2, expected at least 0.5 [quality.synthetic.max_reject_fraction]",
    }
    page = result.report_html.read_text()
    assert "FAILED" in page
    assert "quality.synthetic.min_volume_ks_pvalue" in page
    assert "volume_ks_pvalue = 0.001" in page
    assert "3 dataset-level failure(s)" in verdict(result)


def test_no_segmenter_and_unmeasured_stats_pass(tmp_path: Path) -> None:
    rows = table()
    rows["detected_fraction"] = NAN
    rows["nn_similarity"] = NAN  # no training references
    reasons = {"diversity": "no condition is shared by 2 lesions", "acceptance_rate": "no acceptance segmenter"}
    stats = SyntheticStats(volume_ks_pvalue=0.5, diversity=NAN, acceptance_rate=NAN, not_measured=reasons)
    result = run_synthetic_gate(rows, stats, T, tmp_path / "r")
    assert result.success, result.dataset_failures
    assert result.rejected == {}
    page = result.report_html.read_text()
    assert "Not measured in this run" in page
    assert "no condition is shared by 2 lesions" in page


def test_empty_table_and_duplicate_ids_fail(tmp_path: Path) -> None:
    empty = table(0).reindex(columns=["sample_id", *GOOD_ROW])
    result = run_synthetic_gate(empty, GOOD_STATS, T, tmp_path / "e", data_docs=False)
    assert not result.success
    assert any("no synthetic samples (0 rows)" in f.detail for f in result.dataset_failures)

    dup = table(3)
    dup.loc[2, "sample_id"] = "s0"
    result = run_synthetic_gate(dup, GOOD_STATS, T, tmp_path / "d", data_docs=False)
    assert not result.success
    assert "s0" in result.rejected


def test_stats_columns_and_expectation_shape() -> None:
    out = with_stats_columns(table(2), GOOD_STATS)
    assert out["mask_binary"].tolist() == [1, 1]
    assert out["mask_binary"].dtype == "int64"
    assert [out[c].tolist() for c in STATS_COLUMNS] == [[0.4, 0.4], [0.3, 0.3], [0.9, 0.9]]
    assert "volume_ks_pvalue" not in table(2).columns  # the input is not modified
    exps = synthetic_expectations(T, SyntheticStats(0.5, NAN, NAN, not_measured={"diversity": "one sample"}))
    kinds = {e.configuration.kwargs.get("column"): e.expectation_type for e in exps[-3:]}
    assert kinds == {
        "volume_ks_pvalue": "expect_column_mean_to_be_between",
        "diversity": "expect_column_values_to_be_null",  # NaN with a reason: not measured, passes
        "acceptance_rate": "expect_column_mean_to_be_between",  # NaN without one: checked, and fails
    }
    assert out["histogram_reference"].tolist() == ["condition", "condition"]  # defaults of the text columns
    assert out["notes"].tolist() == ["", ""]


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="boundary_gradient_ratio"):
        SyntheticThresholds(boundary_gradient_ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="max_reject_fraction"):
        SyntheticThresholds(max_reject_fraction=1.5)
    assert math.isclose(SyntheticThresholds().max_histogram_w1, 0.5)
