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


def case_table(cases_csv: Any) -> Any:
    """The gate's table from evaluate's cases.csv: per case ``dice``, ``hd95_mm``, ``nsd`` as means over the
    classes' *defined* values (NaN when none is: a case without lesion and without prediction has no Dice), and
    ``n_nan``: values missing although the empty-mask convention (lesionflow.seg.metrics, by each row's voxel
    counts) defines them. Undefined-by-convention values are skipped by the gate's checks (great-expectations
    ignores nulls in value and mean expectations), so only a truly missing number fails it."""
    import pandas as pd

    from lesionflow.seg.metrics import METRICS, outcome

    table = pd.read_csv(cases_csv, dtype={"case_id": str})
    kinds = [outcome(int(t), int(p)) for t, p in zip(table["truth_voxels"], table["pred_voxels"], strict=True)]
    defined = {  # which metrics the convention defines for each outcome
        "present": set(METRICS),
        "missed": {"dice", "nsd"},
        "false_positive": {"dice", "nsd"},
        "absent": set(),
    }
    unexpected = [
        sum(1 for m in METRICS if m in defined[kind] and pd.isna(row[m]))
        for kind, (_, row) in zip(kinds, table.iterrows(), strict=True)
    ]
    out = table.groupby("case_id", sort=True)[list(METRICS)].mean()  # pandas skips NaN
    out["n_nan"] = table.assign(n_nan=unexpected).groupby("case_id", sort=True)["n_nan"].sum().astype(int)
    return out.reset_index()


def champion_deltas(table: Any, champion_dice: dict[str, float]) -> list[float]:
    """Candidate minus champion Dice per row of :func:`case_table`: 0 for a case the champion was not scored on
    (no champion: no difference); NaN where either Dice is undefined, so the gate's mean leaves it out."""
    import math

    out = []
    for case, candidate in zip(table["case_id"], table["dice"], strict=True):
        if case not in champion_dice:
            out.append(0.0)
        elif math.isnan(float(candidate)) or math.isnan(champion_dice[case]):
            out.append(float("nan"))
        else:
            out.append(float(candidate) - champion_dice[case])
    return out


def _defined(value: float) -> float | None:
    """A summary number, or None (JSON null) when undefined: a NaN never reaches a JSON summary."""
    return None if value != value else float(value)


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
    table = report.table.groupby("case_id")["dice"].mean()  # over defined classes, as case_table; NaN if none
    facts["mean_dice"] = report.summary["mean_dice"]  # None when no value is defined
    return {**facts, "status": "compared"}, {str(k): float(v) for k, v in table.items()}


def run(ws: Workspace, params: Params) -> StageResult:
    from lesionflow.quality.metrics_suite import CHAMPION_COLUMN, run_metrics_gate

    if not METRICS.at(ws).exists() or not EVALUATE_CASES.at(ws).exists():
        raise SourceError(f"{METRICS.path} is missing; run `lesionflow stage evaluate` first")
    metrics = json.loads(METRICS.at(ws).read_text())
    table = case_table(EVALUATE_CASES.at(ws))
    champion, champion_dice = _champion(ws, params, metrics)
    table[CHAMPION_COLUMN] = champion_deltas(table, champion_dice)
    result = run_metrics_gate(table, params.quality.metrics, METRICS_GATE_REPORT.at(ws))
    findings = gate_findings(result)
    champion_failures = [f for f in result.dataset_failures if f.column == CHAMPION_COLUMN]
    blocking = [f for f in result.dataset_failures if f.column != CHAMPION_COLUMN]
    report = str(result.report_html.relative_to(ws.root))
    if blocking:
        raise gate_failed("metrics", result, report, [f for f in findings if CHAMPION_COLUMN not in f.detail])
    if champion["status"] == "compared":
        champion["candidate_mean_dice"] = _defined(table["dice"].mean())
        champion["delta"] = _defined(table[CHAMPION_COLUMN].mean())
        champion["status"] = "failed" if champion_failures else "passed"
    champion["tolerance"] = params.quality.metrics.champion_tolerance
    promote = champion["status"] in ("passed", "no_champion")
    summary = {
        "success": True,
        "mean_dice": _defined(table["dice"].mean()),  # over cases with a defined Dice (case_table)
        "min_case_dice": _defined(table["dice"].min()),
        "n_cases": len(table),
        "n_cases_without_dice": int(table["dice"].isna().sum()),
        "champion": champion,
        "promote_champion": promote,
        "model_sha256": metrics["model_sha256"],
        "report": report,
    }
    outputs = {"report": report, "summary": write_stage_summary(ws, STAGE, summary)}
    return StageResult(STAGE, True, summary, outputs, tuple(findings))
