"""Stage ``validate-processed``: the processed quality gate over data/processed/metadata.csv.

The store is an output of ``preprocess`` (and of DVC's lock for it), so this gate never edits it:
rejected cases get ``data/quarantine/<id>/reason.json`` and are left out of
``data/processed/accepted.json``, the list later stages train and evaluate on. As with the raw gate, a
failure of the gate as a whole quarantines nothing and stops the stage.
"""

from __future__ import annotations

import json

from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file
from lesionflow.params import Params
from lesionflow.quarantine import Rejection, record
from lesionflow.stages.base import StageResult, write_json
from lesionflow.stages.gates import gate_failed, gate_findings, rejection_code, rejection_message
from lesionflow.stages.plan import plans_digest
from lesionflow.stages.preprocess import metadata_frame, metadata_path
from lesionflow.workspace import Workspace

STAGE = "validate-processed"


def accepted_path(ws: Workspace):
    return ws.processed / "accepted.json"


def inputs(ws: Workspace, params: Params) -> dict[str, str]:
    path = metadata_path(ws)
    return {"metadata": sha256_file(path) if path.exists() else "absent", "plans": plans_digest(ws)}


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.quality.processed_suite import run_processed_gate

    if not metadata_path(ws).exists():
        raise SourceError("data/processed/metadata.csv does not exist; run `lesionflow stage preprocess` first")
    table = metadata_frame(ws)
    result = run_processed_gate(table, params.quality, ws.reports / "quality" / "processed")
    findings = gate_findings(result)
    report = str(result.report_html.relative_to(ws.root))
    if not result.success:
        raise gate_failed("processed", result, report, findings)
    for case_id, checks in sorted(result.rejected.items()):
        record(ws.quarantine, Rejection(case_id, STAGE, rejection_code(checks), rejection_message(checks)))
    accepted = sorted(set(table["case_id"]) - set(result.rejected))
    write_json(accepted_path(ws), {"cases": accepted, "metadata_digest": sha256_file(metadata_path(ws))})
    summary = {
        "success": True,
        "n_cases": result.n_cases,
        "n_rejected": result.n_rejected,
        "n_accepted": len(accepted),
        "rejected": sorted(result.rejected),
        "report": report,
    }
    write_json(ws.stage_report_dir(STAGE) / "summary.json", summary)
    outputs = {"accepted": "data/processed/accepted.json", "report": report, "summary": f"reports/{STAGE}/summary.json"}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))


def accepted_cases(ws: Workspace) -> list[str]:
    return list(json.loads(accepted_path(ws).read_text())["cases"])
