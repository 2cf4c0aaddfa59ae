"""Stage ``validate-raw``: the raw quality gate over the per-volume metadata table (data/raw/manifest.csv).

Policy: when the gate passes, each rejected case is moved from data/raw/cases/<id> to
data/quarantine/<id>/files with a reason.json and dropped from the manifest, so later stages only see
accepted cases. When the gate fails as a whole (too many rejected, too few cases, duplicate ids), nothing
is moved: a dataset-level failure usually means a wrong threshold or a wrong source, and moving half the
data out would hide that. The stage then raises :class:`GateFailed` naming the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lesionflow.catalog.artifacts import QUARANTINE, RAW_CASES, RAW_GATE_REPORT, RAW_MANIFEST
from lesionflow.catalog.digests import raw_digest
from lesionflow.catalog.readers import require, write_stage_summary
from lesionflow.manifest import CaseRecord, manifest_frame, read_manifest, write_manifest
from lesionflow.params import Params
from lesionflow.quality.findings import gate_failed, gate_findings, rejection_code, rejection_message
from lesionflow.quarantine import Rejection, record
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "validate-raw"


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.quality.raw_suite import run_raw_gate

    records = read_manifest(require(ws, RAW_MANIFEST))
    result = run_raw_gate(manifest_frame(records), params.quality, RAW_GATE_REPORT.at(ws))
    findings = gate_findings(result)
    moved = _quarantine_rejected(ws, records, result.rejected) if result.success else []
    report = result.report_html
    summary = {
        "success": result.success,
        "n_cases": result.n_cases,
        "n_rejected": result.n_rejected,
        "reject_fraction": result.reject_fraction,
        "quarantined": moved,
        "dataset_failures": [f.detail for f in result.dataset_failures],
        "raw_digest": raw_digest(ws),
        "report": str(report.relative_to(ws.root)) if report.is_relative_to(ws.root) else str(report),
    }
    summary_path = write_stage_summary(ws, STAGE, summary)
    if not result.success:
        raise gate_failed("raw", result, str(report), findings)
    outputs = {"report": str(summary["report"]), "summary": summary_path}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))


def _quarantine_rejected(ws: Workspace, records: list[CaseRecord], rejected: Mapping[str, Sequence[Any]]) -> list[str]:
    """Move each rejected case out of data/raw into quarantine (with reason.json) and out of the manifest."""
    by_id = {r.case_id: r for r in records}
    moved = []
    for case_id, checks in sorted(rejected.items()):
        rec = by_id.get(case_id)
        rejection = Rejection(
            case_id,
            STAGE,
            rejection_code(checks),
            rejection_message(checks),
            rec.source_uri if rec else "",
            rec.source_sha256 if rec else "",
        )
        record(QUARANTINE.at(ws), rejection, move_from=RAW_CASES.at(ws) / case_id)
        moved.append(case_id)
    if moved:
        write_manifest([r for r in records if r.case_id not in set(moved)], RAW_MANIFEST.at(ws))
    return moved
