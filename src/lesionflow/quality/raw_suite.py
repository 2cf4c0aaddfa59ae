"""The raw gate: which expectations the raw manifest (one :class:`~lesionflow.manifest.CaseRecord` per case) must meet.

The row-level checks reproduce nnU-Net's dataset integrity checks (image/label shape and geometry agreement,
no NaN, labels within the declared set) plus plausibility ranges from ``quality.raw`` in params.yaml. A case
failing any of them is rejected; the gate fails only on dataset-level problems (duplicate ids, mixed channel
counts, no cases) or when too many cases are rejected (``quality.max_reject_fraction``, ``quality.raw.min_cases``).

CT-only and non-CT intensity checks use GX 1.x ``row_condition`` with a ``Column`` condition object
(``Column("modality_kind") == "CT"``), which GX turns into a ``DataFrame.query`` filter for pandas batches;
no derived boolean column is needed.
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

GATE = "raw"
SHAPE_EXPLAIN = "image {shape_x}x{shape_y}x{shape_z} vs label {label_shape_x}x{label_shape_y}x{label_shape_z}"


def raw_expectations(params: QualityParams) -> list[Expectation]:
    """The raw suite, in report order: dataset-level checks first, then per-case checks."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    raw = params.raw
    is_ct = Column("modality_kind") == "CT"
    not_ct = Column("modality_kind") != "CT"
    spacing_lo, spacing_hi = raw.spacing_mm
    hu_lo, hu_hi = raw.ct_range_hu
    exps: list[Expectation] = [
        # dataset level
        gxe.ExpectTableRowCountToBeBetween(
            min_value=1,
            notes="An empty manifest means ingest found nothing; every later stage would be vacuous.",
            meta={"explain": "no cases: the raw manifest has {observed} rows (check ingest.source)"},
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="case_id",
            notes="Case ids key every later artifact; a duplicate would silently overwrite a case.",
            meta={"scope": "both"},
        ),
        gxe.ExpectColumnUniqueValueCountToBeBetween(
            column="n_channels",
            max_value=1,
            notes="A network has one input channel count; nnU-Net requires the same channels for every case.",
            meta={"label": "distinct n_channels values"},
        ),
        # per case: image/label agreement (nnU-Net's verify_dataset_integrity)
        gxe.ExpectColumnValuesToBeInSet(
            column="shape_match",
            value_set=[True],
            notes="The label must cover the image voxel for voxel.",
            meta={"explain": SHAPE_EXPLAIN},
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="affine_max_diff_mm"),
        gxe.ExpectColumnValuesToBeBetween(
            column="affine_max_diff_mm",
            max_value=raw.affine_tolerance_mm,
            notes="nnU-Net checks that image and label spacing, origin and direction agree.",
            meta={"param": "quality.raw.affine_tolerance_mm"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_nonfinite",
            min_value=0,
            max_value=0,
            notes="NaN/Inf voxels poison normalisation statistics and losses.",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_undeclared_labels",
            min_value=0,
            max_value=0,
            notes="Label values outside dataset.json's declared labels would become unknown classes.",
            meta={"explain": "label values present: {label_values}"},
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label_integral",
            value_set=[True],
            notes="Fractional label values mean an interpolated (resampled) label map.",
            meta={"explain": "label values present: {label_values}"},
        ),
    ]
    # per case: geometry plausibility
    for axis in "xyz":
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=f"spacing_{axis}"))
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=f"spacing_{axis}",
                min_value=spacing_lo,
                max_value=spacing_hi,
                notes="Voxel size in mm; values outside the range usually mean a broken header (m vs mm).",
                meta={"param": "quality.raw.spacing_mm"},
            )
        )
    for axis in "xyz":
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=f"shape_{axis}",
                min_value=1,
                notes="A zero-length axis means an empty or truncated volume.",
            )
        )
    # per case: intensity plausibility, split by modality
    for column in ("intensity_min", "intensity_max"):
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column,
                min_value=hu_lo,
                max_value=hu_hi,
                row_condition=is_ct,
                notes="CT intensities are Hounsfield units; values outside the range mean unrescaled raw data.",
                meta={"param": "quality.raw.ct_range_hu"},
            )
        )
    for column in ("intensity_min", "intensity_max"):
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column,
                min_value=-raw.max_abs_intensity,
                max_value=raw.max_abs_intensity,
                row_condition=not_ct,
                notes="MR and other intensities are arbitrary units, but magnitudes this large mean corrupt data.",
                meta={"param": "quality.raw.max_abs_intensity"},
            )
        )
    return exps


def run_raw_gate(table: pd.DataFrame, params: QualityParams, report_dir: Path) -> GateResult:
    """Validate the raw manifest table; write ``index.html``, ``summary.json`` and Data Docs under ``report_dir``.

    ``table`` is :func:`lesionflow.manifest.manifest_frame` of the raw manifest. Returns the outcome; the
    caller decides what to print and whether to raise :class:`~lesionflow.errors.GateFailed`.
    """
    policy = GatePolicy(
        max_reject_fraction=params.max_reject_fraction,
        max_reject_fraction_param="quality.max_reject_fraction",
        min_accepted=params.raw.min_cases,
        min_accepted_param="quality.raw.min_cases",
    )
    return run_gate(GATE, table, raw_expectations(params), policy, Path(report_dir))
