"""Normalization statistics recorded before resampling, and the stored-image checks against them (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lesionflow.preprocess import ops
from lesionflow.preprocess.normstats import (
    STATS_SLAB,
    NormStats,
    mean_std,
    memory_order_slabs,
    normalization_stats,
    stored_image_checks,
)
from lesionflow.preprocess.ops import PreprocessRecord

MR = {"schemes": ["zscore"]}


def _head(spacing: tuple[float, float, float], shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Noisy tissue in an ellipsoid with a brighter core; exactly 0 outside (skull-stripped MR)."""
    rng = np.random.default_rng(seed)
    world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) * np.array(spacing)
    r = (((world - (np.array(shape) - 1) / 2 * np.array(spacing)) / np.array([13.0, 11.0, 12.0])) ** 2).sum(-1)
    image = rng.normal(300.0, 40.0, shape).astype(np.float32) + np.float32(200.0) * (r < 0.3)
    image[r >= 1] = 0.0
    return image


@pytest.mark.parametrize(("spacing", "shape"), [((1.0, 1.0, 1.0), (30, 26, 28)), ((2.0, 2.0, 3.0), (15, 13, 10))])
def test_record_holds_zscore_statistics_in_the_normalization_mask(
    spacing: tuple[float, float, float], shape: tuple[int, int, int]
) -> None:
    image = _head(spacing, shape)
    affine = np.diag([*spacing, 1.0])
    out, _, record = ops.preprocess_arrays(image, None, affine, (1.5, 1.5, 2.0), MR)
    (stats,) = record.normalization
    assert stats.scheme == "zscore"
    assert stats.masked
    crop = image[record.crop.slices()]
    assert stats.n_voxels == int(ops.nonzero_mask(crop[None]).sum())  # the hole-filled nonzero mask of the crop
    assert stats.mean == pytest.approx(0.0, abs=1e-6)
    assert stats.std == pytest.approx(1.0, abs=1e-6)
    expected = (crop - crop[crop != 0].mean()) / crop[crop != 0].std()
    expected[crop == 0] = 0.0
    assert stats.lo == pytest.approx(float(expected.min()), abs=1e-5)
    assert stats.hi == pytest.approx(float(expected.max()), abs=1e-5)
    # the stored (resampled) image passes against it, although its non-zero voxels have std far from 1
    checks = stored_image_checks(out, record.normalization)
    assert checks.zscore_mean_abs < 1e-6
    assert checks.zscore_std_dev < 1e-6
    assert checks.n_nonfinite == 0
    assert 0.0 <= checks.range_excess < 0.1
    assert (checks.intensity_min, checks.intensity_max) == (float(out.min()), float(out.max()))
    nonzero = out[0][out[0] != 0]
    assert abs(float(nonzero.std()) - 1.0) > 0.2  # what the old gate measured (0.29 in the issue)
    back = PreprocessRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record


def test_record_without_normalization_statistics_still_loads() -> None:
    """A store written before the statistics were recorded: its records still map predictions back."""
    _, _, record = ops.preprocess_arrays(_head((1.0, 1.0, 1.0), (20, 18, 16)), None, np.eye(4), (1.0,) * 3, MR)
    old = record.to_dict()
    del old["normalization"]
    assert PreprocessRecord.from_dict(old).normalization == ()
    with pytest.raises(ValueError, match="rerun preprocess"):
        stored_image_checks(np.zeros((1, 4, 4, 4), np.float32), ())


def test_unmasked_and_ct_channels() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(5.0, 2.0, (2, 6, 5, 4)).astype(np.float32)
    image[1] = np.clip(image[1], 4.0, 6.0)  # a "CT" channel after clipping
    mask = np.zeros((6, 5, 4), bool)
    mask[1:5, 1:4, 1:3] = True
    a, b = normalization_stats(image, [mask, None], ["zscore", "ct"])
    assert a.masked
    assert a.n_voxels == 24
    assert a.mean == pytest.approx(float(image[0][mask].mean(dtype=np.float64)))
    assert a.std == pytest.approx(float(image[0][mask].std(dtype=np.float64)))
    assert (a.lo, a.hi) == (float(image[0].min()), float(image[0].max()))  # range over the whole crop
    assert not b.masked
    assert b.n_voxels == 120
    assert b.scheme == "ct"
    # CT statistics are dataset-wide, so they never enter the z-score columns
    checks = stored_image_checks(image, (NormStats("zscore", True, 24, 0.01, 0.98, a.lo, a.hi), b))
    assert checks.zscore_mean_abs == pytest.approx(0.01)
    assert checks.zscore_std_dev == pytest.approx(0.02)
    assert checks.range_excess == 0.0


