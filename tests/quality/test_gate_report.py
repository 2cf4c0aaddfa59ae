"""The gate's HTML report shows what each check measured, and its Data Docs list the validations without scripts."""

from __future__ import annotations

import re
from pathlib import Path

import great_expectations.expectations as gxe
import pandas as pd

from lesionflow.quality.gate import run_gate
from lesionflow.quality.report import VALIDATIONS_PAGE
from lesionflow.quality.result import GatePolicy


def _gate(tmp_path: Path) -> Path:
    table = pd.DataFrame({"case_id": ["a", "b", "c"], "spacing_mm": [0.7, 1.25, 3.5]})
    expectations = [
        gxe.ExpectColumnValuesToBeBetween(column="spacing_mm", min_value=0.1, max_value=10.0),
        gxe.ExpectTableRowCountToBeBetween(min_value=2),
    ]
    result = run_gate("raw", table, expectations, GatePolicy(max_reject_fraction=0.25), tmp_path / "raw")
    assert result.success
    return tmp_path / "raw"


def test_a_passing_report_shows_the_measured_values_beside_the_bounds(tmp_path: Path) -> None:
    page = (_gate(tmp_path) / "index.html").read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)
    cells = [re.findall(r"<td>(?:<code>)?(.*?)(?:</code>)?</td>", row) for row in rows]
    measured = {(c[1], c[2]): c[4] for c in cells if len(c) == 7}
    assert measured[("expect_column_values_to_be_between", "spacing_mm")] == "0.7 .. 3.5; 0 of 3 rows unexpected"
    assert measured[("expect_table_row_count_to_be_between", "")] == "3"
    assert measured[("expect_column_mean_to_be_between", "rejected")] == "0.0"  # the policy's reject fraction


def test_the_validation_pages_are_listed_without_scripts(tmp_path: Path) -> None:
    docs = _gate(tmp_path) / "data_docs"
    listing = (docs / VALIDATIONS_PAGE).read_text()
    assert "<script" not in listing
    assert "http" not in listing
    links = re.findall(r'href="([^"]+)"', listing)
    assert len(links) == 2  # the data suite and the policy suite
    assert all((docs / link).is_file() for link in links)
    assert [s for s in re.findall(r">(raw(?:_policy)?)</a>", listing)] == ["raw", "raw_policy"]
    assert f'href="data_docs/{VALIDATIONS_PAGE}"' in (docs.parent / "index.html").read_text()
