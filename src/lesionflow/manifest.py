"""The raw manifest: one row per ingested case, the per-volume metadata table every gate reads.

Written by ingest as ``data/raw/manifest.csv`` (sorted by case id, so the bytes are deterministic) next to
``data/raw/dataset.json`` (dataset-level facts: channel modalities, declared labels, source URI without
credentials). Units: spacing in mm; intensities in the stored units (HU for CT); shapes in voxels along
the (i, j, k) voxel axes of the stored NIfTI.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lesionflow.io.volumes import Volume


@dataclass(frozen=True)
class CaseRecord:
    """Per-volume metadata; one CSV row. ``label_*`` fields are 0/"" when the case has no label."""

    case_id: str
    split: str  # "train" | "test"
    modality: str  # as declared by the source for channel 0 (CT, MRI, T1, FLAIR...)
    modality_kind: str  # "CT" | "MR" | "OTHER": decides which intensity expectations apply
    source_format: str  # nifti | nrrd | mha | dicom
    n_channels: int
    shape_x: int
    shape_y: int
    shape_z: int
    spacing_x: float
    spacing_y: float
    spacing_z: float
    orientation: str  # e.g. RAS, LPS
    image_dtype: str
    has_label: bool
    label_shape_x: int
    label_shape_y: int
    label_shape_z: int
    label_dtype: str
    shape_match: bool  # label spatial shape == image spatial shape (True without a label)
    affine_max_diff_mm: float  # max |A_image - A_label| over the 3x4 part (0 without a label)
    n_nonfinite: int  # NaN or Inf voxels in the image
    intensity_min: float
    intensity_max: float
    intensity_mean: float
    intensity_std: float
    intensity_p00_5: float
    intensity_p99_5: float
    label_values: str  # JSON list of the distinct label values present
    label_integral: bool  # every label value is a whole number
    n_undeclared_labels: int  # distinct label values not in the dataset's declared label set
    foreground_fraction: float  # share of voxels with label > 0
    has_organ: bool
    image_sha256: str
    label_sha256: str
    organ_sha256: str
    source_sha256: str  # digest of the source bytes: re-ingesting the same bytes is a no-op
    source_uri: str  # where it came from, never with credentials; DICOM: root + pseudonymous series id


COLUMNS = tuple(f.name for f in fields(CaseRecord))
_BOOL = {f.name for f in fields(CaseRecord) if f.type == "bool"}
_INT = {f.name for f in fields(CaseRecord) if f.type == "int"}
_FLOAT = {f.name for f in fields(CaseRecord) if f.type == "float"}


def modality_kind(modality: str) -> str:
    m = modality.strip().upper()
    if m in {"CT", "CTA", "PET/CT"} or m.startswith("CT"):
        return "CT"
    if m in {"MR", "MRI", "T1", "T1W", "T1GD", "T1CE", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD", "T1N", "T1C", "T2F"}:
        return "MR"
    if m.startswith(("MR", "T1", "T2")):
        return "MR"
    return "OTHER"


def intensity_stats(image: np.ndarray) -> dict[str, Any]:
    """Finite-voxel statistics of an image (all channels pooled); NaN/Inf are counted, not used."""
    finite = np.isfinite(image) if np.issubdtype(image.dtype, np.floating) else np.ones(image.shape, dtype=bool)
    n_nonfinite = int(finite.size - int(finite.sum()))
    values = image[finite].astype(np.float64) if n_nonfinite else image.reshape(-1).astype(np.float64)
    if values.size == 0:
        return {
            "n_nonfinite": n_nonfinite,
            **dict.fromkeys(
                (
                    "intensity_min",
                    "intensity_max",
                    "intensity_mean",
                    "intensity_std",
                    "intensity_p00_5",
                    "intensity_p99_5",
                ),
                float("nan"),
            ),
        }
    p_lo, p_hi = np.percentile(values, [0.5, 99.5])
    return {
        "n_nonfinite": n_nonfinite,
        "intensity_min": float(values.min()),
        "intensity_max": float(values.max()),
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_p00_5": float(p_lo),
        "intensity_p99_5": float(p_hi),
    }


def label_stats(label: np.ndarray, declared: set[int]) -> dict[str, Any]:
    values = np.unique(label)
    finite_values = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    integral = bool(np.all(np.isfinite(values)) and np.all(np.mod(finite_values, 1) == 0))
    as_numbers = [int(v) if float(v).is_integer() else float(v) for v in finite_values.tolist()]
    undeclared = [v for v in as_numbers if not (isinstance(v, int) and v in declared)] if declared else []
    return {
        "label_values": json.dumps(as_numbers),
        "label_integral": integral,
        "n_undeclared_labels": len(undeclared) + int(values.size - finite_values.size),
        "foreground_fraction": float(np.count_nonzero(label) / label.size) if label.size else 0.0,
    }


def geometry_fields(image: Volume, label: Volume | None) -> dict[str, Any]:
    sx, sy, sz = image.spatial_shape
    spacing = image.spacing
    out: dict[str, Any] = {
        "n_channels": image.n_channels,
        "shape_x": sx,
        "shape_y": sy,
        "shape_z": sz,
        "spacing_x": spacing[0],
        "spacing_y": spacing[1],
        "spacing_z": spacing[2],
        "orientation": image.orientation,
        "image_dtype": str(image.array.dtype),
        "has_label": label is not None,
    }
    if label is None:
        out.update(
            label_shape_x=0, label_shape_y=0, label_shape_z=0, label_dtype="", shape_match=True, affine_max_diff_mm=0.0
        )
        return out
    lx, ly, lz = label.array.shape[:3]
    out.update(
        label_shape_x=int(lx),
        label_shape_y=int(ly),
        label_shape_z=int(lz),
        label_dtype=str(label.array.dtype),
        shape_match=(int(lx), int(ly), int(lz)) == (sx, sy, sz) and label.array.ndim == 3,
        affine_max_diff_mm=float(np.abs(image.affine[:3, :] - label.affine[:3, :]).max()),
    )
    return out


def write_manifest(records: list[CaseRecord], path: Path) -> None:
    """Write records sorted by case id with deterministic float formatting (untouched when unchanged)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=lambda r: r.case_id):
        row = asdict(record)
        writer.writerow({k: (repr(float(v)) if k in _FLOAT else v) for k, v in row.items()})
    from lesionflow.files import write_text_if_changed

    write_text_if_changed(path, buffer.getvalue())


def read_manifest(path: Path) -> list[CaseRecord]:
    if not path.exists():
        return []
    out = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            typed: dict[str, Any] = {}
            for key in COLUMNS:
                value = row.get(key, "")
                if key in _BOOL:
                    typed[key] = value == "True"
                elif key in _INT:
                    typed[key] = int(value)
                elif key in _FLOAT:
                    typed[key] = float(value)
                else:
                    typed[key] = value
            out.append(CaseRecord(**typed))
    return out


def manifest_frame(records: list[CaseRecord]) -> Any:
    """The manifest as a pandas DataFrame (one row per case, COLUMNS order)."""
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in records], columns=list(COLUMNS))
