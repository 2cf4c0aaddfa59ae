"""Evaluate a trained segmenter on one raw case: preprocess with the model's plan, predict, map back, score.

One code path for the workspace's own test split and for any dataset ingested later: the raw image is
preprocessed with the *model's* target spacing and normalization (from its config.json, never the new
dataset's plan), the sliding-window prediction is mapped back onto the raw grid (undo resample, crop and
RAS reorientation), and metrics are computed there, in the raw voxel spacing (mm). The label never
influences preprocessing (crop or normalization mask): inference sees what a deployed model would see.

Reports: ``cases.csv`` has one row per (case, label) with the voxel metrics of :mod:`lesionflow.seg.metrics`
followed by the lesion-detection counts of :mod:`lesionflow.seg.detection` (``lesions, detected,
false_positives, lesions_<bin>, detected_<bin>``, per (case, label); a case's counts are the sums over its rows);
``lesions.csv`` has one row per truth lesion (size in voxels, mm³ and equivalent diameter in mm, its size bin,
detected or not). The summary adds pooled sensitivity overall and per size bin and false positives per case.
Metrics undefined by the empty-mask convention of :mod:`lesionflow.seg.metrics` are empty cells in cases.csv
(its ``outcome`` column says why) and null in the summary; the montage ranks only cases with a lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lesionflow.catalog.artifacts import RAW, RAW_CASES, raw_case_file
from lesionflow.devices import resolve_device
from lesionflow.errors import SourceError
from lesionflow.hashing import sha256_file, sha256_json
from lesionflow.manifest import CaseRecord
from lesionflow.params import EvaluateParams
from lesionflow.preprocess.geometry import spacing_of
from lesionflow.preprocess.ops import preprocess_arrays
from lesionflow.progress import rich_progress
from lesionflow.seg.detection import (
    ClassDetection,
    case_detection,
    detection_table,
    lesions_table,
    size_bin_names,
    summarize_detection,
)
from lesionflow.seg.inference import predict_case
from lesionflow.seg.metrics import ClassMetrics, case_metrics, metrics_table
from lesionflow.seg.model_files import SegmenterConfig
from lesionflow.workspace import Workspace


@dataclass(frozen=True)
class EvaluationSettings:
    overlap: float
    sw_batch_size: int
    nsd_tolerance_mm: float
    hd_percentile: float
    amp_dtype: torch.dtype | None = None
    lesion_size_bins_mm: tuple[float, ...] = (6.0, 10.0)  # diameter edges, mm (EvaluateParams)


@dataclass(frozen=True)
class CaseEvaluation:
    case_id: str
    prediction: np.ndarray  # (i, j, k) uint8 label values on the raw grid (geometry = the raw affine)
    metrics: list[ClassMetrics]  # empty when the case has no ground truth
    detection: list[ClassDetection] = field(default_factory=list)  # same classes; empty without ground truth


def evaluate_case(
    network: torch.nn.Module,
    config: SegmenterConfig,
    case_id: str,
    image: np.ndarray,
    affine: np.ndarray,
    truth: np.ndarray | None,
    settings: EvaluationSettings,
    device: torch.device,
) -> CaseEvaluation:
    """``image`` raw ``(i, j, k[, c])`` with ``affine`` voxel -> RAS+ mm; ``truth`` ``(i, j, k)`` or None."""
    channels = 1 if image.ndim == 3 else image.shape[3]
    if channels != config.network.in_channels:
        raise ValueError(
            f"case {case_id!r} has {channels} channel(s) but the model expects {config.network.in_channels} "
            f"({', '.join(config.modalities)}); evaluate it with a model trained on the same channels"
        )
    processed, _, record = preprocess_arrays(image, None, affine, config.target_spacing, config.normalization)
    prediction = predict_case(
        network,
        processed,
        config.network.patch_size,
        config.label_values,
        record,
        overlap=settings.overlap,
        sw_batch_size=settings.sw_batch_size,
        device=device,
        amp_dtype=settings.amp_dtype,
    )
    assert prediction.raw is not None
    metrics: list[ClassMetrics] = []
    detection: list[ClassDetection] = []
    if truth is not None:
        names = {int(k): v for k, v in config.label_names.items()}
        spacing = spacing_of(affine)
        metrics = case_metrics(
            prediction.raw,
            np.asarray(truth),
            spacing,
            config.label_values,
            names,
            nsd_tolerance_mm=settings.nsd_tolerance_mm,
            hd_percentile=settings.hd_percentile,
        )
        detection = case_detection(
            prediction.raw, np.asarray(truth), spacing, config.label_values, names, settings.lesion_size_bins_mm
        )
    return CaseEvaluation(case_id, prediction.raw, metrics, detection)


def report_tables(
    results: Sequence[CaseEvaluation], edges_mm: Sequence[float]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float | int | None]]:
    """(cases table, lesions table, detection summary) of evaluated cases that had ground truth.

    The cases table is :func:`lesionflow.seg.metrics.metrics_table` (its columns and values unchanged) with the
    :func:`lesionflow.seg.detection.detection_columns` appended, one row per (case, label) in input order; the
    summary is :func:`lesionflow.seg.detection.summarize_detection` over ``len(results)`` cases."""
    bins = size_bin_names(edges_mm)
    metrics = metrics_table([(r.case_id, r.metrics) for r in results])
    pairs = [(r.case_id, d) for r in results for d in r.detection]
    detection = detection_table(pairs, bins)
    table = metrics.merge(detection, on=["case_id", "label"], how="left", validate="one_to_one", sort=False)
    # metrics may be NaN by convention (lesionflow.seg.metrics); a detection count never is
    if len(table) != len(metrics) or len(detection) != len(metrics) or table[detection.columns].isna().any().any():
        raise ValueError("metrics and detection rows differ: expected one detection row per (case, label) metric")
    summary = summarize_detection(detection, bins, len(results))
    return table, lesions_table(pairs), summary


def write_cases_csv(table: pd.DataFrame, path: Path) -> Path:
    """Write a :func:`report_tables` cases table as ``cases.csv`` (6 decimals, undefined metrics as empty cells)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.6f", lineterminator="\n")
    return path


