"""Per-class segmentation metrics in physical units (MONAI implementations) and their tables.

Arrays are label maps ``(x, y, z)`` of integer label values on one grid with voxel ``spacing`` (mm per
axis, same order). For every non-zero label value the class is the binary mask ``array == value``:

* ``dice`` in [0, 1]: :func:`lesionflow.seg.dice.dice`, the one Dice formula (validation uses it too).
* ``hd95_mm`` in mm, >= 0: symmetric percentile Hausdorff distance between the mask surfaces
  (``compute_hausdorff_distance(percentile=hd_percentile, spacing=spacing)``; surfaces are the voxels
  removed by one binary erosion, distances are Euclidean between voxel centres).
* ``nsd`` in [0, 1]: normalized surface dice at ``nsd_tolerance_mm`` (``compute_surface_dice``): the
  fraction of both surfaces lying within the tolerance of the other surface.

Empty masks: one convention, decided per (case, class) by which masks hold voxels (the ``outcome``):

* ``present`` (truth and prediction non-empty): every metric defined.
* ``missed`` (truth non-empty, prediction empty) and ``false_positive`` (truth empty, prediction non-empty):
  dice 0 and nsd 0 (no overlap, no surface within tolerance), both *included* in the means; hd95 undefined (NaN):
  no surface to measure a distance to.
* ``absent`` (both empty, a true negative): every metric undefined (NaN), nothing to score.

This is nnU-Net's Dice (NaN only when ``tp + fp + fn == 0``) and MONAI's surface metrics for those masks
(``compute_surface_dice`` returns the same values; ``compute_hausdorff_distance`` returns no finite distance, NaN
or inf depending on which mask is empty, written here as NaN). It replaces "both empty = 1 / HD95 = the volume
diagonal", which let a case without any lesion average to Dice 0.5 and a 300 mm HD95 dominate the mean.
Means (:func:`summarize`, :func:`case_means`) are over defined values only, and the summary reports beside them
how many values each mean holds and how many (case, class) rows had each outcome. Undefined summary values are
None (JSON null), never NaN.
Training validation keeps :mod:`lesionflow.seg.dice`'s rule (both empty = 1): it needs a score for every case.
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

COLUMNS = ("case_id", "label", "name", "dice", "hd95_mm", "nsd", "truth_voxels", "pred_voxels", "outcome")
METRICS = ("dice", "hd95_mm", "nsd")
OUTCOMES = ("present", "missed", "false_positive", "absent")  # module docstring
NAN = float("nan")
_DTYPES = {
    "case_id": "object",
    "label": "int64",
    "name": "object",
    "dice": "float64",
    "hd95_mm": "float64",
    "nsd": "float64",
    "truth_voxels": "int64",
    "pred_voxels": "int64",
    "outcome": "object",
}


def outcome(truth_voxels: int, pred_voxels: int) -> str:
    """Which of :data:`OUTCOMES` a class with these voxel counts has (module docstring)."""
    if truth_voxels:
        return "present" if pred_voxels else "missed"
    return "false_positive" if pred_voxels else "absent"


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

    @property
    def outcome(self) -> str:
        return outcome(self.truth_voxels, self.pred_voxels)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    s = [float(v) for v in spacing]
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing {tuple(spacing)}: expected three positive finite mm values")
    return s[0], s[1], s[2]


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

    out = []
    for i, value in enumerate(values):
        kind = outcome(n_truth[i], n_pred[i])
        if kind == "present":
            d, (h, n) = dice(pred_masks[i], truth_masks[i]), scores[i]
        elif kind == "absent":
            d, h, n = NAN, NAN, NAN
        else:  # missed or false_positive
            d, h, n = 0.0, NAN, 0.0
        name = str(label_names.get(value, f"label_{value}"))
        out.append(ClassMetrics(value, name, d, h, n, truth_voxels=n_truth[i], pred_voxels=n_pred[i]))
    return out


def metrics_table(
    rows: Mapping[str, Sequence[ClassMetrics]]
    | Iterable[tuple[str, ClassMetrics]]
    | Iterable[tuple[str, Sequence[ClassMetrics]]],
) -> pd.DataFrame:
    """One row per (case_id, label): columns ``case_id, label, name, dice, hd95_mm, nsd, truth_voxels,
    pred_voxels, outcome`` (labels int64, voxel counts int64, metrics float64, NaN where undefined; units and
    outcomes as in the module docstring).

    ``rows`` is a mapping ``case_id -> case_metrics(...)`` or an iterable of ``(case_id, ClassMetrics)`` /
    ``(case_id, [ClassMetrics, ...])`` pairs; the input order is kept. No rows -> an empty table."""
    pairs = rows.items() if isinstance(rows, Mapping) else rows
    records = []
    for case_id, item in pairs:
        for m in [item] if isinstance(item, ClassMetrics) else item:
            records.append({"case_id": str(case_id), **asdict(m), "outcome": m.outcome})
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return table.astype(_DTYPES)


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}: expected {list(COLUMNS)}")
    if table.empty:
        raise ValueError("metrics table is empty (0 rows): expected at least one (case, label) row")


def _mean(values: pd.Series) -> float | None:
    """Mean over the defined values; None when there are none (JSON null, never NaN)."""
    defined = values.dropna()
    return float(defined.mean()) if len(defined) else None


def summarize(table: pd.DataFrame) -> dict[str, float | int | None]:
    """Flat summary for experiment tracking (module docstring's convention):

    * ``mean_dice``, ``mean_hd95_mm``, ``mean_nsd``: means over the defined (case, class) values, and
      ``n_dice``, ``n_hd95_mm``, ``n_nsd``: how many values each mean holds;
    * ``n_present``, ``n_missed``, ``n_false_positive``, ``n_absent``: (case, class) rows per outcome;
    * per class (by name, in label order): ``dice_<name>``, ``hd95_mm_<name>``, ``nsd_<name>`` (means over its
      defined values) and ``n_<outcome>_<name>``;
    * ``n_cases`` (distinct case ids), ``n_cases_without_lesion`` (no truth voxel of any class) and
      ``n_false_positive_cases`` (of those, the ones with a predicted voxel of some class).

    Means are None where no value is defined; units as in the table (hd in mm)."""
    _check_table(table)
    summary: dict[str, float | int | None] = {}
    for m in METRICS:
        summary[f"mean_{m}"] = _mean(table[m])
        summary[f"n_{m}"] = int(table[m].notna().sum())
    for kind in OUTCOMES:
        summary[f"n_{kind}"] = int((table["outcome"] == kind).sum())
    for _, group in table.sort_values("label", kind="stable").groupby("label", sort=True):
        name = str(group["name"].iloc[0])
        for m in METRICS:
            summary[f"{m}_{name}"] = _mean(group[m])
        for kind in OUTCOMES:
            summary[f"n_{kind}_{name}"] = int((group["outcome"] == kind).sum())
    voxels = table.groupby("case_id", sort=True)[["truth_voxels", "pred_voxels"]].sum()
    without = voxels[voxels["truth_voxels"] == 0]
    summary["n_cases"] = len(voxels)
    summary["n_cases_without_lesion"] = len(without)
    summary["n_false_positive_cases"] = int((without["pred_voxels"] > 0).sum())
    return summary


def case_means(table: pd.DataFrame) -> pd.DataFrame:
    """Per case means over its classes' defined values: columns ``case_id, dice, hd95_mm, nsd`` (same names and
    units as the table; NaN where no class of the case defines the metric), ranked best first (dice descending,
    undefined last, ties by case_id ascending), so ``head`` / ``tail`` give the best / worst cases."""
    _check_table(table)
    means = table.groupby("case_id", sort=True)[list(METRICS)].mean().reset_index()  # pandas skips NaN
    means = means.sort_values(["dice", "case_id"], ascending=[False, True], kind="stable", na_position="last")
    return means.reset_index(drop=True)
