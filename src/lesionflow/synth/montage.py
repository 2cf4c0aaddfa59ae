"""A montage of real next to synthetic lesions, for people reviewing a generated set (PNG bytes, no I/O).

Built on :func:`lesionflow.viz.montage_png` (same look, contours and deterministic bytes as the other montages):
one figure row per lesion class (ascending class value), holding up to ``per_class`` real lesions and then up
to ``per_class`` synthetic ones (each half as wide as the class with most lesions of that kind needs, at most
``per_class`` and at least one tile); each tile is the slice (along z) with the most lesion voxels
(:func:`lesionflow.viz.lesion_slice_index`, the middle slice for an empty mask) with the mask outline drawn.
Empty slots (a class with fewer lesions than its half is wide) are blank tiles in the window's darkest grey,
so the real and synthetic halves of every row stay aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lesionflow.viz import Tile, lesion_slice_index, montage_png, window


@dataclass(frozen=True, eq=False)
class LesionView:
    """One lesion to show: its ROI crop and mask, the lesion class and a short caption (e.g. case or sample id).

    ``image`` is (x, y, z) (channel 0 of the ROI; a (c, x, y, z) crop is reduced to channel 0), ``mask`` the
    (x, y, z) lesion mask (non-zero = lesion).
    """

    image: np.ndarray
    mask: np.ndarray
    label_class: int
    caption: str

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.ndim == 4:
            image = image[0]
        mask = np.asarray(self.mask) != 0
        if image.ndim != 3 or image.shape != mask.shape:
            raise ValueError(
                f"LesionView image {np.shape(self.image)} and mask {np.shape(self.mask)} must be (x, y, z)"
            )
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "mask", mask)


def _tile(view: LesionView, kind: str) -> Tile:
    z = lesion_slice_index(view.mask)
    if z is None:
        z = view.mask.shape[2] // 2
    title = f"{kind} c{view.label_class}: {view.caption}" if view.caption else f"{kind} c{view.label_class}"
    return Tile(title=title, image=view.image[:, :, z], label=view.mask[:, :, z].astype(np.uint8))


def _row_half(views: list[LesionView], kind: str, width: int, blank: Tile) -> list[Tile]:
    tiles = [_tile(v, kind) for v in views[:width]]
    if not tiles:  # say that this side has nothing for the class
        tiles = [Tile(title=f"(no {kind} lesion)", image=blank.image, label=None)]
    return tiles + [blank] * (width - len(tiles))


def lesion_montage(
    real: Sequence[LesionView],
    synthetic: Sequence[LesionView],
    *,
    title: str,
    is_ct: bool = False,
    per_class: int = 4,
) -> bytes:
    """PNG bytes of the real/synthetic montage (layout in the module docstring); identical bytes for equal input.

    Views are taken in the given order (the caller picks which ones to show). ``is_ct``: the crops are in HU
    and get the fixed CT window; leave it False for normalised store units (each tile then gets its own
    1-99th percentile window, as in :func:`lesionflow.viz.window`).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    blank_value = window(np.zeros((1, 1)), is_ct)[0]  # the darkest grey of the display window
    blank = Tile(title="", image=np.full((8, 8), blank_value), label=None)
    classes = sorted({v.label_class for v in real} | {v.label_class for v in synthetic})
    by_class = {
        c: ([v for v in real if v.label_class == c], [v for v in synthetic if v.label_class == c]) for c in classes
    }
    n_real = min(per_class, max([len(r) for r, _ in by_class.values()] + [1]))
    n_synthetic = min(per_class, max([len(s) for _, s in by_class.values()] + [1]))
    tiles: list[Tile] = []
    for reals, synthetics in by_class.values():
        tiles += _row_half(reals, "real", n_real, blank)
        tiles += _row_half(synthetics, "synthetic", n_synthetic, blank)
    return montage_png(tiles, is_ct=is_ct, columns=n_real + n_synthetic, title=title)
