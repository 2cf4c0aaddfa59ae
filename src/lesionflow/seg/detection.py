"""Lesion-level detection per class on one grid: which truth lesions a prediction finds, and what it invents.

Arrays are label maps ``(x, y, z)`` of integer label values on one grid with voxel ``spacing`` (mm per axis, same
order), the raw grid in evaluation. For every non-zero label value the class is the binary mask ``array == value``
(the same classes as :mod:`lesionflow.seg.metrics`).

Contract:

* A lesion is a connected component of a class mask, 26-connectivity (voxels touching by a face, an edge or a
  corner belong together; ``scipy.ndimage.label`` with a 3x3x3 structure). Truth and prediction are split alike.
* Size: ``volume_mm3 = voxels * prod(spacing)``; ``diameter_mm`` is the diameter of the sphere of that volume,
  ``(6 V / pi) ** (1/3)``: readable like a nodule diameter and independent of the voxel shape.
* Size bins by diameter from ascending edges ``e_1 < ... < e_n`` (mm): ``d < e_1``, ``e_i <= d < e_i+1``,
  ``d >= e_n``; named ``lt<e_1>mm``, ``<e_i>to<e_i+1>mm``, ``ge<e_n>mm`` (edges written with up to two decimals,
  ``.`` as ``p``: 7.5 -> ``7p5``), so names are safe as CSV columns and JSON keys.
* Detection rule: a truth lesion is detected when at least one voxel of a predicted component of the same class
  lies in it (any overlap, as the BraTS 2023 lesion-wise metrics and LIDC-style hit criteria count a hit). One
  predicted component that touches several truth lesions detects each of them.
* False positive: a predicted component of the class that overlaps no truth lesion of the class. With the
  detection rule above every predicted component is either a hit or a false positive, never both or neither.
* Lesion index: the component number ``scipy.ndimage.label`` gives (1-based, in the order of each component's
  first voxel in C order), stable for a given truth mask.

Counts are per (case, class); a case's totals are sums over its classes. Sensitivity = detected / lesions,
undefined (None) when there are no truth lesions, never NaN (the summary is written as JSON).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd
from scipy import ndimage

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: face, edge and corner neighbours
LESION_COLUMNS = (
    "case_id",
    "label",
    "name",
    "lesion",
    "voxels",
    "volume_mm3",
    "diameter_mm",
    "size_bin",
    "detected",
)
_LESION_DTYPES = {
    "case_id": "object",
    "label": "int64",
    "name": "object",
    "lesion": "int64",
    "voxels": "int64",
    "volume_mm3": "float64",
    "diameter_mm": "float64",
    "size_bin": "object",
    "detected": "bool",
}


def _edge_text(edge: float) -> str:
    return f"{edge:.2f}".rstrip("0").rstrip(".").replace(".", "p")


def size_bin_names(edges_mm: Sequence[float]) -> tuple[str, ...]:
    """Names of the ``len(edges_mm) + 1`` diameter bins (module docstring), smallest first.

    Raises a one-line ValueError unless the edges are finite, > 0 and strictly increasing at 0.01 mm resolution.
    """
    edges = [float(e) for e in edges_mm]
    if not edges:
        raise ValueError("lesion size bins: no edges given; expected ascending diameters in mm such as [6, 10]")
    if not all(math.isfinite(e) and e > 0 for e in edges):
        raise ValueError(f"lesion size bins {edges}: expected finite diameters > 0 mm")
    text = [_edge_text(e) for e in edges]
    if any(round(b, 2) <= round(a, 2) for a, b in pairwise(edges)):
        raise ValueError(f"lesion size bins {edges}: expected strictly increasing diameters (0.01 mm resolution)")
    middle = [f"{a}to{b}mm" for a, b in pairwise(text)]
    return (f"lt{text[0]}mm", *middle, f"ge{text[-1]}mm")


def equivalent_diameter_mm(voxels: int, spacing: Sequence[float]) -> float:
    """Diameter in mm of the sphere whose volume equals ``voxels`` voxels of size ``spacing`` (mm)."""
    volume = float(voxels) * float(np.prod([float(s) for s in spacing]))
    return float((6.0 * volume / math.pi) ** (1.0 / 3.0))


def size_bin_index(diameter_mm: float, edges_mm: Sequence[float]) -> int:
    """0-based bin of ``diameter_mm``: the number of edges ``<= diameter_mm`` (lower edges are inclusive)."""
    return int(np.searchsorted(np.asarray(edges_mm, dtype=np.float64), diameter_mm, side="right"))


@dataclass(frozen=True)
class Lesion:
    """One truth lesion (connected component) of one class; sizes in voxels, mm³ and mm."""

    label: int
    name: str
    lesion: int  # 1-based component index (module docstring)
    voxels: int
    volume_mm3: float
    diameter_mm: float
    size_bin: str
    detected: bool


@dataclass(frozen=True)
class ClassDetection:
    """Lesion-level detection of one class in one case: counts per size bin (``bins`` order) and false positives."""

    label: int
    name: str
    bins: tuple[str, ...]
    n_lesions: tuple[int, ...]  # truth lesions per size bin
    n_detected: tuple[int, ...]  # of those, detected (any overlap), per size bin
    n_false_positives: int  # predicted components overlapping no truth lesion of the class
    lesions: tuple[Lesion, ...]  # every truth lesion, by component index

    @property
    def total_lesions(self) -> int:
        return sum(self.n_lesions)

    @property
    def total_detected(self) -> int:
        return sum(self.n_detected)


def _check(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float, float]:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}: expected the same grid")
    if pred.ndim != 3:
        raise ValueError(f"label maps of shape {pred.shape}: expected (x, y, z)")
    s = [float(v) for v in spacing]
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing {tuple(spacing)}: expected three positive finite mm values")
    return s[0], s[1], s[2]


def class_detection(
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    spacing: Sequence[float],
    edges_mm: Sequence[float],
    *,
    label: int = 1,
    name: str = "label_1",
) -> ClassDetection:
    """Detection of the truth lesions of one binary ``truth_mask`` by the binary ``pred_mask`` (module contract)."""
    sp = _check(pred_mask, truth_mask, spacing)
    bins = size_bin_names(edges_mm)
    truth_cc, n_truth = ndimage.label(np.asarray(truth_mask, dtype=bool), structure=STRUCTURE_26)
    pred_cc, n_pred = ndimage.label(np.asarray(pred_mask, dtype=bool), structure=STRUCTURE_26)
    both = (truth_cc > 0) & (pred_cc > 0)
    hit_truth = np.zeros(n_truth + 1, dtype=bool)
    hit_truth[np.unique(truth_cc[both])] = True
    hit_pred = np.zeros(n_pred + 1, dtype=bool)
    hit_pred[np.unique(pred_cc[both])] = True
    voxels = np.bincount(truth_cc.ravel(), minlength=n_truth + 1)
    voxel_mm3 = sp[0] * sp[1] * sp[2]

    n_lesions = [0] * len(bins)
    n_detected = [0] * len(bins)
    lesions = []
    for index in range(1, n_truth + 1):
        diameter = equivalent_diameter_mm(int(voxels[index]), sp)
        b = size_bin_index(diameter, edges_mm)
        detected = bool(hit_truth[index])
        n_lesions[b] += 1
        n_detected[b] += int(detected)
        lesions.append(
            Lesion(label, name, index, int(voxels[index]), int(voxels[index]) * voxel_mm3, diameter, bins[b], detected)
        )
    false_positives = int(n_pred - hit_pred[1:].sum())
    return ClassDetection(label, name, bins, tuple(n_lesions), tuple(n_detected), false_positives, tuple(lesions))


def case_detection(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    label_values: Sequence[int],
    label_names: Mapping[int, str],
    edges_mm: Sequence[float],
) -> list[ClassDetection]:
    """:func:`class_detection` for every non-zero value of ``label_values``, in that order, on label maps.

    Names as in :func:`lesionflow.seg.metrics.case_metrics` (missing values are named ``label_<value>``)."""
    _check(pred, truth, spacing)
    out = []
    for value in (int(v) for v in label_values):
        if value == 0:
            continue
        name = str(label_names.get(value, f"label_{value}"))
        out.append(class_detection(pred == value, truth == value, spacing, edges_mm, label=value, name=name))
    return out


def detection_columns(bins: Sequence[str]) -> list[str]:
    """Columns the per (case, label) table gains: ``lesions, detected, false_positives``, then
    ``lesions_<bin>, detected_<bin>`` per bin, smallest bin first."""
    per_bin = [f"{kind}_{b}" for b in bins for kind in ("lesions", "detected")]
    return ["lesions", "detected", "false_positives", *per_bin]


def detection_table(rows: Iterable[tuple[str, ClassDetection]], bins: Sequence[str]) -> pd.DataFrame:
    """One row per (case_id, label): ``case_id, label`` then :func:`detection_columns` (all int64)."""
    columns = ["case_id", "label", *detection_columns(bins)]
    records = []
    for case_id, d in rows:
        if tuple(d.bins) != tuple(bins):
            raise ValueError(f"case {case_id!r}: size bins {d.bins} differ from the table's {tuple(bins)}")
        per_bin = {}
        for b, n, k in zip(d.bins, d.n_lesions, d.n_detected, strict=True):
            per_bin[f"lesions_{b}"] = n
            per_bin[f"detected_{b}"] = k
        records.append(
            {
                "case_id": str(case_id),
                "label": d.label,
                "lesions": d.total_lesions,
                "detected": d.total_detected,
                "false_positives": d.n_false_positives,
                **per_bin,
            }
        )
    table = pd.DataFrame.from_records(records, columns=columns)
    return table.astype({"case_id": "object", **{c: "int64" for c in columns[1:]}})


def lesions_table(rows: Iterable[tuple[str, ClassDetection]]) -> pd.DataFrame:
    """One row per truth lesion: columns :data:`LESION_COLUMNS` (sizes in voxels, mm³, mm; ``detected`` bool)."""
    records = [
        {"case_id": str(case_id), **{f: getattr(lesion, f) for f in LESION_COLUMNS[1:]}}
        for case_id, d in rows
        for lesion in d.lesions
    ]
    return pd.DataFrame.from_records(records, columns=list(LESION_COLUMNS)).astype(_LESION_DTYPES)


def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den else None


def summarize_detection(table: pd.DataFrame, bins: Sequence[str], n_cases: int) -> dict[str, float | int | None]:
    """Flat summary of a :func:`detection_table` pooled over cases and classes:

    ``n_lesions`` and ``sensitivity`` (detected / lesions; None without lesions), per bin ``n_lesions_<bin>`` and
    ``sensitivity_<bin>``, ``false_positives`` (total) and ``fp_per_case`` (total / ``n_cases``)."""
    if n_cases < 1:
        raise ValueError(f"n_cases {n_cases}: expected at least one evaluated case")
    lesions, detected = int(table["lesions"].sum()), int(table["detected"].sum())
    out: dict[str, float | int | None] = {"n_lesions": lesions, "sensitivity": _ratio(detected, lesions)}
    for b in bins:
        n, k = int(table[f"lesions_{b}"].sum()), int(table[f"detected_{b}"].sum())
        out[f"n_lesions_{b}"] = n
        out[f"sensitivity_{b}"] = _ratio(k, n)
    false_positives = int(table["false_positives"].sum())
    out["false_positives"] = false_positives
    out["fp_per_case"] = false_positives / n_cases
    return out
