"""PIE trajectories on disk: one OME-Zarr image per trajectory in ``data/synthetic/progression.zarr``.

Group ``<root>/<trajectory id>/`` (Zarr format 3, written atomically like a store case), an NGFF 0.5 image with a
time axis; arrays are taken and returned in the code's order and stored with the spatial axes reversed
(:func:`lesionflow.io.layout.on_disk`), the order viewers expect:

- ``frames``: (t, c, x, y, z) float32, stored (t, c, z, y, x); frame 0 is the starting crop, one chunk per frame;
- ``labels/mask/0``: (t, x, y, z) uint8, stored (t, z, y, x): the estimated lesion mask of every frame, an NGFF
  label image of the frames;
- ``roi``: (x, y, z) uint8, stored (z, y, x): the editable region M (1 = may change); not an NGFF dataset.

Attributes: ``spacing`` (x, y, z mm) and ``affine`` (4x4 voxel (x, y, z) -> RAS mm) **of the crop**, i.e. the source
case's affine composed with the translation by ``origin`` (the crop's first voxel in the source volume), so a frame
written as NIfTI with that affine overlays the source case exactly; plus the source case, the loop settings, the
seed, the target and start severities, per-frame severities and the trajectory key (caching). The root lists the
trajectories as an NGFF collection (:func:`lesionflow.store.zarr_store.index_collection`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lesionflow.io.layout import on_disk
from lesionflow.store import ngff
from lesionflow.store.zarr_store import (
    clean_temp,
    ensure_root,
    index_collection,
    jsonable,
    publish_group,
    write_array,
)

__all__ = [
    "StoredTrajectory",
    "crop_affine",
    "index_trajectories",
    "list_trajectories",
    "read_trajectory",
    "write_trajectory",
]
FRAME_AXES = ("t", "c", "z", "y", "x")  # on disk
MASK_PATH = "labels/mask/0"


def crop_affine(affine: np.ndarray, origin: Sequence[int]) -> np.ndarray:
    """Affine of the crop starting at voxel ``origin`` (x, y, z) of a volume with ``affine``: A · T(origin)."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(origin, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ shift


@dataclass(frozen=True)
class StoredTrajectory:
    frames: np.ndarray  # (t, c, x, y, z)
    masks: np.ndarray  # (t, x, y, z) uint8
    roi: np.ndarray  # (x, y, z) bool
    attrs: dict[str, Any]


def _is_complete(group_dir: Path) -> bool:
    return (group_dir / "zarr.json").is_file() and (group_dir / "frames" / "zarr.json").is_file()


def write_trajectory(
    root: Path, trajectory_id: str, frames: np.ndarray, masks: np.ndarray, roi: np.ndarray, attrs: dict[str, Any]
) -> None:
    """Write (or replace) one trajectory atomically; ``attrs`` must hold ``spacing`` and ``affine`` of the crop."""
    frames = np.asarray(frames, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.uint8)
    roi = np.asarray(roi).astype(np.uint8)
    if frames.ndim != 5 or masks.shape != (frames.shape[0], *frames.shape[2:]) or roi.shape != frames.shape[2:]:
        raise ValueError(
            f"frames {frames.shape}, masks {masks.shape} and roi {roi.shape} must be (t, c, x, y, z), (t, x, y, z) "
            "and (x, y, z) of one trajectory"
        )
    if len(attrs.get("spacing", ())) != 3 or np.asarray(attrs.get("affine", ())).shape != (4, 4):
        raise ValueError("attrs must contain the crop's 'spacing' (3 values, mm) and 'affine' (4x4)")
    if "ome" in attrs:
        raise ValueError("'ome' is reserved for the NGFF metadata written by this module")
    root = Path(root)
    ensure_root(root)  # after every check: a refused trajectory leaves no store behind
    one_level = [(1, 1, 1)]
    image_ome = {
        "version": ngff.NGFF_VERSION,
        "multiscales": ngff.multiscales(trajectory_id, FRAME_AXES, ["frames"], attrs, one_level),
    }
    mask_ome = ngff.image_label(
        ngff.label_colors(masks), ngff.multiscales("mask", FRAME_AXES[:1] + FRAME_AXES[2:], ["0"], attrs, one_level)
    )
    payload = {**jsonable(attrs), "ome": jsonable(image_ome)}

    def build(tmp: Path) -> None:
        group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=payload)
        write_array(group, "frames", on_disk(frames), (1, *frames.shape[1:2], *frames.shape[:1:-1]), FRAME_AXES)
        labels = group.create_group("labels", attributes={"ome": {"version": ngff.NGFF_VERSION, "labels": ["mask"]}})
        mask = labels.create_group("mask", attributes={"ome": jsonable(mask_ome)})
        write_array(mask, "0", on_disk(masks), (1, *masks.shape[:0:-1]), FRAME_AXES[:1] + FRAME_AXES[2:])
        write_array(group, "roi", on_disk(roi), roi.shape[::-1], FRAME_AXES[2:])

    publish_group(root, trajectory_id, build)


def list_trajectories(root: Path) -> list[str]:
    """Sorted ids of the complete trajectories (temp folders of interrupted writes excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.name[0] not in "._" and p.name != ngff.COLLECTION_GROUP and _is_complete(p)
    )


def index_trajectories(root: Path) -> None:
    """List the complete trajectories as the root's NGFF collection (after a stage's writes)."""
    index_collection(Path(root), list_trajectories(root))


def read_trajectory(root: Path, trajectory_id: str) -> StoredTrajectory:
    folder = Path(root) / trajectory_id

    def array(name: str) -> np.ndarray:
        stored = zarr.open_array(str(folder / name), mode="r", zarr_format=3)[...]
        return np.ascontiguousarray(on_disk(np.asarray(stored)))

    attrs = dict(zarr.open_group(str(folder), mode="r", zarr_format=3).attrs)
    attrs.pop("ome", None)
    return StoredTrajectory(frames=array("frames"), masks=array(MASK_PATH), roi=array("roi") > 0, attrs=attrs)


def repair(root: Path) -> list[str]:
    """Finish or undo interrupted writes (see :func:`lesionflow.store.zarr_store.clean_temp`)."""
    return clean_temp(Path(root), _is_complete)
