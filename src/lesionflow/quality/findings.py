"""A gate's outcome in the words every stage uses: findings, quarantine codes and the whole-gate failure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lesionflow.errors import Finding, GateFailed


def gate_findings(result: Any) -> list[Finding]:
    """One finding per failed check of each rejected case, then one per dataset-level failure."""
    findings = [
        Finding(case_id, f"gate:{check.column or check.expectation}", check.detail)
        for case_id, checks in sorted(result.rejected.items())
        for check in checks
    ]
    return findings + [Finding("dataset", check.expectation, check.detail) for check in result.dataset_failures]


def rejection_code(checks: Sequence[Any]) -> str:
    """The quarantine code of a case rejected by a gate, e.g. ``gate:n_nonfinite,shape_match``."""
    return "gate:" + ",".join(sorted({c.column or c.expectation for c in checks}))


def rejection_message(checks: Sequence[Any]) -> str:
    return "; ".join(c.detail for c in checks)


def gate_failed(gate: str, result: Any, report: str, findings: Sequence[Finding]) -> GateFailed:
    """The one-line error of a gate that failed as a whole (nothing quarantined)."""
    reasons = "; ".join(c.detail.strip() for c in result.dataset_failures) or "see the report"
    return GateFailed(
        f"{gate} quality gate failed: {reasons}; nothing was quarantined. Report: {report}", tuple(findings)
    )
