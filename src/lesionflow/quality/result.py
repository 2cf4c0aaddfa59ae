"""What a quality gate returns and how strict it is: the types :mod:`~lesionflow.quality.gate` produces and
:mod:`~lesionflow.quality.report` renders (kept apart from both, so neither imports the other for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["FailedCheck", "GatePolicy", "GateResult"]


@dataclass(frozen=True)
class FailedCheck:
    """One failed expectation, for one case (row-level) or for the whole table (dataset-level)."""

    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_between"
    column: str | None  # None for table-level expectations
    detail: str  # one human line with the observed value and the allowed range or set


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate run; ``success`` is what the stage gates on."""

    gate: str  # "raw", "processed", ...
    success: bool  # no dataset-level failure (policy checks included)
    n_cases: int  # rows in the table
    n_rejected: int  # rows rejected (all rows sharing a duplicated id count)
    reject_fraction: float  # n_rejected / n_cases (0.0 for an empty table)
    rejected: dict[str, tuple[FailedCheck, ...]]  # case_id -> why, sorted by case id
    dataset_failures: tuple[FailedCheck, ...]  # table-level expectations that failed
    report_html: Path
    data_docs_index: Path | None
    summary_json: Path

    @property
    def n_accepted(self) -> int:
        return self.n_cases - self.n_rejected


@dataclass(frozen=True)
class GatePolicy:
    """How many rejections a gate tolerates, and which params.yaml keys say so (named in failure details)."""

    max_reject_fraction: float
    max_reject_fraction_param: str = "quality.max_reject_fraction"
    min_accepted: int | None = None  # None: no lower bound on accepted cases
    min_accepted_param: str | None = None
