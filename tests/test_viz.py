"""Montage PNGs: the slice choice, the display window, and byte-identical output for identical input."""

from __future__ import annotations

import numpy as np

from lesionflow.viz import Tile, lesion_slice_index, montage_png, window


def test_lesion_slice_is_the_one_with_most_foreground() -> None:
    label = np.zeros((8, 8, 10), np.uint8)
    label[2:4, 2:4, 3] = 1
    label[1:6, 1:6, 7] = 2
    assert lesion_slice_index(label) == 7
    assert lesion_slice_index(np.zeros((4, 4, 4))) is None
    assert lesion_slice_index(None) is None


def test_window_ct_and_percentiles() -> None:
    assert window(np.zeros((3, 3)), is_ct=True) == (-1000.0, 400.0)
    image = np.arange(1000, dtype=np.float32).reshape(10, 100)
    lo, hi = window(image, is_ct=False)
    assert 9 < lo < 11
    assert 988 < hi < 990
    assert window(np.full((2, 2), np.nan), is_ct=False) == (0.0, 1.0)


def test_montage_png_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    tiles = [Tile(f"c{i}", rng.normal(size=(24, 20)), (rng.random((24, 20)) > 0.8).astype(np.uint8)) for i in range(5)]
    first = montage_png(tiles, is_ct=False, title="t")
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert montage_png(tiles, is_ct=False, title="t") == first
