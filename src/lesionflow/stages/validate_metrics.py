"""Stage ``validate-metrics``: the metrics gate, and the champion comparison on the same test cases.

The champion (the registry's ``<model>@champion``) is re-evaluated on *this* test split with the same
settings unless it is byte-identical to the candidate, so the comparison never mixes test sets. The
floors (no NaN, per-case and mean Dice) stop the pipeline; the champion comparison only decides whether
``register`` moves the ``champion`` alias. The registry is read on every run (no stage cache).
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from lesionflow.catalog.artifacts import EVALUATE_CASES, METRICS, METRICS_GATE_REPORT, RAW_MANIFEST, stage_report_dir
from lesionflow.catalog.readers import write_stage_summary
from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file
from lesionflow.params import Params
from lesionflow.quality.findings import gate_failed, gate_findings
from lesionflow.seg.evaluation import evaluate_cases
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace

STAGE = "validate-metrics"


def _case_table(cases_csv: Any) -> Any:
    import pandas as pd

    table = pd.read_csv(cases_csv, dtype={"case_id": str})
    grouped = table.groupby("case_id", sort=True)
    out = grouped[["dice", "hd95_mm", "nsd"]].mean()
    out["n_nan"] = grouped[["dice", "hd95_mm", "nsd"]].apply(lambda g: int(g.isna().sum().sum()))
    return out.reset_index()


def _champion(ws: Workspace, params: Params, metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(champion facts, per-case champion Dice) — empty per-case Dice when there is no champion."""
    from lesionflow.manifest import read_manifest
    from lesionflow.registry.publish import champion_info
    from lesionflow.registry.tracking import download_model_files, resolve_tracking_uri

    uri = resolve_tracking_uri(params.registry.tracking_uri, ws.root)
    champ = champion_info(uri, params.registry.model_name)
    if champ is None:
        return {"status": "no_champion"}, {}
    ref = f"{params.registry.model_name}/{champ.version}"
    folder = ws.cache / "champion" / f"v{champ.version}"
    if folder.exists():
        shutil.rmtree(folder)
    download_model_files(ref, uri, folder)
    facts: dict[str, Any] = {"version": champ.version, "run_id": champ.run_id}
    if sha256_file(folder / "model.safetensors") == metrics["model_sha256"]:
        return {**facts, "status": "same_model"}, {}
    cases = set(metrics["cases"])
    records = [r for r in read_manifest(RAW_MANIFEST.at(ws)) if r.case_id in cases]
    report = evaluate_cases(
        folder, ws, records, params.evaluate, stage_report_dir(ws, STAGE) / "champion", ws.cache / "champion" / "pred"
    )
    table = report.table.groupby("case_id")["dice"].mean()
    facts["mean_dice"] = float(report.summary["mean_dice"])
    return {**facts, "status": "compared"}, {str(k): float(v) for k, v in table.items()}


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.quality.metrics_suite import CHAMPION_COLUMN, run_metrics_gate

    if not METRICS.at(ws).exists() or not EVALUATE_CASES.at(ws).exists():
        raise SourceError(f"{METRICS.path} is missing; run `lesionflow stage evaluate` first")
    metrics = json.loads(METRICS.at(ws).read_text())
    table = _case_table(EVALUATE_CASES.at(ws))
    champion, champion_dice = _champion(ws, params, metrics)
    table[CHAMPION_COLUMN] = [
        float(d) - champion_dice[c] if c in champion_dice else 0.0
        for c, d in zip(table["case_id"], table["dice"], strict=True)
    ]
    result = run_metrics_gate(table, params.quality.metrics, METRICS_GATE_REPORT.at(ws))
    findings = gate_findings(result)
    champion_failures = [f for f in result.dataset_failures if f.column == CHAMPION_COLUMN]
    blocking = [f for f in result.dataset_failures if f.column != CHAMPION_COLUMN]
    report = str(result.report_html.relative_to(ws.root))
    if blocking:
        raise gate_failed("metrics", result, report, [f for f in findings if CHAMPION_COLUMN not in f.detail])
    if champion["status"] == "compared":
        champion["candidate_mean_dice"] = float(table["dice"].mean())
        champion["delta"] = float(table[CHAMPION_COLUMN].mean())
        champion["status"] = "failed" if champion_failures else "passed"
    champion["tolerance"] = params.quality.metrics.champion_tolerance
    promote = champion["status"] in ("passed", "no_champion")
    summary = {
        "success": True,
        "mean_dice": float(table["dice"].mean()),
        "min_case_dice": float(table["dice"].min()),
        "n_cases": len(table),
        "champion": champion,
        "promote_champion": promote,
        "model_sha256": metrics["model_sha256"],
        "report": report,
    }
    outputs = {"report": report, "summary": write_stage_summary(ws, STAGE, summary)}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))
