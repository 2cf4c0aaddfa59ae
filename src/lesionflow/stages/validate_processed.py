"""Stage ``validate-processed``: the processed quality gate over data/processed/metadata.csv.

The store is an output of ``preprocess`` (and of DVC's lock for it), so this gate never edits it:
rejected cases get ``data/quarantine/<id>/reason.json`` and are left out of
``data/processed/accepted.json``, the list later stages train and evaluate on. As with the raw gate, a
failure of the gate as a whole quarantines nothing and stops the stage.
"""

from __future__ import annotations

import csv

from lesionflow.catalog.artifacts import ACCEPTED, METADATA, PROCESSED_GATE_REPORT, QUARANTINE
from lesionflow.catalog.readers import metadata_frame, require, write_accepted, write_stage_summary
from lesionflow.errors import SourceError
from lesionflow.params import Params
from lesionflow.quality.findings import gate_failed, gate_findings, rejection_code, rejection_message
from lesionflow.quarantine import Rejection, record
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "validate-processed"


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.quality.processed_suite import run_processed_gate, stale_metadata_message

    # A verdict is about the metadata judged now: the old list goes first, so a gate that fails (or a crash)
    # leaves no accepted list a later stage could read (catalog.readers.accepted_cases also checks its digest).
    ACCEPTED.at(ws).unlink(missing_ok=True)

    with require(ws, METADATA).open(newline="") as fh:
        header = next(csv.reader(fh), [])
    stale = stale_metadata_message(header, METADATA.path)
    if stale is not None:
        raise SourceError(stale)  # checked on the file: metadata_frame fills missing columns with NaN
    table = metadata_frame(ws)
    result = run_processed_gate(table, params.quality, PROCESSED_GATE_REPORT.at(ws))
    findings = gate_findings(result)
    report = str(result.report_html.relative_to(ws.root))
    if not result.success:
        raise gate_failed("processed", result, report, findings)
    for case_id, checks in sorted(result.rejected.items()):
        record(QUARANTINE.at(ws), Rejection(case_id, STAGE, rejection_code(checks), rejection_message(checks)))
    accepted = sorted(set(table["case_id"]) - set(result.rejected))
    write_accepted(ws, accepted)
    summary = {
        "success": True,
        "n_cases": result.n_cases,
        "n_rejected": result.n_rejected,
        "n_accepted": len(accepted),
        "rejected": sorted(result.rejected),
        "report": report,
    }
    outputs = {"accepted": ACCEPTED.path, "report": report, "summary": write_stage_summary(ws, STAGE, summary)}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))
