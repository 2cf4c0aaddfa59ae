"""Stage ``evaluate``: the trained model on the test split, scored on the original grid.

Writes ``data/predictions/<case>.nii.gz`` (label values on the raw grid, raw affine),
``reports/metrics.json`` (DVC metrics: means over cases and per class, the test-split digest and the
model digest), ``reports/evaluate/cases.csv`` (per case and class: Dice, HD95 mm, NSD),
``reports/evaluate/boxplot.png`` and ``reports/evaluate/montage.png`` (best and worst cases).
:func:`evaluate_cases` is also what ``lesionflow evaluate --model REF --data DIR`` runs on any ingested
workspace with a registered model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.manifest import CaseRecord, read_manifest
from lesionflow.params import EvaluateParams, Params
from lesionflow.stages.base import StageResult, rich_progress, write_json
from lesionflow.stages.segdata import resolve_device, segmenter_dir, splits
from lesionflow.workspace import Workspace

STAGE = "evaluate"


def metrics_path(ws: Workspace) -> Path:
    return ws.reports / "metrics.json"


def cases_csv_path(ws: Workspace) -> Path:
    return ws.stage_report_dir(STAGE) / "cases.csv"


def predictions_dir(ws: Workspace) -> Path:
    return ws.root / "data" / "predictions"


def _digest(path: Path) -> str:
    return sha256_file(path) if path.exists() else "absent"


def inputs(ws: Workspace, params: Params) -> dict[str, str]:
    model = segmenter_dir(ws)
    return {
        "model": _digest(model / "model.safetensors"),
        "model_config": _digest(model / "config.json"),
        "raw_manifest": _digest(ws.raw_manifest),
        "accepted": _digest(ws.processed / "accepted.json"),
    }


def split_digest(records: list[CaseRecord]) -> str:
    """Digest of a set of cases by content: (case id, image sha256, label sha256), sorted."""
    return sha256_json(sorted([r.case_id, r.image_sha256, r.label_sha256] for r in records))


@dataclass(frozen=True)
class EvaluationReport:
    summary: dict[str, Any]  # means and per-class means, n_cases, digests
    table: Any  # pandas DataFrame, one row per (case, label)
    outputs: dict[str, str]


def evaluate_cases(
    model_dir: Path,
    raw_ws: Workspace,
    records: list[CaseRecord],
    settings: EvaluateParams,
    report_dir: Path,
    pred_dir: Path,
) -> EvaluationReport:
    """Predict and score ``records`` (cases of ``raw_ws``'s data/raw) with the model in ``model_dir``."""
    from lesionflow.io.volumes import Volume, read_volume, write_nifti
    from lesionflow.seg.evaluation import EvaluationSettings, evaluate_case
    from lesionflow.seg.metrics import case_means, metrics_table, summarize
    from lesionflow.seg.model_files import load_segmenter
    from lesionflow.seg.plots import CaseTile, case_montage_png, metrics_boxplot_png, pick_slice

    labelled = [r for r in records if r.has_label]
    if not labelled:
        raise SourceError(
            f"no labelled cases to evaluate among {len(records)} in {raw_ws.raw}; "
            "give the test split labels (MSD labelsTs) or set ingest.test_fraction"
        )
    device = resolve_device(settings.device)
    network, config = load_segmenter(model_dir, device)
    knobs = EvaluationSettings(
        settings.sw_overlap, settings.sw_batch_size, settings.nsd_tolerance_mm, settings.hd_percentile
    )
    rows: list[Any] = []
    tiles_src: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for rec in rich_progress(labelled, "evaluate", len(labelled)):
        folder = raw_ws.raw_cases / rec.case_id
        image = read_volume(folder / "image.nii.gz", rec.case_id)
        truth = read_volume(folder / "label.nii.gz", rec.case_id)
        result = evaluate_case(network, config, rec.case_id, image.array, image.affine, truth.array, knobs, device)
        write_nifti(Volume(result.prediction, image.affine), pred_dir / f"{rec.case_id}.nii.gz")
        rows.extend((rec.case_id, m) for m in result.metrics)
        first = image.array if image.array.ndim == 3 else image.array[..., 0]
        tiles_src[rec.case_id] = (first, np.asarray(truth.array), result.prediction)
    table = metrics_table(rows)
    summary: dict[str, Any] = dict(summarize(table))
    summary.update(
        {
            "test_split_digest": split_digest(labelled),
            "model_sha256": sha256_file(model_dir / "model.safetensors"),
            "cases": sorted(r.case_id for r in labelled),
        }
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(report_dir / "cases.csv", index=False, float_format="%.6f", lineterminator="\n")
    metrics_boxplot_png(table, report_dir / "boxplot.png")
    ranked = case_means(table).sort_values(["dice", "case_id"], ascending=[False, True])["case_id"].tolist()
    n = settings.montage_cases
    picked = list(dict.fromkeys(ranked[:n] + ranked[::-1][:n]))  # best first, then worst; no repeats
    tiles = []
    for case_id in picked:
        shown, truth_arr, pred_arr = tiles_src[case_id]
        z = pick_slice(truth_arr, pred_arr)
        rank = "best" if ranked.index(case_id) < min(n, max(1, len(ranked) // 2)) else "worst"
        dice = float(case_means(table).set_index("case_id").loc[case_id, "dice"])
        title = f"{case_id} ({rank}, Dice {dice:.3f})"
        tiles.append(CaseTile(title, shown[:, :, z], truth_arr[:, :, z], pred_arr[:, :, z]))
    case_montage_png(tiles, report_dir / "montage.png")
    outputs = {
        "cases": str(report_dir / "cases.csv"),
        "boxplot": str(report_dir / "boxplot.png"),
        "montage": str(report_dir / "montage.png"),
        "predictions": str(pred_dir),
    }
    return EvaluationReport(summary, table, outputs)


def run(ws: Workspace, params: Params) -> StageResult:
    model = segmenter_dir(ws)
    if not (model / "model.safetensors").exists():
        raise SourceError("models/segmenter has no trained model; run `lesionflow stage train` first")
    test = set(splits(ws, params).test)
    if not test:
        raise SourceError(
            "the test split is empty; ingest a source with a test split (MSD imagesTs/labelsTs) "
            "or set ingest.test_fraction > 0"
        )
    records = [r for r in read_manifest(ws.raw_manifest) if r.case_id in test]
    report = evaluate_cases(model, ws, records, params.evaluate, ws.stage_report_dir(STAGE), predictions_dir(ws))
    write_json(metrics_path(ws), report.summary)
    rel = {k: str(Path(v).relative_to(ws.root)) for k, v in report.outputs.items()}
    outputs = {"metrics": "reports/metrics.json", **rel}
    shown = {k: v for k, v in report.summary.items() if k != "cases"}
    return StageResult(STAGE, True, shown, outputs)
