"""Per-class segmentation metrics in physical units (MONAI implementations) and their tables.

Arrays are label maps ``(x, y, z)`` of integer label values on one grid with voxel ``spacing`` (mm per
axis, same order). For every non-zero label value the class is the binary mask ``array == value``:

* ``dice`` in [0, 1]: :func:`lesionflow.seg.dice.dice`, the one Dice (validation uses it too).
* ``hd95_mm`` in mm, >= 0: symmetric percentile Hausdorff distance between the mask surfaces
  (``compute_hausdorff_distance(percentile=hd_percentile, spacing=spacing)``; surfaces are the voxels
  removed by one binary erosion, distances are Euclidean between voxel centres).
* ``nsd`` in [0, 1]: normalized surface dice at ``nsd_tolerance_mm`` (``compute_surface_dice``): the
  fraction of both surfaces lying within the tolerance of the other surface.

Empty-mask conventions (metrics are never NaN or infinite; the Dice rule is defined in :mod:`lesionflow.seg.dice`):

* truth and prediction both empty: dice 1, nsd 1, hd 0 (nothing to find, nothing found);
* exactly one empty: dice 0, nsd 0, hd = the diagonal of the volume in mm,
  ``sqrt(sum((n_i * spacing_i)^2))`` over the three axes: no two points of the grid are farther apart,
  so a missed or hallucinated class scores the worst finite distance the grid allows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from lesionflow.seg.dice import dice

COLUMNS = ("case_id", "label", "name", "dice", "hd95_mm", "nsd", "truth_voxels", "pred_voxels")
METRICS = ("dice", "hd95_mm", "nsd")
_DTYPES = {
    "case_id": "object",
    "label": "int64",
    "name": "object",
    "dice": "float64",
    "hd95_mm": "float64",
    "nsd": "float64",
    "truth_voxels": "int64",
    "pred_voxels": "int64",
}


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one label value in one case (units and ranges in the module docstring)."""

    label: int
    name: str
    dice: float
    hd95_mm: float
    nsd: float
    truth_voxels: int
    pred_voxels: int


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    s = [float(v) for v in spacing]
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing {tuple(spacing)}: expected three positive finite mm values")
    return s[0], s[1], s[2]


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a ``shape`` grid with ``spacing``: the empty-mask Hausdorff value."""
    return float(math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, float, float],
    label_values: Sequence[int],
    label_names: Mapping[int, str],
    *,
    nsd_tolerance_mm: float = 1.0,
    hd_percentile: float = 95.0,
) -> list[ClassMetrics]:
    """Dice, percentile Hausdorff (mm) and NSD for every non-zero value of ``label_values``, in that order.

    ``pred`` and ``truth`` are ``(x, y, z)`` label maps on the same grid, ``spacing`` its voxel size in mm.
    ``label_names`` gives each value's name (missing values are named ``label_<value>``). Empty masks follow
    the module docstring's conventions. Shape mismatches and invalid parameters raise a one-line ValueError.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}: expected the same grid")
    if pred.ndim != 3:
        raise ValueError(f"label maps of shape {pred.shape}: expected (x, y, z)")
    sp = _check_spacing(spacing)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm {nsd_tolerance_mm}: expected a finite value >= 0")
    if not 0 < hd_percentile <= 100:
        raise ValueError(f"hd_percentile {hd_percentile}: expected a value in (0, 100]")

    values = [int(v) for v in label_values if int(v) != 0]
    pred_masks = [pred == v for v in values]
    truth_masks = [truth == v for v in values]
    n_pred = [int(m.sum()) for m in pred_masks]
    n_truth = [int(m.sum()) for m in truth_masks]
    both = [i for i in range(len(values)) if n_pred[i] and n_truth[i]]

    scores: dict[int, tuple[float, float]] = {}
    if both:
        y_pred = torch.from_numpy(np.stack([pred_masks[i] for i in both])[None].astype(np.float32))
        y = torch.from_numpy(np.stack([truth_masks[i] for i in both])[None].astype(np.float32))
        with warnings.catch_warnings():  # MONAI 1.6 passes its own deprecated argument internally
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=hd_percentile, spacing=sp)
            nsd = compute_surface_dice(
                y_pred, y, [float(nsd_tolerance_mm)] * len(both), include_background=True, spacing=sp
            )
        for j, i in enumerate(both):
            scores[i] = (float(hd[0, j]), float(nsd[0, j]))

    worst = volume_diagonal_mm(pred.shape, sp)
    out = []
    for i, value in enumerate(values):
        d = dice(pred_masks[i], truth_masks[i])
        if i in scores:
            h, n = scores[i]
        elif n_pred[i] == 0 and n_truth[i] == 0:
            h, n = 0.0, 1.0
        else:
            h, n = worst, 0.0
        name = str(label_names.get(value, f"label_{value}"))
        out.append(ClassMetrics(value, name, d, h, n, truth_voxels=n_truth[i], pred_voxels=n_pred[i]))
    return out


def metrics_table(
    rows: Mapping[str, Sequence[ClassMetrics]]
    | Iterable[tuple[str, ClassMetrics]]
    | Iterable[tuple[str, Sequence[ClassMetrics]]],
) -> pd.DataFrame:
    """One row per (case_id, label): columns ``case_id, label, name, dice, hd95_mm, nsd, truth_voxels,
    pred_voxels`` (labels int64, voxel counts int64, metrics float64; units as in the module docstring).

    ``rows`` is a mapping ``case_id -> case_metrics(...)`` or an iterable of ``(case_id, ClassMetrics)`` /
    ``(case_id, [ClassMetrics, ...])`` pairs; the input order is kept. No rows -> an empty table."""
    pairs = rows.items() if isinstance(rows, Mapping) else rows
    records = []
    for case_id, item in pairs:
        for m in [item] if isinstance(item, ClassMetrics) else item:
            records.append({"case_id": str(case_id), **asdict(m)})
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return table.astype(_DTYPES)


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}: expected {list(COLUMNS)}")
    if table.empty:
        raise ValueError("metrics table is empty (0 rows): expected at least one (case, label) row")


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Flat summary for experiment tracking: ``mean_dice``, ``mean_hd95_mm``, ``mean_nsd`` over all rows;
    per class (by name, in label order) ``dice_<name>``, ``hd95_mm_<name>``, ``nsd_<name>`` means over
    cases; and ``n_cases`` (distinct case ids). Units as in the table (hd in mm)."""
    _check_table(table)
    summary = {f"mean_{m}": float(table[m].mean()) for m in METRICS}
    for _, group in table.sort_values("label", kind="stable").groupby("label", sort=True):
        name = str(group["name"].iloc[0])
        for m in METRICS:
            summary[f"{m}_{name}"] = float(group[m].mean())
    summary["n_cases"] = float(table["case_id"].nunique())
    return summary


def case_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per case means over its classes: columns ``case_id, dice, hd95_mm, nsd`` (same names and units as the
    table, each now the case's mean over classes), ranked best first (dice descending, ties by case_id
    ascending), so ``head`` / ``tail`` give the best / worst cases."""
    _check_table(table)
    means = table.groupby("case_id", sort=True)[list(METRICS)].mean().reset_index()
    means = means.sort_values(["dice", "case_id"], ascending=[False, True], kind="stable")
    return means.reset_index(drop=True)
