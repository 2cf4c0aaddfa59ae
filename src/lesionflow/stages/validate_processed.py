"""Stage ``validate-processed``: the processed quality gate over data/processed/metadata.csv.

The store is an output of ``preprocess`` (and of DVC's lock for it), so this gate never edits it:
rejected cases get ``data/quarantine/<id>/reason.json`` and are left out of
``data/processed/accepted.json``, the list later stages train and evaluate on. As with the raw gate, a
failure of the gate as a whole quarantines nothing and stops the stage.
"""

from __future__ import annotations

import json

from lesionflow.errors import GateFailed, SourceError
from lesionflow.hashing import sha256_file
from lesionflow.params import Params
from lesionflow.quarantine import Rejection, record
from lesionflow.stages.base import Finding, StageResult, write_json
from lesionflow.stages.plan import plans_digest
from lesionflow.stages.preprocess import METADATA_COLUMNS, metadata_path, read_metadata
from lesionflow.workspace import Workspace

STAGE = "validate-processed"
_FLOATS = {
    "spacing_x",
    "spacing_y",
    "spacing_z",
    "spacing_dev_mm",
    "zscore_mean_abs",
    "zscore_std_dev",
    "fg_volume_raw_mm3",
    "fg_volume_processed_mm3",
    "fg_kept_ratio",
}
_INTS = {"shape_x", "shape_y", "shape_z", "shape_min", "shape_max", "n_nonfinite"}


def accepted_path(ws: Workspace):
    return ws.processed / "accepted.json"


def inputs(ws: Workspace, params: Params) -> dict[str, str]:
    path = metadata_path(ws)
    return {"metadata": sha256_file(path) if path.exists() else "absent", "plans": plans_digest(ws)}


def run(ws: Workspace, params: Params) -> StageResult:
    import pandas as pd

    from lesionflow.quality.processed_suite import run_processed_gate

    rows = read_metadata(ws)
    if not metadata_path(ws).exists():
        raise SourceError("data/processed/metadata.csv does not exist; run `lesionflow stage preprocess` first")
    table = pd.DataFrame(
        [
            {
                k: (
                    float(v)
                    if k in _FLOATS
                    else int(v)
                    if k in _INTS
                    else v == "True"
                    if k == "label_set_unchanged"
                    else v
                )
                for k, v in row.items()
            }
            for _, row in sorted(rows.items())
        ],
        columns=list(METADATA_COLUMNS),
    )
    result = run_processed_gate(table, params.quality, ws.reports / "quality" / "processed")
    findings = [
        Finding(cid, f"gate:{c.column or c.expectation}", c.detail)
        for cid, checks in sorted(result.rejected.items())
        for c in checks
    ]
    findings += [Finding("dataset", c.expectation, c.detail) for c in result.dataset_failures]
    report = str(result.report_html.relative_to(ws.root))
    if not result.success:
        reasons = "; ".join(c.detail.strip() for c in result.dataset_failures) or "see the report"
        raise GateFailed(
            f"processed quality gate failed: {reasons}; nothing was quarantined. Report: {report}", tuple(findings)
        )
    for case_id, checks in sorted(result.rejected.items()):
        code = "gate:" + ",".join(sorted({c.column or c.expectation for c in checks}))
        record(ws.quarantine, Rejection(case_id, STAGE, code, "; ".join(c.detail for c in checks)))
    accepted = sorted(set(rows) - set(result.rejected))
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
