"""Stage ``validate-raw``: the raw quality gate over the per-volume metadata table (data/raw/manifest.csv).

Policy: when the gate passes, each rejected case is moved from data/raw/cases/<id> to
data/quarantine/<id>/files with a reason.json and dropped from the manifest, so later stages only see
accepted cases. When the gate fails as a whole (too many rejected, too few cases, duplicate ids), nothing
is moved: a dataset-level failure usually means a wrong threshold or a wrong source, and moving half the
data out would hide that. The stage then raises :class:`GateFailed` naming the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lesionflow.errors import SourceError
from lesionflow.manifest import CaseRecord, manifest_frame, read_manifest, write_manifest
from lesionflow.params import Params
from lesionflow.quarantine import Rejection, record
from lesionflow.stages.base import StageResult, write_json
from lesionflow.stages.gates import gate_failed, gate_findings, rejection_code, rejection_message
from lesionflow.stages.ingest import raw_digest
from lesionflow.workspace import Workspace

STAGE = "validate-raw"


def report_dir(ws: Workspace) -> Path:
    return ws.reports / "quality" / "raw"


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.quality.raw_suite import run_raw_gate

    if not ws.raw_manifest.exists():
        raise SourceError("data/raw/manifest.csv does not exist; run `lesionflow stage ingest` first")
    records = read_manifest(ws.raw_manifest)
    result = run_raw_gate(manifest_frame(records), params.quality, report_dir(ws))
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
    write_json(ws.stage_report_dir(STAGE) / "summary.json", summary)
    if not result.success:
        raise gate_failed("raw", result, str(report), findings)
    outputs = {"report": str(summary["report"]), "summary": f"reports/{STAGE}/summary.json"}
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
        record(ws.quarantine, rejection, move_from=ws.raw_cases / case_id)
        moved.append(case_id)
    if moved:
        write_manifest([r for r in records if r.case_id not in set(moved)], ws.raw_manifest)
    return moved


def inputs(ws: Workspace, params: Params) -> dict[str, str]:
    return {"raw": raw_digest(ws)}
