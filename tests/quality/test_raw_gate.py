"""The raw quality gate on manifest tables built from real CaseRecords.

GX is imported once per test session (~3 s); each gate call then takes well under a second.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lesionflow.manifest import CaseRecord, manifest_frame
from lesionflow.params import QualityParams, RawQualityParams
from lesionflow.quality import FailedCheck, GateResult, render_console, run_raw_gate

BASE = CaseRecord(
    case_id="case_000",
    split="train",
    modality="CT",
    modality_kind="CT",
    source_format="nifti",
    n_channels=1,
    shape_x=64,
    shape_y=64,
    shape_z=32,
    spacing_x=0.8,
    spacing_y=0.8,
    spacing_z=2.5,
    orientation="RAS",
    image_dtype="int16",
    has_label=True,
    label_shape_x=64,
    label_shape_y=64,
    label_shape_z=32,
    label_dtype="uint8",
    shape_match=True,
    affine_max_diff_mm=0.0,
    n_nonfinite=0,
    intensity_min=-1024.0,
    intensity_max=2200.0,
    intensity_mean=-300.0,
    intensity_std=450.0,
    intensity_p00_5=-1000.0,
    intensity_p99_5=1500.0,
    label_values="[0, 1]",
    label_integral=True,
    n_undeclared_labels=0,
    foreground_fraction=0.02,
    has_organ=False,
    image_sha256="0" * 64,
    label_sha256="1" * 64,
    organ_sha256="",
    source_sha256="2" * 64,
    source_uri="data/demo/case_000.nii.gz",
)

# Defaults except a tolerant reject fraction, so one bad case out of five leaves the gate passing.
PARAMS = QualityParams(max_reject_fraction=0.5, raw=RawQualityParams(min_cases=2))


def record(i: int, **overrides: Any) -> CaseRecord:
    """A valid CT case ``case_00i``; ``overrides`` make it bad in exactly one way."""
    return replace(BASE, case_id=f"case_{i:03d}", **overrides)


def good_records(n: int = 4) -> list[CaseRecord]:
    return [record(i) for i in range(n)]


def gate(records: list[CaseRecord], tmp_path: Path, params: QualityParams = PARAMS, name: str = "r") -> GateResult:
    return run_raw_gate(manifest_frame(records), params, tmp_path / name)


def test_all_good_table_passes_and_writes_reports(tmp_path: Path) -> None:
    result = gate(good_records(4), tmp_path)

    assert result.success
    assert (result.n_cases, result.n_rejected, result.reject_fraction) == (4, 0, 0.0)
    assert result.rejected == {}
    assert result.dataset_failures == ()
    assert result.report_html == tmp_path / "r" / "index.html"
    assert result.summary_json == tmp_path / "r" / "summary.json"
    summary = json.loads(result.summary_json.read_text())
    assert summary["success"] is True
    assert (summary["n_cases"], summary["n_accepted"], summary["n_rejected"]) == (4, 4, 0)
    page = result.report_html.read_text()
    assert all(f"case_00{i}" not in page for i in range(4))  # no case is listed as rejected...
    assert "PASSED" in page
    assert "data_docs/index.html" in page  # ...and the page links GX's Data Docs
    assert "<script" not in page  # self-contained: no scripts...
    assert "http" not in page  # ...and nothing fetched
    assert result.data_docs_index == tmp_path / "r" / "data_docs" / "index.html"
    assert result.data_docs_index.is_file()
    assert "expectations/raw.html" in result.data_docs_index.read_text()
    (validation_page,) = (tmp_path / "r" / "data_docs" / "validations" / "raw").rglob("*.html")
    assert "spacing_z" in validation_page.read_text()  # the rendered validation of this run's table


# One bad case per kind: (overrides, the column that must be blamed, text the detail must show).
BAD_KINDS: dict[str, tuple[dict[str, Any], str, str]] = {
    "shape": ({"shape_match": False, "label_shape_z": 30}, "shape_match", "shape_match = False"),
    "affine": ({"affine_max_diff_mm": 0.5}, "affine_max_diff_mm", "affine_max_diff_mm = 0.5"),
    "nan": ({"n_nonfinite": 17}, "n_nonfinite", "n_nonfinite = 17"),
    "undeclared": ({"n_undeclared_labels": 1, "label_values": "[0, 1, 7]"}, "n_undeclared_labels", "[0, 1, 7]"),
    "fractional": ({"label_integral": False, "label_values": "[0, 0.5, 1]"}, "label_integral", "[0, 0.5, 1]"),
    "spacing-high": ({"spacing_z": 12.0}, "spacing_z", "spacing_z = 12.0"),
    "spacing-low": ({"spacing_x": 0.01}, "spacing_x", "spacing_x = 0.01"),
    "ct-min": ({"intensity_min": -3000.0}, "intensity_min", "intensity_min = -3000.0"),
    "ct-max": ({"intensity_max": 40000.0}, "intensity_max", "intensity_max = 40000.0"),
    "mr-huge": ({"modality": "MR", "modality_kind": "MR", "intensity_max": 3e8}, "intensity_max", "= 300000000.0"),
    "zero-axis": ({"shape_y": 0}, "shape_y", "shape_y = 0"),
}
N_GOOD = 4


@pytest.fixture(scope="module")
def mixed_result(tmp_path_factory: pytest.TempPathFactory) -> GateResult:
    """One gate run over 4 good cases plus one bad case per kind (case_004 ... in BAD_KINDS order).

    A single run keeps the suite fast (a gate call costs ~1 s) and checks more than separate runs would:
    every bad case must carry exactly its own reason, and no good case may be caught by another check.
    """
    records = good_records(N_GOOD)
    records += [record(N_GOOD + k, **kind[0]) for k, kind in enumerate(BAD_KINDS.values())]
    tolerant = QualityParams(max_reject_fraction=1.0, raw=RawQualityParams(min_cases=2))
    return gate(records, tmp_path_factory.mktemp("mixed"), tolerant)


def test_mixed_table_rejects_only_bad_cases(mixed_result: GateResult) -> None:
    assert sorted(mixed_result.rejected) == [f"case_{N_GOOD + k:03d}" for k in range(len(BAD_KINDS))]
    assert mixed_result.n_cases == N_GOOD + len(BAD_KINDS)
    assert mixed_result.n_rejected == len(BAD_KINDS)
    assert mixed_result.success  # max_reject_fraction = 1.0 and 4 accepted >= min_cases
    page = mixed_result.report_html.read_text()
    assert all(case in page for case in mixed_result.rejected)


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_each_bad_row_kind_rejects_its_case_with_its_reason(mixed_result: GateResult, kind: str) -> None:
    _, column, shown = BAD_KINDS[kind]
    case = f"case_{N_GOOD + list(BAD_KINDS).index(kind):03d}"

    checks = mixed_result.rejected[case]
    assert [c.column for c in checks] == [column]
    assert shown in checks[0].detail
    assert checks[0].expectation.startswith("expect_column_values_to_")
    summary = json.loads(mixed_result.summary_json.read_text())
    assert summary["rejected"][case][0]["column"] == column


def test_one_bad_case_within_fraction_passes(tmp_path: Path) -> None:
    result = gate([*good_records(4), record(4, affine_max_diff_mm=0.01)], tmp_path)

    assert result.success  # one rejected case out of five is within max_reject_fraction = 0.5
    assert list(result.rejected) == ["case_004"]
    assert (result.n_rejected, result.reject_fraction) == (1, 0.2)


def test_ct_detail_names_value_range_and_param(tmp_path: Path) -> None:
    result = gate([*good_records(3), record(3, intensity_min=-3000.0)], tmp_path)

    (check,) = result.rejected["case_003"]
    assert check == FailedCheck(
        expectation="expect_column_values_to_be_between",
        column="intensity_min",
        detail="intensity_min = -3000.0, expected between -1100 and 4000 where modality_kind == 'CT' "
        "[quality.raw.ct_range_hu]",
    )


def test_ct_range_does_not_apply_to_mr(tmp_path: Path) -> None:
    mr = {"modality": "FLAIR", "modality_kind": "MR", "intensity_min": -3000.0, "intensity_max": 40000.0}
    result = gate([*good_records(3), record(3, **mr)], tmp_path)

    assert result.success
    assert result.rejected == {}


def test_duplicate_case_ids_reject_both_rows_and_fail_dataset(tmp_path: Path) -> None:
    records = [*good_records(4), record(1, spacing_z=3.0)]  # a second, different "case_001"
    result = gate(records, tmp_path)

    assert not result.success
    assert list(result.rejected) == ["case_001"]
    assert result.n_rejected == 2  # both rows sharing the id
    assert result.reject_fraction == pytest.approx(0.4)
    (why,) = result.rejected["case_001"]
    assert why.column == "case_id"
    assert "'case_001' appears in 2 rows" in why.detail
    (failure,) = result.dataset_failures
    assert failure.expectation == "expect_column_values_to_be_unique"
    assert failure.column == "case_id"
    assert "'case_001'" in failure.detail


def test_mixed_channel_counts_fail_dataset(tmp_path: Path) -> None:
    result = gate([*good_records(3), record(3, n_channels=2)], tmp_path)

    assert not result.success
    assert result.rejected == {}
    (failure,) = result.dataset_failures
    assert failure.column == "n_channels"
    assert "values seen: 1, 2" in failure.detail


def test_too_many_rejected_fails(tmp_path: Path) -> None:
    params = QualityParams(max_reject_fraction=0.25, raw=RawQualityParams(min_cases=1))
    records = [*good_records(2), record(2, n_nonfinite=3), record(3, spacing_z=50.0)]
    result = gate(records, tmp_path, params)

    assert not result.success
    assert (result.n_rejected, result.reject_fraction) == (2, 0.5)
    (failure,) = result.dataset_failures
    assert failure.expectation == "expect_column_mean_to_be_between"
    assert failure.column is None
    assert failure.detail == "reject fraction = 0.5, expected at most 0.25 [quality.max_reject_fraction]"


def test_too_few_accepted_cases_fails(tmp_path: Path) -> None:
    params = QualityParams(max_reject_fraction=0.5, raw=RawQualityParams(min_cases=3))
    result = gate([*good_records(2), record(2, shape_z=0)], tmp_path, params)

    assert not result.success
    assert result.n_rejected == 1
    (failure,) = result.dataset_failures
    assert failure.expectation == "expect_column_sum_to_be_between"
    assert "accepted cases = 2" in failure.detail
    assert "quality.raw.min_cases" in failure.detail


def test_empty_table_fails_cleanly(tmp_path: Path) -> None:
    result = gate([], tmp_path)

    assert not result.success
    assert (result.n_cases, result.n_rejected, result.reject_fraction) == (0, 0, 0.0)
    first = result.dataset_failures[0]
    assert first.expectation == "expect_table_row_count_to_be_between"
    assert first.detail.startswith("no cases")
    assert json.loads(result.summary_json.read_text())["success"] is False
    assert "no cases" in result.report_html.read_text()


def test_summary_json_is_byte_identical_across_runs(tmp_path: Path) -> None:
    records = [*good_records(3), record(3, spacing_z=12.0, n_nonfinite=2, label_integral=False), record(4, shape_x=0)]
    result = gate(records, tmp_path, name="a")
    first = result.summary_json.read_bytes()
    second = gate(records, tmp_path, name="b").summary_json.read_bytes()

    assert first == second
    assert list(json.loads(first)) == sorted(json.loads(first))
    # several reasons for one case come in suite order, not in GX's (unstable) result order
    assert [c.column for c in result.rejected["case_003"]] == ["n_nonfinite", "label_integral", "spacing_z"]


def test_rerun_in_same_folder_replaces_data_docs(tmp_path: Path) -> None:
    gate(good_records(3), tmp_path)
    result = gate(good_records(3), tmp_path)

    pages = list((tmp_path / "r" / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 2  # one per suite (data + policy); the first run's pages were cleared
    assert result.success


def test_render_console_lists_case_check_and_detail(tmp_path: Path) -> None:
    from rich.console import Console

    result = gate([*good_records(3), record(3, spacing_z=12.0)], tmp_path)
    console = Console(record=True, width=200)
    console.print(render_console(result))
    text = console.export_text()

    assert "raw gate PASSED" in text
    assert "case_003" in text
    assert "spacing_z = 12.0" in text
    assert "[quality.raw.spacing_mm]" in text  # not swallowed as rich markup
