"""Pictures for people: montages of volumes with label contours, as deterministic PNG bytes.

Pure functions over arrays (no file reads); the stage decides what to show and where to write it.
Slices are shown in radiological-neutral "canonical" orientation: the caller passes RAS-ordered arrays.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    title: str
    image: np.ndarray  # 2D slice, rows = anterior-posterior axis after transposition by the caller
    label: np.ndarray | None  # 2D integer slice of the same shape, or None


def lesion_slice_index(label: np.ndarray | None, axis: int = 2) -> int | None:
    """Index along ``axis`` with the most foreground voxels (None without foreground)."""
    if label is None or not np.any(label):
        return None
    other = tuple(a for a in range(label.ndim) if a != axis)
    return int(np.argmax(np.count_nonzero(label, axis=other)))


def window(image: np.ndarray, is_ct: bool) -> tuple[float, float]:
    """Display range: a lung/soft-tissue window for CT, the 1-99th percentiles otherwise."""
    if is_ct:
        return -1000.0, 400.0
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def montage_png(tiles: list[Tile], *, is_ct: bool, columns: int = 4, title: str = "") -> bytes:
    """A grid of slices with label contours (one colour per label value), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows + 0.4), squeeze=False)
    colours = ["#ffd400", "#ff3b30", "#34c759", "#0a84ff", "#bf5af2"]
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile in zip(axes.ravel(), tiles, strict=False):
        lo, hi = window(tile.image, is_ct)
        ax.imshow(np.nan_to_num(tile.image.T), cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        if tile.label is not None:
            for i, value in enumerate(v for v in np.unique(tile.label) if v > 0):
                mask = (tile.label == value).T.astype(np.float32)
                ax.contour(mask, levels=[0.5], colors=[colours[i % len(colours)]], linewidths=1.0, origin="lower")
        ax.set_title(tile.title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
