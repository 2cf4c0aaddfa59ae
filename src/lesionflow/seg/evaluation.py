"""Evaluate a trained segmenter on one raw case: preprocess with the model's plan, predict, map back, score.

One code path for the workspace's own test split and for any dataset ingested later: the raw image is
preprocessed with the *model's* target spacing and normalization (from its config.json, never the new
dataset's plan), the sliding-window prediction is mapped back onto the raw grid (undo resample, crop and
RAS reorientation), and metrics are computed there, in the raw voxel spacing (mm). The label never
influences preprocessing (crop or normalization mask): inference sees what a deployed model would see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lesionflow.preprocess.geometry import spacing_of
from lesionflow.preprocess.ops import preprocess_arrays
from lesionflow.seg.inference import predict_case
from lesionflow.seg.metrics import ClassMetrics, case_metrics
from lesionflow.seg.model_files import SegmenterConfig


@dataclass(frozen=True)
class EvaluationSettings:
    overlap: float
    sw_batch_size: int
    nsd_tolerance_mm: float
    hd_percentile: float
    amp_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class CaseEvaluation:
    case_id: str
    prediction: np.ndarray  # (i, j, k) uint8 label values on the raw grid (geometry = the raw affine)
    metrics: list[ClassMetrics]  # empty when the case has no ground truth


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
    if truth is not None:
        names = {int(k): v for k, v in config.label_names.items()}
        metrics = case_metrics(
            prediction.raw,
            np.asarray(truth),
            spacing_of(affine),
            config.label_values,
            names,
            nsd_tolerance_mm=settings.nsd_tolerance_mm,
            hd_percentile=settings.hd_percentile,
        )
    return CaseEvaluation(case_id, prediction.raw, metrics)