def test_faults_show_in_the_checks() -> None:
    stats = (NormStats("zscore", True, 100, 0.0, 1.0, -2.0, 3.0),)
    ok = np.linspace(-2.0, 3.0, 64, dtype=np.float32).reshape(1, 4, 4, 4)
    assert stored_image_checks(ok, stats).range_excess == 0.0
    # not normalized at all: raw MR intensities leave [-2, 3] by a hundred widths
    assert stored_image_checks(ok * 40 + 300, stats).range_excess > 50
    # normalized with a 3x too large scale
    assert stored_image_checks(ok * 3, stats).range_excess == pytest.approx((9.0 - 3.0) / 5.0, rel=1e-6)
    # float16 storage that overflowed: counted, and the range of the finite voxels stays a finite number
    broken = ok.astype(np.float16)
    broken[0, 0, 0, :2] = np.inf
    broken[0, 1, 0, 0] = np.nan
    checks = stored_image_checks(broken, stats)
    assert checks.n_nonfinite == 3
    assert np.isfinite([checks.intensity_min, checks.intensity_max, checks.range_excess]).all()
    # a channel normalized to a constant (CT clipped flat) must stay constant
    flat = (NormStats("ct", False, 64, 1.0, 0.0, 1.0, 1.0),)
    assert stored_image_checks(np.ones((1, 4, 4, 4), np.float32), flat).range_excess == 0.0
    assert stored_image_checks(np.full((1, 4, 4, 4), 1.5, np.float32), flat).range_excess >= 1e6


def test_cubic_overshoot_at_a_sharp_edge_stays_within_the_default() -> None:
    """The worst case measured for the default quality.processed.max_range_excess (0.5): a flat block with exact
    zero around it, upsampled 2x2x3 mm -> 0.7 mm, overshoots its range by ~0.35 at the corners."""
    block = np.zeros((1, 16, 16, 12), np.float32)
    block[0, 4:12, 4:12, 3:9] = 1.0
    stats = normalization_stats(block, [None], ["zscore"])
    excess = stored_image_checks(ops.resample_image(block, (2.0, 2.0, 3.0), (0.7, 0.7, 0.7)), stats).range_excess
    assert 0.2 < excess < 0.5


def test_mean_std_over_slabs_matches_numpy_in_float64() -> None:
    """Issue 18 item 2: the slab-wise statistics equal NumPy's float64 ones without a float64 copy of the volume."""
    rng = np.random.default_rng(3)
    values = (rng.normal(40.0, 300.0, size=STATS_SLAB * 2 + 12345)).astype(np.float32)  # three slabs, one partial
    mean, std = mean_std(values)
    assert mean == pytest.approx(float(np.mean(values, dtype=np.float64)), rel=1e-12)
    assert std == pytest.approx(float(np.std(values, dtype=np.float64)), rel=1e-12)
    assert all(np.isnan(v) for v in mean_std(np.empty(0, dtype=np.float32)))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    pad=st.tuples(*[st.integers(0, 3)] * 3),
    size=st.integers(1, 70),
    fortran=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_memory_order_slabs_are_numpys_ravel_k_in_pieces(
    shape: tuple[int, int, int], pad: tuple[int, int, int], size: int, fortran: bool, seed: int
) -> None:
    """A strided view (the interior of a padded buffer) is read in the order ravel("K") gives, piece by piece."""
    big = np.random.default_rng(seed).normal(size=tuple(n + 2 * p for n, p in zip(shape, pad, strict=True)))
    big = np.asfortranarray(big) if fortran else big
    view = big[tuple(slice(p, p + n) for n, p in zip(shape, pad, strict=True))]
    pieces = [piece.copy() for piece in memory_order_slabs(view, size)]  # a piece is valid until the next one
    assert all(piece.size == size for piece in pieces[:-1])
    assert 0 < pieces[-1].size <= size
    np.testing.assert_array_equal(np.concatenate(pieces), view.ravel(order="K"))
    assert mean_std(view) == mean_std(view.copy(order="K"))  # the same slabs, so the same sums