@dataclass(frozen=True)
class MontagePick:
    case_id: str
    rank: str  # "best" or "worst"
    dice: float  # the case's mean Dice over its defined classes


def montage_picks(table: pd.DataFrame, n: int) -> list[MontagePick]:
    """The montage's cases: up to ``n`` best, then up to ``n`` worst (worst first), no case twice, chosen only
    among cases whose reference holds a lesion (a truth voxel of some class). Cases without a lesion show a false
    positive or nothing: they are counted in the summary (``n_false_positive_cases``), not ranked beside the
    segmentations. Rank by the case's mean Dice over its defined classes (descending, ties by case id)."""
    from lesionflow.seg.metrics import case_means

    with_lesion = table.groupby("case_id")["truth_voxels"].sum() > 0
    lesion_cases = set(with_lesion[with_lesion].index)
    if not lesion_cases:
        return []
    means = case_means(table[table["case_id"].isin(lesion_cases)])  # every such case has a defined Dice
    ranked = means["case_id"].tolist()
    dice = dict(zip(means["case_id"], means["dice"], strict=True))
    n_best = min(n, max(1, len(ranked) // 2))  # at least one worst case whenever there are two cases
    picked = list(dict.fromkeys(ranked[:n] + ranked[::-1][:n]))  # best first, then worst; no repeats
    return [MontagePick(c, "best" if ranked.index(c) < n_best else "worst", float(dice[c])) for c in picked]


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
    """Predict every case of ``records`` (cases of ``raw_ws``'s data/raw) with the model in ``model_dir`` and
    score the labelled ones. Unlabelled cases (an MSD imagesTs/ without labels) get their prediction in
    ``pred_dir`` and are listed in the summary's ``unlabelled_cases``; at least one case must be labelled."""
    from lesionflow.io.volumes import Volume, read_volume, write_nifti
    from lesionflow.seg.metrics import summarize
    from lesionflow.seg.model_files import load_segmenter
    from lesionflow.seg.plots import CaseTile, case_montage_png, metrics_boxplot_png, pick_slice

    labelled = [r for r in records if r.has_label]
    if not labelled:
        raise SourceError(
            f"no labelled cases to evaluate among {len(records)} in {RAW.at(raw_ws)}; "
            "give the test split labels (MSD labelsTs), or hold labelled training cases out as the test split at "
            "ingest (ingest.test_holdout_fraction > 0 when the test cases have no labels, else ingest.test_fraction)"
        )
    unlabelled = [r for r in records if not r.has_label]
    device = resolve_device(settings.device)
    network, config = load_segmenter(model_dir, device)
    knobs = EvaluationSettings(
        settings.sw_overlap,
        settings.sw_batch_size,
        settings.nsd_tolerance_mm,
        settings.hd_percentile,
        lesion_size_bins_mm=tuple(settings.lesion_size_bins_mm),
    )
    results: list[CaseEvaluation] = []
    tiles_src: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for rec in rich_progress(labelled + unlabelled, "evaluate", len(records)):
        folder = RAW_CASES.at(raw_ws) / rec.case_id
        image = read_volume(raw_case_file(folder, "image"), rec.case_id)
        truth = read_volume(raw_case_file(folder, "label"), rec.case_id) if rec.has_label else None
        truth_array = None if truth is None else np.asarray(truth.array)
        result = evaluate_case(network, config, rec.case_id, image.array, image.affine, truth_array, knobs, device)
        write_nifti(Volume(result.prediction, image.affine), pred_dir / f"{rec.case_id}.nii.gz")
        if truth_array is None:
            continue  # predicted only: nothing to score
        results.append(result)  # its prediction is the array the montage keeps anyway
        first = image.array if image.array.ndim == 3 else image.array[..., 0]
        tiles_src[rec.case_id] = (first, truth_array, result.prediction)
    table, lesions, detection = report_tables(results, knobs.lesion_size_bins_mm)
    summary: dict[str, Any] = dict(summarize(table))
    summary.update(detection)
    summary.update(
        {
            "test_split_digest": split_digest(labelled),
            "model_sha256": sha256_file(model_dir / "model.safetensors"),
            "cases": sorted(r.case_id for r in labelled),
            "unlabelled_cases": sorted(r.case_id for r in unlabelled),  # predicted, not scored
        }
    )
    write_cases_csv(table, report_dir / "cases.csv")
    lesions.to_csv(report_dir / "lesions.csv", index=False, float_format="%.6f", lineterminator="\n")
    metrics_boxplot_png(table, report_dir / "boxplot.png")
    tiles = []
    for pick in montage_picks(table, settings.montage_cases):
        shown, truth_arr, pred_arr = tiles_src[pick.case_id]
        z = pick_slice(truth_arr, pred_arr)
        title = f"{pick.case_id} ({pick.rank}, Dice {pick.dice:.3f})"
        tiles.append(CaseTile(title, shown[:, :, z], truth_arr[:, :, z], pred_arr[:, :, z]))
    case_montage_png(tiles, report_dir / "montage.png")
    outputs = {
        "cases": str(report_dir / "cases.csv"),
        "lesions": str(report_dir / "lesions.csv"),
        "boxplot": str(report_dir / "boxplot.png"),
        "montage": str(report_dir / "montage.png"),
        "predictions": str(pred_dir),
    }
    return EvaluationReport(summary, table, outputs)
