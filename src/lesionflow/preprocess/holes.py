"""Hole filling of a 3D mask, exact, fast when the mask leaves few voxels out (CT's nonzero mask).

``fill_holes(mask)`` equals ``scipy.ndimage.binary_fill_holes(mask)`` with its default structure: a background voxel
stays background when a 6-connected path of background voxels joins it to the array's border (scipy seeds its
dilation with ``border_value=1``); every other background voxel is a hole and becomes True.

scipy dilates from the border across the whole volume, about 1.4 s for a 512x512x300 CT whose nonzero mask leaves
out only some 20,000 scattered voxels (exact zeros in the noise). When the background is sparse, its components are
found on the background voxels alone: a graph with an edge between 6-neighbours, found by binary search in their
sorted flat indices, and ``scipy.sparse.csgraph.connected_components``. Above ``sparse_limit`` of the voxels
(an MR with a zero background) scipy's dilation is used as it is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SPARSE_LIMIT = 0.01  # background fraction up to which the sparse path runs (20k of 78M voxels: 0.03%)


def fill_holes(mask: np.ndarray, sparse_limit: float = SPARSE_LIMIT) -> np.ndarray:
    """``mask`` (3D bool, any layout) with its holes filled; a new C-contiguous array in ``mask``'s axis order."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask of shape {mask.shape}: expected 3D")
    background = np.flatnonzero(~mask.ravel())  # sorted flat indices
    n = background.size
    if n == 0 or n > sparse_limit * mask.size:
        return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)
    shape = mask.shape
    coords = np.unravel_index(background, shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    rows, cols = [], []
    for axis, step in enumerate(strides):  # edge to the next voxel along each axis, when it is background too
        has_next = np.flatnonzero(coords[axis] < shape[axis] - 1)
        target = background[has_next] + step
        at = np.minimum(np.searchsorted(background, target), n - 1)
        found = background[at] == target
        rows.append(has_next[found])
        cols.append(at[found])
    row, col = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(row.size, dtype=np.int8), (row, col)), shape=(n, n))
    n_components, component = connected_components(graph, directed=False)
    on_border = np.zeros(n, dtype=bool)
    for axis in range(3):
        on_border |= (coords[axis] == 0) | (coords[axis] == shape[axis] - 1)
    reaches_border = np.zeros(n_components, dtype=bool)
    reaches_border[component[on_border]] = True
    filled = mask.copy()
    filled.ravel()[background[~reaches_border[component]]] = True  # C-contiguous: ravel is a view
    return filled
