"""The metrics gate: what the candidate model's per-case test metrics must meet.

Table: one row per test case with its mean over classes (``dice``, ``hd95_mm``, ``nsd``), ``n_nan`` (NaN
among the metrics the evaluation convention defines for its classes: a class empty in reference and prediction
is undefined by design and not counted) and ``dice_vs_champion`` (candidate minus champion Dice on the same case; 0
without a champion). Checks: no NaN and no case below ``quality.metrics.min_case_dice`` (each fails the
gate, naming the cases), mean Dice at least ``quality.metrics.min_mean_dice``, and the champion
comparison: mean ``dice_vs_champion`` >= -``quality.metrics.champion_tolerance``. The champion check is
reported like the others but does not block registration: it only decides whether ``champion`` moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.quality.gate import run_gate
from lesionflow.quality.result import GatePolicy, GateResult

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

    from lesionflow.params import MetricsQualityParams

GATE = "metrics"
CHAMPION_COLUMN = "dice_vs_champion"


def metrics_expectations(q: MetricsQualityParams) -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"explain": "no evaluated test cases ({observed} rows)"}),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_nan",
            min_value=0,
            max_value=0,
            notes="A NaN metric hides a failed case; metrics define empty-mask cases explicitly.",
            meta={"scope": "both"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="dice",
            min_value=q.min_case_dice,
            notes="No test case may fall below the per-case Dice floor.",
            meta={"scope": "both", "param": "quality.metrics.min_case_dice"},
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="dice",
            min_value=q.min_mean_dice,
            notes="Mean foreground Dice over the test cases.",
            meta={"param": "quality.metrics.min_mean_dice"},
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column=CHAMPION_COLUMN,
            min_value=-q.champion_tolerance,
            notes="The candidate may trail the current champion on the same test cases by at most the tolerance.",
            meta={"param": "quality.metrics.champion_tolerance"},
        ),
    ]


def run_metrics_gate(table: pd.DataFrame, q: MetricsQualityParams, report_dir: Path) -> GateResult:
    # Row failures are dataset failures here (scope "both"), so the reject-fraction policy adds nothing.
    return run_gate(GATE, table, metrics_expectations(q), GatePolicy(max_reject_fraction=1.0), report_dir)
