"""Synthetic-lesion checks on tiny hand-made arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lesionflow.quality.synthetic_checks import (
    KsResult,
    background_identical,
    background_max_abs_diff,
    boundary_gradient,
    boundary_shell,
    component_count,
    detected_fraction,
    histogram_w1,
    inside_fraction,
    is_binary,
    lesion_w1,
    nearest_neighbour_similarity,
    normalized_cross_correlation,
    pairwise_similarity,
    volume_ks,
)

RANGE = (-1.0, 1.0)


def cube(shape: tuple[int, int, int] = (8, 8, 8), lo: int = 2, hi: int = 6) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


# ----------------------------------------------------------------------------------- background


def test_background_diff_zero_for_identical_and_exact_for_one_changed_voxel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 6)).astype(np.float32)
    mask = cube((6, 6, 6), 2, 4)
    assert background_max_abs_diff(x, x.copy(), mask) == 0.0
    assert background_identical(x, x.copy(), mask)

    y = x.copy()
    y[:, mask] += 5.0  # changes inside the mask do not count
    assert background_max_abs_diff(x, y, mask) == 0.0
    assert background_identical(x, y, mask)

    y[1, 0, 0, 0] = x[1, 0, 0, 0] + np.float32(0.25)  # one background voxel of the second channel
    assert background_max_abs_diff(x, y, mask) == pytest.approx(0.25, abs=1e-6)
    assert not background_identical(x, y, mask)


def test_background_diff_3d_exact_value() -> None:
    x = np.zeros((4, 4, 4))
    y = x.copy()
    y[0, 1, 2] = -3.5
    assert background_max_abs_diff(x, y, np.zeros((4, 4, 4), bool)) == 3.5
    # masked out: not background
    m = np.zeros((4, 4, 4), bool)
    m[0, 1, 2] = True
    assert background_max_abs_diff(x, y, m) == 0.0


def test_background_nan_handling() -> None:
    x = np.zeros((3, 3, 3))
    x[0, 0, 0] = np.nan
    mask = np.zeros((3, 3, 3), bool)
    assert background_max_abs_diff(x, x.copy(), mask) == 0.0  # NaN vs NaN at the same place: equal
    y = x.copy()
    y[0, 0, 0] = 1.0
    assert background_max_abs_diff(x, y, mask) == np.inf  # NaN vs number
    assert background_max_abs_diff(y, x, mask) == np.inf


def test_background_identical_sees_signed_zero_and_dtype() -> None:
    x = np.zeros((3, 3, 3), np.float32)
    y = x.copy()
    y[1, 1, 1] = -0.0
    mask = np.zeros((3, 3, 3), bool)
    assert background_max_abs_diff(x, y, mask) == 0.0  # numerically equal...
    assert not background_identical(x, y, mask)  # ...but not bit-identical
    mask[1, 1, 1] = True
    assert background_identical(x, y, mask)  # inside the mask it does not matter
    assert not background_identical(x, x.astype(np.float64), mask)


def test_background_full_mask_and_shape_errors() -> None:
    x = np.zeros((2, 2, 2))
    full = np.ones((2, 2, 2), bool)
    assert background_max_abs_diff(x, x + 1, full) == 0.0
    assert background_identical(x, x + 1, full)
    with pytest.raises(ValueError, match="shape"):
        background_max_abs_diff(x, np.zeros((2, 2, 3)), full)
    with pytest.raises(ValueError, match="mask"):
        background_max_abs_diff(x, x, np.ones((3, 3, 3), bool))


# ----------------------------------------------------------------------------------- mask post-processing


def test_is_binary() -> None:
    assert is_binary(np.zeros((2, 2), bool))
    assert is_binary(np.array([0, 1, 1], np.uint8))
    assert is_binary(np.array([0.0, 1.0]))
    assert not is_binary(np.array([0, 2]))
    assert not is_binary(np.array([0.0, 0.5]))
    assert not is_binary(np.array([np.nan, 1.0]))


def test_component_count_two_blobs_and_connectivity() -> None:
    m = np.zeros((8, 8, 8), bool)
    m[1:3, 1:3, 1:3] = True
    m[5:7, 5:7, 5:7] = True
    assert component_count(m) == 2
    assert component_count(np.zeros((4, 4, 4), bool)) == 0
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # touch at a corner only
    assert component_count(diagonal, connectivity=3) == 1
    assert component_count(diagonal, connectivity=1) == 2
    with pytest.raises(ValueError, match="connectivity"):
        component_count(diagonal, connectivity=4)


def test_inside_fraction() -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, :] = True  # 4 voxels
    organ = np.zeros((4, 4, 4), np.uint8)
    organ[0, 0, :3] = 1  # 3 of them inside
    assert inside_fraction(mask, organ) == 0.75
    assert inside_fraction(mask, None) == 1.0
    assert inside_fraction(np.zeros((4, 4, 4), bool), organ) == 1.0
    assert inside_fraction(mask, np.ones((4, 4, 4))) == 1.0


# ----------------------------------------------------------------------------------- histograms


def test_w1_identical_is_zero_and_two_deltas_is_their_distance() -> None:
    h = np.array([0.1, 0.2, 0.3, 0.4])
    assert histogram_w1(h, h, RANGE) == 0.0
    a, b = np.zeros(8), np.zeros(8)
    a[1], b[5] = 1.0, 1.0  # bin width 0.25 over [-1, 1]: centres 4 bins apart
    assert histogram_w1(a, b, RANGE) == pytest.approx(1.0)
    assert histogram_w1(b, a, RANGE) == pytest.approx(1.0)
    assert histogram_w1(a * 3, b, RANGE) == pytest.approx(1.0)  # renormalised first
    # half the mass moved by 2 bins
    c = np.zeros(8)
    c[1], c[3] = 0.5, 0.5
    assert histogram_w1(a, c, RANGE) == pytest.approx(0.5 * 2 * 0.25)


def test_w1_multiclass_blocks() -> None:
    bins = 4
    a = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], float)  # class 2 absent
    b = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0], float)
    # block 0: 3 bins apart (width 0.5) = 1.5; block 1 empty in both; block 2 identical = 0 -> mean 0.75
    assert histogram_w1(a, b, RANGE, bins=bins) == pytest.approx(0.75)
    b2 = b.copy()
    b2[8:] = 0.0  # block 2 now empty in b only: left out
    assert histogram_w1(a, b2, RANGE, bins=bins) == pytest.approx(1.5)
    assert np.isnan(histogram_w1(np.zeros(4), np.zeros(4), RANGE))
    with pytest.raises(ValueError, match="multiple"):
        histogram_w1(a, b, RANGE, bins=5)
    with pytest.raises(ValueError, match="length"):
        histogram_w1(a, b[:8], RANGE)


def test_lesion_w1_against_target() -> None:
    image = np.full((4, 4, 4), -0.9)  # every lesion voxel in bin 0 of 4 over [-1, 1]
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    assert lesion_w1(image, mask, np.array([1.0, 0, 0, 0]), 4, RANGE) == 0.0
    assert lesion_w1(image[None], mask, np.array([0, 0, 1.0, 0]), 4, RANGE) == pytest.approx(1.0)  # 4D: channel 0
    assert np.isnan(lesion_w1(image, np.zeros_like(mask), np.array([1.0, 0, 0, 0]), 4, RANGE))
    bad = image.copy()
    bad[1, 1, 1] = np.nan
    assert np.isnan(lesion_w1(bad, mask, np.array([1.0, 0, 0, 0]), 4, RANGE))


# ----------------------------------------------------------------------------------- KS


def test_volume_ks() -> None:
    same = volume_ks([10, 20, 30, 40, 50], [10, 20, 30, 40, 50])
    assert isinstance(same, KsResult)
    assert same.statistic == 0.0
    assert same.pvalue == pytest.approx(1.0)
    assert (same.n_real, same.n_synthetic) == (5, 5)
    different = volume_ks(list(range(10, 30)), list(range(1000, 1020)))
    assert different.statistic == 1.0
    assert different.pvalue < 1e-6
    few = volume_ks([10], [1, 2, 3])
    assert np.isnan(few.statistic)
    assert few.pvalue == 1.0
    assert (few.n_real, few.n_synthetic) == (1, 3)


# ----------------------------------------------------------------------------------- boundary


def test_boundary_shell_is_two_voxels_across_the_border() -> None:
    m = cube((8, 8, 8), 2, 6)
    shell = boundary_shell(m)
    assert shell[1, 3, 3]  # one voxel outside...
    assert shell[2, 3, 3]  # ...and one inside
    assert not shell[3, 3, 3]
    assert not shell[0, 3, 3]


def test_boundary_gradient_sticker_sharper_than_smooth_blob() -> None:
    shape = (16, 16, 16)
    mask = cube(shape, 5, 11)
    sticker = np.where(mask, 1.0, 0.0)
    smooth = ndimage.gaussian_filter(sticker, sigma=2.0)
    g_sticker, g_smooth = boundary_gradient(sticker, mask), boundary_gradient(smooth, mask)
    assert g_sticker > 2 * g_smooth > 0
    assert boundary_gradient(np.ones(shape), mask) == 0.0
    assert boundary_gradient(sticker[None], mask) == g_sticker  # 4D: channel 0
    assert np.isnan(boundary_gradient(sticker, np.zeros(shape, bool)))


def test_boundary_gradient_flat_axis() -> None:
    image = np.zeros((6, 6, 1))
    image[3:, :, 0] = 2.0
    mask = np.zeros((6, 6, 1), bool)
    mask[3:, :, 0] = True
    assert boundary_gradient(image, mask) > 0  # no error for a length-1 axis


# ----------------------------------------------------------------------------------- NCC, diversity, memorisation


def test_ncc_values() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5, 5))
    assert normalized_cross_correlation(a, a) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, -a) == pytest.approx(-1.0)
    assert normalized_cross_correlation(a, 3 * a + 2) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, np.ones_like(a)) == 0.0  # constant side
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, :2] = True
    b = a.copy()
    b[~mask] = rng.normal(size=int((~mask).sum()))  # equal only inside the mask
    assert normalized_cross_correlation(a, b, mask) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, b) < 0.9
    one = np.zeros((5, 5, 5), bool)
    one[0, 0, 0] = True
    assert normalized_cross_correlation(a, b, one) == 0.0  # a single voxel is constant


def test_pairwise_and_nearest_neighbour() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 4, 4))
    assert pairwise_similarity([a, a.copy(), a.copy()]) == pytest.approx(1.0)
    assert np.isnan(pairwise_similarity([a]))
    b = rng.normal(size=(4, 4, 4))
    expected = np.mean(
        [normalized_cross_correlation(a, b), normalized_cross_correlation(a, a), normalized_cross_correlation(b, a)]
    )
    assert pairwise_similarity([a, b, a]) == pytest.approx(expected)
    m1, m2 = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    m1[0], m2[1] = True, True
    assert pairwise_similarity([a, b], [m1, m2]) == pytest.approx(normalized_cross_correlation(a, b, m1 | m2))

    refs = [rng.normal(size=(3, 3, 3)), b, a + 0.01 * rng.normal(size=a.shape), a]
    value, index = nearest_neighbour_similarity(a, refs)  # the wrong-shape reference is skipped
    assert (value, index) == (pytest.approx(1.0), 3)
    assert nearest_neighbour_similarity(a, refs[:3])[1] == 2
    value, index = nearest_neighbour_similarity(a, [np.zeros((2, 2, 2))])
    assert np.isnan(value)
    assert index == -1


# ----------------------------------------------------------------------------------- acceptance


def test_detected_fraction() -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[0, :, 0] = True  # 4 voxels
    pred = np.zeros((4, 4, 4), np.uint8)
    pred[0, :3, 0] = 2  # any foreground class counts
    assert detected_fraction(pred, mask) == 0.75
    assert detected_fraction(np.zeros_like(pred), mask) == 0.0
    assert detected_fraction(pred, np.zeros_like(mask)) == 0.0  # empty lesion: not detected
    with pytest.raises(ValueError, match="shape"):
        detected_fraction(pred[:2], mask)
