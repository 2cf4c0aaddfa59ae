"""Pyramid levels: which axes are halved, and block mean / maximum equal to a brute-force reference on any shape."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lesionflow.store.pyramid import downsample_image, downsample_label, level_factors, level_transform


def test_level_factors_halve_until_the_overview_size_and_keep_thin_axes() -> None:
    assert level_factors((300, 512, 512)) == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert level_factors((64, 64, 64)) == [(1, 1, 1), (2, 2, 2)]
    assert level_factors((20, 18, 16)) == [(1, 1, 1)]
    assert level_factors((12, 512, 512)) == [(1, 1, 1), *[(1, 2, 2)] * 4]  # 12 slices: never halved
    assert len(level_factors((10**6, 10**6, 10**6))) == 6  # capped


def _reference(volume: np.ndarray, step: tuple[int, ...], reduce: str) -> np.ndarray:
    shape = tuple(-(-n // f) for n, f in zip(volume.shape, step, strict=True))
    out = np.zeros(shape, dtype=np.float64)
    for idx in np.ndindex(*shape):
        block = volume[tuple(slice(i * f, i * f + f) for i, f in zip(idx, step, strict=True))]
        out[idx] = block.mean() if reduce == "mean" else block.max()
    return out


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    step=st.tuples(*[st.sampled_from([1, 2])] * 3),
    seed=st.integers(0, 2**16),
)
def test_block_mean_and_max_match_brute_force(
    shape: tuple[int, int, int], step: tuple[int, int, int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    got = downsample_image(image, step)
    assert got.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(got[c], _reference(image[c], step, "mean"), rtol=1e-5, atol=1e-6)
    label = rng.integers(0, 4, size=shape).astype(np.uint8)
    got_label = downsample_label(label, step)
    assert got_label.dtype == np.uint8
    assert np.array_equal(got_label, _reference(label, step, "max"))
    half = downsample_image(image.astype(np.float16), step)
    assert half.dtype == np.float16


def test_level_transform_puts_the_voxel_at_its_block_centre() -> None:
    scale, translation = level_transform([2.5, 0.7, 0.8], [4.25, 30.0, -12.5], [1, 4, 4])
    assert scale == [2.5, 2.8, 3.2]
    assert translation == [4.25, 30.0 + 0.7 * 1.5, -12.5 + 0.8 * 1.5]
