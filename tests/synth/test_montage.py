"""The real-vs-synthetic lesion montage: a PNG of the expected size, byte-identical for identical input."""

from __future__ import annotations

import io

import numpy as np
import pytest

from lesionflow.synth.montage import LesionView, lesion_montage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def view(seed: int, label_class: int, caption: str = "") -> LesionView:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(12, 10, 6)).astype(np.float32)
    mask = np.zeros((12, 10, 6), bool)
    mask[3:8, 2:7, 1 + seed % 4] = True
    return LesionView(image=image, mask=mask, label_class=label_class, caption=caption or f"v{seed}")


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size  # (width, height)


def test_montage_is_a_png_of_the_expected_grid_and_deterministic() -> None:
    real = [view(i, 1) for i in range(3)] + [view(10, 2)]
    synthetic = [view(20 + i, 1) for i in range(5)] + [view(30, 2)]
    first = lesion_montage(real, synthetic, title="LeFusion toy", per_class=2)
    assert first[:8] == PNG_SIGNATURE
    assert lesion_montage(real, synthetic, title="LeFusion toy", per_class=2) == first
    # viz.montage_png: 3 in x (3 + 0.4) in per tile at 80 dpi; 2 classes -> 2 rows of 2 * per_class = 4 tiles
    assert png_size(first) == (4 * 3 * 80, round((2 * 3 + 0.4) * 80))


def test_montage_changes_with_input_and_handles_missing_sides() -> None:
    real = [view(0, 1)]
    synthetic = [view(1, 1), view(2, 3)]  # class 3 has no real lesion
    a = lesion_montage(real, synthetic, title="t", per_class=1)
    b = lesion_montage(real, [view(1, 1), view(5, 3)], title="t", per_class=1)
    assert a[:8] == PNG_SIGNATURE
    assert a != b
    assert png_size(a) == (2 * 3 * 80, round((2 * 3 + 0.4) * 80))
    empty = lesion_montage([], [], title="nothing")
    assert empty[:8] == PNG_SIGNATURE


def test_ct_window_and_4d_crops() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 300.0, size=(1, 8, 8, 4))
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:5, 2:5, 2] = 1
    v = LesionView(image=image, mask=mask, label_class=1, caption="ct")
    assert v.image.shape == (8, 8, 4)
    assert v.mask.dtype == bool
    data = lesion_montage([v], [v], title="ct", is_ct=True, per_class=1)
    assert data[:8] == PNG_SIGNATURE


def test_invalid_input() -> None:
    with pytest.raises(ValueError, match="must be"):
        LesionView(image=np.zeros((4, 4, 4)), mask=np.zeros((4, 4, 3), bool), label_class=1, caption="")
    with pytest.raises(ValueError, match="per_class"):
        lesion_montage([view(0, 1)], [], title="t", per_class=0)


def test_halves_shrink_to_the_lesions_available() -> None:
    # at most 1 real and 2 synthetic lesions per class: 3 columns although per_class is 4
    data = lesion_montage([view(0, 1)], [view(1, 1), view(2, 1), view(3, 2)], title="t", per_class=4)
    assert png_size(data) == (3 * 3 * 80, round((2 * 3 + 0.4) * 80))
