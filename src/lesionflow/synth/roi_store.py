"""The ROI set on disk: one Zarr v3 group with stacked ROI arrays plus a per-ROI table in its attributes.

Layout of ``<root>`` (written to a temp folder and renamed into place, so a reader never sees half a set):

- ``lesion/image`` (n, c, x, y, z) float32, ``lesion/label`` / ``lesion/mask`` / ``lesion/organ`` (n, x, y, z)
  uint8 (``organ`` all zero where the case has none); ``candidate/...`` the same for the lesion-free ROIs.
- root attributes: ``roi_size`` (x, y, z), ``lesions`` / ``candidates`` (one dict per ROI: case_id, index,
  origin, sphere centre and radius in ROI voxels, classes, voxels), ``notes``.

Readers get a :class:`~lesionflow.synth.rois.RoiSet` back, so the generators never see the file format.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lesionflow.synth.placement import Sphere
from lesionflow.synth.rois import Roi, RoiSet

_ARRAYS = ("image", "label", "mask", "organ")


def _row(roi: Roi) -> dict[str, Any]:
    return {
        "case_id": roi.case_id,
        "index": roi.index,
        "origin": list(roi.origin),
        "sphere": None if roi.sphere is None else {"centre": list(roi.sphere.centre), "radius": roi.sphere.radius},
        "classes": list(roi.classes),
        "voxels": roi.voxels,
        "has_organ": roi.organ is not None,
    }


def _stack(rois: Sequence[Roi], size: tuple[int, int, int], channels: int) -> dict[str, np.ndarray]:
    n = len(rois)
    out: dict[str, np.ndarray] = {
        "image": np.zeros((n, channels, *size), np.float32),
        "label": np.zeros((n, *size), np.uint8),
        "mask": np.zeros((n, *size), np.uint8),
        "organ": np.zeros((n, *size), np.uint8),
    }
    for i, roi in enumerate(rois):
        out["image"][i] = roi.image
        out["label"][i] = roi.label
        out["mask"][i] = roi.mask
        if roi.organ is not None:
            out["organ"][i] = roi.organ
    return out


def write_roi_set(root: Path, rois: RoiSet, channels: int) -> None:
    """Write ``rois`` to ``root`` atomically (an existing set is replaced only once the new one is complete)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".tmp-{root.name}-{secrets.token_hex(6)}")
    try:
        group = zarr.create_group(
            store=str(tmp),
            zarr_format=3,
            attributes={
                "roi_size": list(rois.size),
                "channels": channels,
                "lesions": [_row(r) for r in rois.lesions],
                "candidates": [_row(r) for r in rois.candidates],
                "notes": list(rois.notes),
            },
        )
        for kind, items in (("lesion", rois.lesions), ("candidate", rois.candidates)):
            sub = group.create_group(kind)
            for name, data in _stack(items, rois.size, channels).items():
                chunks = (1, *data.shape[1:]) if data.shape[0] else data.shape
                arr = sub.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0)
                if data.size:
                    arr[...] = data
        old = root.with_name(f".old-{root.name}-{secrets.token_hex(6)}")
        if root.exists():
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rois(group: zarr.Group, kind: str, rows: list[dict[str, Any]]) -> tuple[Roi, ...]:
    if not rows:
        return ()
    sub = group[kind]
    data: dict[str, np.ndarray] = {name: np.asarray(sub[name][...]) for name in _ARRAYS}  # type: ignore[index, call-overload]
    out = []
    for i, row in enumerate(rows):
        sphere = row["sphere"]
        out.append(
            Roi(
                case_id=row["case_id"],
                kind="lesion" if kind == "lesion" else "candidate",
                index=int(row["index"]),
                origin=tuple(int(o) for o in row["origin"]),  # type: ignore[arg-type]
                image=data["image"][i],
                label=data["label"][i],
                organ=data["organ"][i] if row["has_organ"] else None,
                mask=data["mask"][i].astype(bool),
                sphere=None if sphere is None else Sphere(tuple(sphere["centre"]), float(sphere["radius"])),
                classes=tuple(int(c) for c in row["classes"]),
                voxels=int(row["voxels"]),
            )
        )
    return tuple(out)


def read_roi_set(root: Path) -> RoiSet:
    """The ROI set written by :func:`write_roi_set`."""
    if not (root / "zarr.json").is_file():
        raise FileNotFoundError(f"no ROI set at {root}; run `lesionflow stage extract-rois` first")
    group = zarr.open_group(str(root), mode="r", zarr_format=3)
    attrs: dict[str, Any] = dict(group.attrs)
    return RoiSet(
        size=tuple(int(s) for s in attrs["roi_size"]),  # type: ignore[arg-type]
        lesions=_rois(group, "lesion", list(attrs["lesions"])),
        candidates=_rois(group, "candidate", list(attrs["candidates"])),
        notes=tuple(attrs["notes"]),
    )
