"""The one memory-layout rule for voxel arrays: the code indexes (..., x, y, z), memory runs x fastest.

The code's axis order is RAS (x, y, z), channels first. NIfTI stores x fastest (Fortran order in (x, y, z)) and the
Zarr store keeps (..., z, y, x) C-order on disk (OME-Zarr), so an array whose x varies fastest in memory is read from
NIfTI and written to the store without a transposed copy: its reversed-spatial view is C-contiguous. A 512x512x300
volume's transposed copy costs about 0.4 s; a case made three of them (docs/benchmarks.md, issue 18).
Every operation gives the same values in either layout; only speed and memory depend on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def on_disk(array: np.ndarray) -> np.ndarray:
    """The view of ``array`` with its last three (spatial) axes reversed: (..., x, y, z) <-> (..., z, y, x).

    Its own inverse; the one rule between the code's voxel order and the stored one."""
    return np.swapaxes(array, -1, -3)


def x_fastest(array: Any, dtype: Any = None) -> np.ndarray:
    """``array`` (..., x, y, z) laid out with x fastest and the leading axes slowest; no copy when it already is.

    Equivalently ``on_disk(result)`` is C-contiguous. ``dtype`` converts in the same pass. An array of fewer than
    three axes (a malformed volume, refused by its reader's checks later) is returned C-contiguous."""
    array = np.asarray(array)
    if array.ndim < 3:
        return np.ascontiguousarray(array, dtype=dtype)
    return on_disk(np.ascontiguousarray(on_disk(array), dtype=dtype))


def empty_x_fastest(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialized (..., x, y, z) array laid out like :func:`x_fastest`."""
    return on_disk(np.empty((*shape[:-3], shape[-1], shape[-2], shape[-3]), dtype=dtype))


_COUNT_SLAB = 1 << 18  # voxels per bincount call: bincount widens to int64, so a slab's temporary is 2 MiB


def present_values(array: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``array`` (any layout), read in memory order.

    Labels of up to 16 unsigned bits are counted slab by slab (``np.unique`` sorts or hashes 78 M voxels of a
    512x512x300 label in about 0.3 s, and copies a non-C-ordered one first); other dtypes go through ``np.unique``.
    """
    flat = np.asarray(array).ravel(order="K")
    if flat.dtype not in (np.bool_, np.uint8, np.uint16):
        return np.unique(flat)
    counts = np.zeros(2 if flat.dtype == np.bool_ else np.iinfo(flat.dtype).max + 1, dtype=np.int64)
    for i in range(0, flat.size, _COUNT_SLAB):
        slab = flat[i : i + _COUNT_SLAB]
        counts += np.bincount(slab.view(np.uint8) if slab.dtype == np.bool_ else slab, minlength=counts.size)
    return np.flatnonzero(counts).astype(flat.dtype)
