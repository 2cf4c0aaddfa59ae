"""PIE trajectories on disk: one Zarr group per trajectory in ``data/synthetic/progression.zarr``.

Group ``<root>/<trajectory id>/`` (Zarr format 3, written atomically like a store case):

- ``frames`` (t, c, x, y, z) float32: frame 0 is the starting crop, one chunk per frame;
- ``masks`` (t, x, y, z) uint8: the estimated lesion mask of every frame;
- ``roi`` (x, y, z) uint8: the editable region M (1 = may change).

Attributes: ``spacing`` (x, y, z mm) and ``affine`` (4x4 voxel -> RAS mm) **of the crop**, i.e. the source case's
affine composed with the translation by ``origin`` (the crop's first voxel in the source volume), so a frame
written as NIfTI with that affine overlays the source case exactly; plus the source case, the loop settings, the
seed, the target and start severities, per-frame severities and the trajectory key (caching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lesionflow.store.zarr_store import clean_temp, ensure_root, jsonable, publish_group, write_array

__all__ = ["StoredTrajectory", "crop_affine", "list_trajectories", "read_trajectory", "write_trajectory"]


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
    root = Path(root)
    ensure_root(root)
    payload = jsonable(attrs)

    def build(tmp: Path) -> None:
        group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=payload)
        write_array(group, "frames", frames, (1, *frames.shape[1:]), ("t", "c", "x", "y", "z"))
        write_array(group, "masks", masks, (1, *masks.shape[1:]), ("t", "x", "y", "z"))
        write_array(group, "roi", roi, roi.shape, ("x", "y", "z"))

    publish_group(root, trajectory_id, build)


def list_trajectories(root: Path) -> list[str]:
    """Sorted ids of the complete trajectories (temp folders of interrupted writes excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name[0] not in "._" and _is_complete(p))


def read_trajectory(root: Path, trajectory_id: str) -> StoredTrajectory:
    folder = Path(root) / trajectory_id

    def array(name: str) -> np.ndarray:
        return np.asarray(zarr.open_array(str(folder / name), mode="r", zarr_format=3)[...])

    attrs = dict(zarr.open_group(str(folder), mode="r", zarr_format=3).attrs)
    return StoredTrajectory(frames=array("frames"), masks=array("masks"), roi=array("roi") > 0, attrs=attrs)


def repair(root: Path) -> list[str]:
    """Finish or undo interrupted writes (see :func:`lesionflow.store.zarr_store.clean_temp`)."""
    return clean_temp(Path(root), _is_complete)
