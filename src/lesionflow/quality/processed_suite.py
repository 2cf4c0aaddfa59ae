"""The processed gate: what each preprocessed case (one row of data/processed/metadata.csv) must meet.

Per case: spacing equals the plan, no NaN/Inf, z-scored channels have mean ~0 and std ~1 in their
normalization mask, the label set is unchanged by resampling, the foreground volume (mm³) survived
cropping and resampling, and shapes are within bounds. Dataset level: unique ids, at least one case,
and the shared reject policy (``quality.max_reject_fraction``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.quality.gate import run_gate
from lesionflow.quality.result import GatePolicy, GateResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

    from lesionflow.params import QualityParams

GATE = "processed"


def processed_expectations(params: QualityParams) -> list[Expectation]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    q = params.processed
    has_fg = Column("fg_volume_raw_mm3") > 0
    exps: list[Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"explain": "no preprocessed cases ({observed} rows)"}),
        gxe.ExpectColumnValuesToBeUnique(column="case_id", meta={"scope": "both"}),
        gxe.ExpectColumnValuesToBeBetween(
            column="spacing_dev_mm",
            max_value=q.spacing_tolerance_mm,
            notes="Every case must sit on the planned grid; the network assumes one voxel size.",
            meta={"param": "quality.processed.spacing_tolerance_mm"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_nonfinite",
            min_value=0,
            max_value=0,
            notes="NaN/Inf after normalization means a zero std or corrupt input.",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="zscore_mean_abs",
            max_value=q.zscore_mean_tolerance,
            notes="z-scored channels have mean 0 in their normalization mask.",
            meta={"param": "quality.processed.zscore_mean_tolerance"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="zscore_std_dev",
            max_value=q.zscore_std_tolerance,
            notes="z-scored channels have std 1 in their normalization mask.",
            meta={"param": "quality.processed.zscore_std_tolerance"},
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label_set_unchanged",
            value_set=[True],
            notes="Resampling must not invent or drop label classes.",
            meta={"explain": "raw labels {label_values_raw} vs processed {label_values_processed}"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="fg_kept_ratio",
            min_value=q.min_foreground_kept,
            max_value=q.max_foreground_gain,
            row_condition=has_fg,
            notes="Cropping and resampling must keep the lesion volume (mm³).",
            meta={"param": "quality.processed.min_foreground_kept"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="shape_min", min_value=q.shape_range[0], meta={"param": "quality.processed.shape_range"}
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="shape_max", max_value=q.shape_range[1], meta={"param": "quality.processed.shape_range"}
        ),
    ]
    return exps


def run_processed_gate(table: pd.DataFrame, params: QualityParams, report_dir: Path) -> GateResult:
    policy = GatePolicy(max_reject_fraction=params.max_reject_fraction)
    return run_gate(GATE, table, processed_expectations(params), policy, report_dir)
