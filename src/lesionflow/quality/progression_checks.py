"""Measurements of one PIE trajectory (generative.md §9.7 item 14): pure functions over arrays.

Inputs: ``frames`` (N + 1, c, x, y, z) float in normalised units, frame 0 the start; ``roi_mask`` (x, y, z) bool
(True = the editable region M). Severity along the trajectory is the estimated lesion volume in voxels:
inside M a voxel is lesion when channel 0 lies on the lesion side of the training threshold (``polarity`` +1 =
lesions brighter than their surroundings); outside M the starting label is kept (nothing there may change
beyond the β1 bound). The same estimator is applied to every frame, frame 0 included, so its bias cancels in the
trend.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["ProgressionStats", "frame_lesion_masks", "outside_change", "progression_stats", "spearman_trend"]


def frame_lesion_masks(
    frames: np.ndarray, start_label: np.ndarray, roi_mask: np.ndarray, threshold: float, polarity: float
) -> np.ndarray:
    """(N + 1, x, y, z) uint8 lesion masks: thresholded channel 0 inside M, the start label outside."""
    inside = np.asarray(roi_mask) > 0
    lesion_like = polarity * (np.asarray(frames)[:, 0].astype(np.float64) - threshold) > 0
    outside = (np.asarray(start_label) > 0) & ~inside
    return ((lesion_like & inside) | outside).astype(np.uint8)


def outside_change(
    frames: np.ndarray, roi_mask: np.ndarray, beta_outside: float, clip_range: tuple[float, float]
) -> tuple[float, float]:
    """(max |x_n - x_0| outside M over all frames, largest excess over the bound β1 · max(hi - x_0, x_0 - lo)).

    The excess is <= 0 up to float32 rounding when the loop did what it claims; 0 change is the exact mode."""
    frames = np.asarray(frames, dtype=np.float64)
    outside = ~(np.asarray(roi_mask) > 0)
    if not outside.any() or len(frames) < 2:
        return 0.0, 0.0
    x0 = frames[0][:, outside]
    lo, hi = clip_range
    bound = beta_outside * np.maximum(hi - x0, x0 - lo)
    diffs = np.abs(frames[1:][:, :, outside] - x0[None])
    return float(diffs.max()), float((diffs - bound[None]).max())


def spearman_trend(values: np.ndarray) -> float:
    """Spearman ρ of ``values`` against their index (0 for a constant series: no trend at all)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return 0.0
    rho = float(stats.spearmanr(np.arange(len(values)), values).statistic)
    return 0.0 if math.isnan(rho) else rho


@dataclass(frozen=True)
class ProgressionStats:
    """What the progression gate checks for one trajectory."""

    severity: tuple[int, ...]  # estimated lesion voxels per frame
    trend_rho: float  # Spearman ρ of severity vs frame, signed by the direction asked for (+ = as asked);
    # NaN when the target equals the start severity: no direction, nothing to trend
    step_changes: tuple[float, ...]  # |severity_n - severity_{n-1}| in voxels, n = 1..N
    step_change_ratio: float  # mean step change of the second half / first half (< 1 = converging)
    image_step_changes: tuple[float, ...]  # mean |x_n - x_{n-1}| inside M (texture resampling included)
    outside_max_change: float
    outside_excess: float


def progression_stats(
    frames: np.ndarray,
    lesion_masks: np.ndarray,
    roi_mask: np.ndarray,
    *,
    direction: float,
    beta_outside: float,
    clip_range: tuple[float, float],
) -> ProgressionStats:
    """Severity trend, step-to-step change and outside-ROI change of one trajectory.

    ``direction`` is (target - start severity): growth is expected when positive, shrinking when negative.
    """
    frames = np.asarray(frames, dtype=np.float64)
    inside = np.asarray(roi_mask) > 0
    severity = tuple(int(m.sum()) for m in np.asarray(lesion_masks))
    # Convergence is judged on the severity, not on raw voxels: every iteration re-draws the texture inside M
    # from fresh noise, so the voxel-wise change keeps a floor of about β2 · sqrt(2) · (texture sd) that does not
    # shrink, while the lesion itself converges (measured: docs/benchmarks.md, PIE).
    steps = tuple(float(abs(b - a)) for a, b in itertools.pairwise(severity))
    image_steps = tuple(
        float(np.abs(frames[n][:, inside] - frames[n - 1][:, inside]).mean()) for n in range(1, len(frames))
    )
    half = len(steps) // 2
    if half == 0:
        ratio = 1.0  # one step: no convergence to judge
    else:
        first, last = float(np.mean(steps[:half])), float(np.mean(steps[len(steps) - half :]))
        ratio = last / first if first > 0 else (0.0 if last == 0 else math.inf)
    max_change, excess = outside_change(frames, roi_mask, beta_outside, clip_range)
    return ProgressionStats(
        severity=severity,
        trend_rho=math.copysign(1.0, direction) * spearman_trend(np.asarray(severity)) if direction else math.nan,
        step_changes=steps,
        step_change_ratio=ratio,
        image_step_changes=image_steps,
        outside_max_change=max_change,
        outside_excess=excess,
    )
