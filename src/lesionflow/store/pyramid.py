"""Resolution pyramid of a stored volume, for viewers: pure numpy ops, no I/O.

Contract: arrays are in the store's on-disk order, spatial axes last (``(..., z, y, x)``); every level halves the
spatial axes :func:`level_factors` names (factor 2 or 1 per axis), over blocks of 2 voxels per halved axis. An odd edge
keeps its last voxel as a block of one (``ceil(n / 2)`` voxels), so no padding copy of the volume is made.

- Images: the block mean, accumulated in float32 (float16 images are averaged in float32 and cast back).
- Labels: the block maximum, so a one-voxel lesion stays visible at every level (label values are classes, and the
  larger value is the one drawn on top; training and evaluation read level 0 only).

Both use the same blocks, so the NGFF transform of a level (:func:`level_transform`) is the same for the image and
its labels: scale = spacing · factor, translation = origin + spacing · (factor - 1) / 2 (the block centre).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# Halve an axis while its edge is at least this: thinner axes (a few slices of a thick-slice scan) stay whole.
MIN_HALVED_EDGE = 16
# Stop once the largest edge is at most this: a viewer's overview needs no smaller level.
OVERVIEW_EDGE = 32
MAX_LEVELS = 6  # level 0 included: 512 voxels reach 32 in 4 halvings


def level_factors(shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per level (level 0 first), the per-axis factor relative to the previous level: 2 for a halved axis, else 1.

    Level 0 is ``(1, ..., 1)``. A new level is made while the largest edge exceeds :data:`OVERVIEW_EDGE`, halving
    every axis whose edge is at least :data:`MIN_HALVED_EDGE`; at most :data:`MAX_LEVELS` levels.
    """
    edges = [int(s) for s in shape]
    levels: list[tuple[int, ...]] = [(1,) * len(edges)]
    while len(levels) < MAX_LEVELS and max(edges, default=0) > OVERVIEW_EDGE:
        step = tuple(2 if e >= MIN_HALVED_EDGE else 1 for e in edges)
        if step == (1,) * len(edges):
            break
        edges = [-(-e // f) for e, f in zip(edges, step, strict=True)]
        levels.append(step)
    return levels


def _blocks(shape: Sequence[int], step: Sequence[int]) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(source slices, destination slices) over the spatial axes, one pair per offset inside a block."""
    pairs = []
    for offsets in itertools.product(*(range(f) for f in step)):
        src = tuple(slice(o, None, f) for o, f in zip(offsets, step, strict=True))
        dst = tuple(slice(0, -(-(n - o) // f)) for n, o, f in zip(shape, offsets, step, strict=True))
        pairs.append((src, dst))
    return pairs


def downsample_image(image: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """Block mean of ``image`` (..., z, y, x) over ``step`` (per spatial axis 1 or 2); same dtype as ``image``."""
    spatial = image.shape[-len(step) :]
    lead = (slice(None),) * (image.ndim - len(step))
    out_shape = (*image.shape[: -len(step)], *(-(-n // f) for n, f in zip(spatial, step, strict=True)))
    total = np.zeros(out_shape, dtype=np.float32)
    count = np.zeros(out_shape[-len(step) :], dtype=np.float32)
    for src, dst in _blocks(spatial, step):
        total[(*lead, *dst)] += image[(*lead, *src)]
        count[dst] += 1.0
    total /= count
    return total.astype(image.dtype, copy=False)


def downsample_label(label: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """Block maximum of ``label`` (z, y, x) integer classes over ``step``; same dtype."""
    out = np.zeros(tuple(-(-n // f) for n, f in zip(label.shape, step, strict=True)), dtype=label.dtype)
    for src, dst in _blocks(label.shape, step):
        np.maximum(out[dst], label[src], out=out[dst])
    return out


def level_transform(
    spacing: Sequence[float], origin: Sequence[float], factor: Sequence[int]
) -> tuple[list[float], list[float]]:
    """NGFF (scale, translation) of a level whose voxel is a block of ``factor`` level-0 voxels (cumulative).

    ``spacing``/``origin``: level 0's voxel size and the world position of voxel 0's centre, per spatial axis in the
    array's order. The block's centre sits ``(factor - 1) / 2`` level-0 voxels past its first voxel.
    """
    scale = [float(s) * f for s, f in zip(spacing, factor, strict=True)]
    translation = [float(o) + float(s) * (f - 1) / 2 for o, s, f in zip(origin, spacing, factor, strict=True)]
    return scale, translation
