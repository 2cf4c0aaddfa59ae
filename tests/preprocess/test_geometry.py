"""Spline resampling in float32: the same samples as scipy's float64 prefilter within float32 rounding, less memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from lesionflow.io.layout import on_disk, x_fastest
from lesionflow.preprocess.geometry import _extend_edges, sample_grid, sample_spline, spline_buffer


def _scipy_reference(
    volume: np.ndarray, ratio: np.ndarray, shape: tuple[int, int, int], output: type = np.float64
) -> np.ndarray:
    """scipy's own path: prefilter into float64 (edge-padded), cubic spline, borders extended."""
    return ndimage.affine_transform(
        volume, ratio, offset=0.5 * ratio - 0.5, output_shape=shape, output=output, order=3, mode="nearest"
    )


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 14)] * 3),
    ratio=st.tuples(*[st.sampled_from([0.37, 0.5, 0.8, 1.0, 1.6, 2.5])] * 3),
    seed=st.integers(0, 2**16),
)
def test_float32_prefilter_samples_what_scipy_samples(
    shape: tuple[int, int, int], ratio: tuple[float, float, float], seed: int
) -> None:
    volume = (np.random.default_rng(seed).normal(size=shape) * 300.0).astype(np.float32)  # CT-like magnitudes
    scale = np.asarray(ratio, dtype=np.float64)
    out_shape = (
        max(1, round(shape[0] / ratio[0])),
        max(1, round(shape[1] / ratio[1])),
        max(1, round(shape[2] / ratio[2])),
    )
    got = sample_grid(volume, scale, out_shape, 3)
    assert got.dtype == np.float32
    want = _scipy_reference(volume, scale, out_shape)
    # float32 coefficients: errors of a few float32 ulps of the data's magnitude, far below any image noise
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(volume).max()))


def test_float32_prefilter_needs_less_than_half_of_scipys_work_memory() -> None:
    volume = np.random.default_rng(0).normal(size=(96, 96, 64)).astype(np.float32)
    ratio, shape = np.asarray([0.8, 0.8, 1.25]), (120, 120, 51)
    peaks = []
    for run in (
        lambda: sample_grid(volume, ratio, shape, 3),
        lambda: _scipy_reference(volume, ratio, shape, np.float32),  # what sample_grid called before
    ):
        tracemalloc.start()
        run()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    ours, scipys = peaks
    # scipy: the edge-padded copy, its float64 coefficients and the output; here the padded float32 coefficients
    # (filtered in place) and the output
    assert ours < 0.5 * scipys, (ours / volume.nbytes, scipys / volume.nbytes)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 12)] * 3),
    ratio=st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 1.6])] * 3),
    order=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_an_x_fastest_volume_samples_the_same_points_and_stays_x_fastest(
    shape: tuple[int, int, int], ratio: tuple[float, float, float], order: int, seed: int
) -> None:
    volume = (np.random.default_rng(seed).normal(size=shape) * 300.0).astype(np.float32)
    scale = np.asarray(ratio, dtype=np.float64)
    out_shape = tuple(max(1, round(n / r)) for n, r in zip(shape, ratio, strict=True))
    c_order = sample_grid(volume, scale, out_shape, order)  # type: ignore[arg-type]
    x_first = sample_grid(x_fastest(volume), scale, out_shape, order)  # type: ignore[arg-type]
    assert x_first.shape == c_order.shape
    assert on_disk(x_first).flags.c_contiguous  # the layout survives resampling: written to disk without a copy
    # the same points; the spline passes run in another axis order, so the sums round differently
    np.testing.assert_allclose(x_first, c_order, rtol=0, atol=1e-5 * float(np.abs(volume).max()))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 12)] * 3),
    ratio=st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 1.6])] * 3),
    x_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_volume_written_into_a_spline_buffer_samples_bit_for_bit_like_sample_grid(
    shape: tuple[int, int, int], ratio: tuple[float, float, float], x_first: bool, seed: int
) -> None:
    volume = (np.random.default_rng(seed).normal(size=shape) * 300.0).astype(np.float32)
    volume = x_fastest(volume) if x_first else volume
    scale = np.asarray(ratio, dtype=np.float64)
    out_shape = tuple(max(1, round(n / r)) for n, r in zip(shape, ratio, strict=True))
    padded, interior = spline_buffer(shape)
    interior[...] = volume
    got = sample_spline(padded, scale, out_shape)  # type: ignore[arg-type]
    want = sample_grid(x_fastest(volume), scale, out_shape, 3)  # type: ignore[arg-type]
    assert on_disk(got).flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@given(shape=st.tuples(*[st.integers(1, 6)] * 3), pad=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_edges_extended_in_place_equal_numpys_edge_padding(shape: tuple[int, int, int], pad: int, seed: int) -> None:
    volume = np.random.default_rng(seed).normal(size=shape)
    padded = np.full(tuple(n + 2 * pad for n in shape), np.nan)  # whatever was there must not survive
    padded[pad:-pad, pad:-pad, pad:-pad] = volume
    _extend_edges(padded, pad)
    np.testing.assert_array_equal(padded, np.pad(volume, pad, mode="edge"))
