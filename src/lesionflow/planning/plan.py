"""Fingerprint -> plan: target spacing, normalization per channel, patch and chunk size (nnU-Net's rules).

* Target spacing = the median spacing per axis. Anisotropy (nnU-Net's ANISO_THRESHOLD = 3): when the
  coarsest axis is more than 3x coarser than the finest of the others *and* the data are correspondingly
  short along it, that axis takes the 10th percentile of its spacings instead (never finer than the others).
* Normalization: CT channels clip to the dataset's foreground 0.5-99.5 percentiles and z-score with the
  dataset's foreground mean/std; every other channel is z-scored per case.
* Patch size: start from the median shape after resampling (capped at 256 per axis) and shrink the largest
  axis by one pooling step until a 3D U-Net with batch 2 fits the GPU memory budget. The memory model is a
  calibrated heuristic, not nnU-Net's per-topology estimate: ~1,900 bytes per patch voxel per sample for a
  32-feature 3D U-Net under AMP (nnU-Net's default 128³ patch x batch 2 fits its 8 GB reference).
  Sizes are multiples of 2^pooling_steps (16) so the U-Net can downsample 4 times.
* Chunk shape for the Zarr store: the patch size clipped to 64 per axis (a random patch read touches few
  chunks; chunks stay ~1 MB float32).
Every planned value can be overridden in params.yaml; the plan records which were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lesionflow.hashing import sha256_json
from lesionflow.planning.fingerprint import DatasetFingerprint

PLAN_VERSION = 1
ANISO_THRESHOLD = 3.0
BYTES_PER_VOXEL_PER_SAMPLE = 1900.0
BATCH_SIZE = 2
POOL_MULTIPLE = 16
MAX_PATCH_EDGE = 256
MAX_CHUNK_EDGE = 64


@dataclass(frozen=True)
class Plan:
    version: int
    fingerprint_digest: str
    target_spacing: tuple[float, float, float]  # mm, RAS axis order
    normalization: dict[
        str, Any
    ]  # {"schemes": [per channel "ct"|"zscore"], "ct": [per channel {clip_lo, clip_hi, mean, std} | None]}
    patch_size: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]
    batch_size: int
    median_shape_after_resampling: tuple[int, int, int]
    label_values: tuple[int, ...]
    n_channels: int
    modalities: tuple[str, ...]
    overrides: tuple[str, ...] = field(default=())  # params keys that replaced a planned value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def plan_hash(self) -> str:
        return sha256_json(self.to_dict())

    @property
    def preprocessing_hash(self) -> str:
        """Digest of the values that shape preprocessed bytes only. A new case moves the fingerprint (and
        the plan hash) but, when spacing and normalization stay put, must not reprocess the other cases."""
        return sha256_json(
            {
                "version": self.version,
                "target_spacing": self.target_spacing,
                "normalization": self.normalization,
                "chunk_shape": self.chunk_shape,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        d.pop("plan_hash", None)
        for key in (
            "target_spacing",
            "patch_size",
            "chunk_shape",
            "median_shape_after_resampling",
            "label_values",
            "modalities",
            "overrides",
        ):
            d[key] = tuple(d[key])
        return cls(**d)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[float, float, float]:
    """nnU-Net's rule: median spacing; the 10th percentile along a strongly anisotropic axis."""
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    median_shape = np.median(shapes, axis=0)
    anisotropic_spacing = target[worst] > ANISO_THRESHOLD * max(target[others])
    anisotropic_shape = median_shape[worst] * ANISO_THRESHOLD < min(median_shape[others])
    if anisotropic_spacing and anisotropic_shape:
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])))
    return (float(target[0]), float(target[1]), float(target[2]))


def _round_to_multiple(n: float, multiple: int) -> int:
    return max(multiple, math.floor(n / multiple) * multiple)


def fit_patch(median_shape: tuple[int, int, int], gpu_memory_gb: float) -> tuple[int, int, int]:
    """Largest multiple-of-16 patch <= the median shape that fits the memory budget (see module docstring)."""
    patch = [_round_to_multiple(min(max(s, POOL_MULTIPLE), MAX_PATCH_EDGE), POOL_MULTIPLE) for s in median_shape]
    budget_voxels = gpu_memory_gb * 1e9 / (BYTES_PER_VOXEL_PER_SAMPLE * BATCH_SIZE)
    while math.prod(patch) > budget_voxels and max(patch) > POOL_MULTIPLE:
        axis = int(np.argmax(patch))
        patch[axis] -= POOL_MULTIPLE
    return (patch[0], patch[1], patch[2])


def derive_plan(fp: DatasetFingerprint, *, gpu_memory_gb: float, overrides: dict[str, Any]) -> Plan:
    """Plan from the fingerprint; ``overrides`` maps plan field -> value for the params that were set."""
    spacings = np.asarray(fp.spacings, dtype=np.float64)
    shapes = np.asarray(fp.shapes, dtype=np.float64)
    spacing = tuple(overrides["target_spacing"]) if "target_spacing" in overrides else target_spacing(spacings, shapes)
    resampled = np.median(shapes * spacings / np.asarray(spacing), axis=0)
    median_shape = (round(resampled[0]), round(resampled[1]), round(resampled[2]))
    schemes: list[str] = []
    ct: list[dict[str, float] | None] = []
    for c, kind in enumerate(fp.modality_kinds):
        scheme = overrides.get("normalization", {}).get(str(c), "ct" if kind == "CT" else "zscore")
        schemes.append(scheme)
        stats = fp.foreground[c]
        ct.append(
            {"clip_lo": stats["p00_5"], "clip_hi": stats["p99_5"], "mean": stats["mean"], "std": stats["std"]}
            if scheme == "ct"
            else None
        )
    patch = tuple(overrides["patch_size"]) if "patch_size" in overrides else fit_patch(median_shape, gpu_memory_gb)
    chunk = tuple(overrides.get("chunk_shape") or (min(p, MAX_CHUNK_EDGE) for p in patch))
    return Plan(
        version=PLAN_VERSION,
        fingerprint_digest=fp.digest(),
        target_spacing=spacing,
        normalization={"schemes": schemes, "ct": ct},
        patch_size=patch,
        chunk_shape=chunk,
        batch_size=BATCH_SIZE,
        median_shape_after_resampling=median_shape,
        label_values=fp.label_values,
        n_channels=len(fp.modalities),
        modalities=fp.modalities,
        overrides=tuple(sorted(overrides)),
    )
