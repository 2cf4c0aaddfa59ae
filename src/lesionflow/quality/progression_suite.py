"""The progression gate: what each PIE trajectory (one row) and the set of trajectories must meet (§9.7 item 14).

Table (id column ``trajectory_id``), built by ``validate-synthetic`` from the stored frames with
:mod:`lesionflow.quality.progression_checks`:

- ``frame_count_ok``: 1 when the trajectory has N + 1 frames as its settings say;
- ``outside_within_bound``: 1 when every voxel outside the ROI obeys ``|x_n - x_0| <= β1 · max(hi - x_0, x_0 - lo)``
  (float32 rounding allowed) and, in the exact mode (β1 = 0), changed by exactly 0;
- ``trend_rho``: Spearman ρ of the estimated lesion volume over the frames, signed so + is the direction asked for
  (NaN when the target equals the start severity; the mean skips it);
- ``step_change_ratio``: mean severity step of the second half / the first half (< 1: the edits converge).

Row level: the two hard invariants (a failing trajectory is rejected). Dataset level: at least one row, unique ids,
mean ``trend_rho`` above ``quality.synthetic.min_progression_rho`` (progression in expectation over cases, not in
every stochastic trajectory) and mean ``step_change_ratio`` at most ``quality.synthetic.max_step_change_ratio``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.quality.gate import run_gate
from lesionflow.quality.result import GatePolicy, GateResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

GATE = "progression"
ID_COLUMN = "trajectory_id"
PARAM_PREFIX = "quality.synthetic."
ROW_COLUMNS = ("frame_count_ok", "outside_within_bound", "trend_rho", "step_change_ratio")
#: trend_rho is NaN for a trajectory whose target equals its start severity (skipped by the mean)
REQUIRED_COLUMNS = ("frame_count_ok", "outside_within_bound", "step_change_ratio")
#: |x_n - x_0| may exceed the β1 bound by float32 rounding of x_0 + β (x - x_0) (values of order 10)
OUTSIDE_TOLERANCE = 1e-5


def progression_expectations(min_rho: float, max_step_ratio: float) -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"explain": "no trajectories ({observed} rows)"}),
        gxe.ExpectColumnValuesToBeUnique(column=ID_COLUMN, meta={"scope": "both"}),
        *[
            gxe.ExpectColumnValuesToNotBeNull(column=c, notes="Measured for every trajectory.")
            for c in REQUIRED_COLUMNS
        ],
        gxe.ExpectColumnValuesToBeBetween(
            column="frame_count_ok", min_value=1, max_value=1, notes="A trajectory has N + 1 frames (frame 0 = start)."
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="outside_within_bound",
            min_value=1,
            max_value=1,
            notes="Outside the ROI each frame may differ from the start by at most β1 times the clamp range "
            "(exactly 0 with β1 = 0).",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="trend_rho",
            min_value=min_rho,
            strict_min=True,
            notes="Severity (estimated lesion volume) must move toward the target over the frames: mean "
            "Spearman rho over trajectories.",
            meta={"param": PARAM_PREFIX + "min_progression_rho", "scope": "dataset", "label": "trend_rho"},
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="step_change_ratio",
            max_value=max_step_ratio,
            notes="The paper's convergence argument: later severity steps smaller than early ones.",
            meta={"param": PARAM_PREFIX + "max_step_change_ratio", "scope": "dataset", "label": "step_change_ratio"},
        ),
    ]


def run_progression_gate(
    table: pd.DataFrame, min_rho: float, max_step_ratio: float, report_dir: Path, *, data_docs: bool = True
) -> GateResult:
    """Validate the per-trajectory ``table`` and write the gate reports under ``report_dir``; no reject policy
    beyond the dataset checks (a rejected trajectory is simply not listed as accepted)."""
    policy = GatePolicy(max_reject_fraction=1.0, max_reject_fraction_param=PARAM_PREFIX + "max_reject_fraction")
    return run_gate(
        GATE,
        table,
        progression_expectations(min_rho, max_step_ratio),
        policy,
        report_dir,
        id_column=ID_COLUMN,
        data_docs=data_docs,
    )
