"""The processed gate: what each preprocessed case (one row of data/processed/metadata.csv) must meet.

Per case: spacing equals the plan, no NaN/Inf, z-scored channels have mean ~0 and std ~1 in their
normalization mask, the stored image stays within its normalized intensity range, the label set is
unchanged by resampling, the foreground volume (mm³) survived cropping and resampling, and shapes are
within bounds. Dataset level: unique ids, at least one case, and the shared reject policy
(``quality.max_reject_fraction``).

The z-score columns are the statistics *recorded where normalization happened* (on the crop, before
resampling, in the normalization's own mask; :mod:`lesionflow.preprocess.normstats`), never recomputed on
the stored grid: cubic resampling smears an exact-zero background into small non-zero values, so the
non-zero voxels of a resampled image are not the normalization mask (issue 17: std 0.71 on valid MR). The
stored image itself is checked where resampling preserves it: finite values and ``range_excess``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.quality.gate import run_gate
from lesionflow.quality.result import GatePolicy, GateResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

    from lesionflow.params import QualityParams

GATE = "processed"
# Columns written since the z-score statistics are recorded before resampling (issue 17): a metadata.csv
# without them was written by an older preprocess whose z-score columns mean something else.
RECORD_COLUMNS = ("intensity_min", "intensity_max", "range_excess")


def stale_metadata_message(columns: Iterable[str], path: str) -> str | None:
    """One line asking to rerun preprocess when the table lacks :data:`RECORD_COLUMNS`, else None."""
    missing = [c for c in RECORD_COLUMNS if c not in set(columns)]
    if not missing:
        return None
    return (
        f"{path} was written by an older preprocess (no column {', '.join(missing)}): its z-score statistics "
        f"were measured after resampling; delete {path} and run `lesionflow stage preprocess` again"
    )


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
    ]
    # empty cells (a hand-edited or truncated row) would pass a between-check: GX skips nulls
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("zscore_mean_abs", "zscore_std_dev", "range_excess")]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(
            column="zscore_mean_abs",
            max_value=q.zscore_mean_tolerance,
            notes="z-scored channels have mean 0 in their normalization mask (measured before resampling).",
            meta={"param": "quality.processed.zscore_mean_tolerance"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="zscore_std_dev",
            max_value=q.zscore_std_tolerance,
            notes="z-scored channels have std 1 in their normalization mask (measured before resampling).",
            meta={"param": "quality.processed.zscore_std_tolerance"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="range_excess",
            min_value=0,
            max_value=q.max_range_excess,
            notes=(
                "The stored image must stay within the intensity range of its normalized crop, up to the "
                "cubic spline's overshoot at sharp edges; an image that was not normalized leaves it by far."
            ),
            meta={
                "param": "quality.processed.max_range_excess",
                "explain": "stored intensities [{intensity_min}, {intensity_max}]",
            },
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
