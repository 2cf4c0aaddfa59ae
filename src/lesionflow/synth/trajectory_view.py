"""Pictures of a PIE trajectory for people: a PNG strip and an animated GIF of one axial slice.

Pure functions from arrays to deterministic bytes. ``frames`` (t, c, x, y, z), ``masks`` (t, x, y, z); the slice
is the z with the most lesion voxels in the last frame (the middle slice when there is none), channel 0, shown with
one display window for all frames so brightness changes are real changes.
"""

from __future__ import annotations

import io

import numpy as np

from lesionflow.viz import Tile, lesion_slice_index, montage_png

__all__ = ["strip_slice", "trajectory_gif", "trajectory_strip_png"]


def strip_slice(masks: np.ndarray) -> int:
    """The z index shown: most lesion voxels in the last frame, else the middle slice."""
    index = lesion_slice_index(np.asarray(masks)[-1], axis=2)
    return int(index) if index is not None else int(np.asarray(masks).shape[-1] // 2)


def trajectory_strip_png(frames: np.ndarray, masks: np.ndarray, *, title: str = "") -> bytes:
    """One tile per frame (frame 0 = start) with the estimated lesion contour."""
    z = strip_slice(masks)
    tiles = [
        Tile(title=f"frame {n}", image=np.asarray(frames[n, 0, :, :, z], dtype=np.float32), label=masks[n, :, :, z])
        for n in range(len(frames))
    ]
    return montage_png(tiles, is_ct=False, columns=min(len(tiles), 6), title=title)


def trajectory_gif(frames: np.ndarray, masks: np.ndarray, *, scale: int = 8, frame_ms: int = 300) -> bytes:
    """Animated GIF (loops forever) of the shown slice, upscaled ``scale`` times, lesion outline in red."""
    from PIL import Image
    from scipy import ndimage

    z = strip_slice(masks)
    slices = np.asarray(frames[:, 0, :, :, z], dtype=np.float64)
    lo, hi = np.percentile(slices, [1, 99])
    hi = hi if hi > lo else lo + 1.0
    images = []
    for n in range(len(slices)):
        grey = (np.clip((slices[n] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8).T[::-1]  # rows = y, up = +y
        mask = (np.asarray(masks[n, :, :, z]) > 0).T[::-1]
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        rgb[edge] = (255, 59, 48)
        big = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
        images.append(Image.fromarray(big, mode="RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return out.getvalue()
