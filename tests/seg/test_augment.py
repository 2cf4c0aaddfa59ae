"""Augmentation: draws from explicit streams, exact geometry on grid points, labels never interpolated."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lesionflow.params import AugmentParams
from lesionflow.seg.augment import (
    AugmentationDraw,
    apply_augmentation,
    draw_margin,
    read_margin,
    sample_augmentation,
)

ALWAYS = AugmentParams(
    flip_prob=1, rotate_prob=1, scale_prob=1, intensity_prob=1, gamma_prob=1, noise_prob=1, rotate_deg=30
)
NEVER = AugmentParams(
    flip_prob=0, rotate_prob=0, scale_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0, rotate_deg=30
)


def _region(shape: tuple[int, int, int], channels: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random image and a blocky label with values {0, 1, 2, 3}."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((channels, *shape), dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:9, 3:10, 1:8] = 1
    label[8:14, 5:12, 6:15] = 2
    label[4:7, 11:15, 10:14] = 3
    return image, label


def _sphere(shape: tuple[int, ...], radius: float) -> np.ndarray:
    centre = (np.asarray(shape) - 1) / 2
    grid = np.indices(shape).transpose(1, 2, 3, 0) - centre
    return (np.linalg.norm(grid, axis=-1) <= radius).astype(np.uint8)


def test_stream_alignment_and_identity_when_disabled() -> None:
    """Every configuration consumes the same draws; disabled/never gives the identity (same noise seed)."""
    draws, next_values = [], []
    for params in (ALWAYS, NEVER, AugmentParams(enabled=False), AugmentParams()):
        rng = np.random.default_rng(7)
        draws.append(sample_augmentation(rng, params))
        next_values.append(rng.random())
    assert len(set(next_values)) == 1
    assert len({d.noise_seed for d in draws}) == 1
    identity = AugmentationDraw(noise_seed=draws[0].noise_seed)
    assert draws[1] == identity
    assert draws[2] == identity


def test_draws_stay_in_their_ranges() -> None:
    for seed in range(50):
        draw = sample_augmentation(np.random.default_rng(seed), ALWAYS)
        assert all(draw.flips)
        assert all(abs(a) <= math.radians(30) for a in draw.rotation)
        assert ALWAYS.scale_range[0] <= draw.zoom <= ALWAYS.scale_range[1]
        assert ALWAYS.intensity_scale[0] <= draw.intensity_mult <= ALWAYS.intensity_scale[1]
        assert -0.25 <= draw.intensity_add <= 0.25
        assert draw.gamma is not None
        assert ALWAYS.gamma_range[0] <= draw.gamma <= ALWAYS.gamma_range[1]
        assert draw.noise_std == ALWAYS.noise_std


def test_identity_draw_returns_the_exact_centre_crop() -> None:
    image, label = _region((22, 20, 18))
    out_image, out_label = apply_augmentation(image, label, AugmentationDraw(), (16, 14, 12))
    assert out_image.dtype == np.float32
    assert out_label.dtype == np.uint8
    assert np.array_equal(out_image, image[:, 3:19, 3:17, 3:15])
    assert np.array_equal(out_label, label[3:19, 3:17, 3:15])


def test_resampling_with_an_identity_matrix_reproduces_the_centre_crop() -> None:
    """A full turn goes through affine_grid/grid_sample: checks the normalized-coordinate scaling per axis."""
    image, label = _region((20, 6, 13))
    draw = AugmentationDraw(rotation=(0.0, 0.0, 2 * math.pi))
    assert draw.is_spatial
    out_image, out_label = apply_augmentation(image, label, draw, (16, 2, 9))
    assert np.array_equal(out_label, label[2:18, 2:4, 2:11])
    np.testing.assert_allclose(out_image, image[:, 2:18, 2:4, 2:11], atol=1e-5)


def test_flips_are_exact() -> None:
    image, label = _region((16, 16, 16))
    out_image, out_label = apply_augmentation(image, label, AugmentationDraw(flips=(True, False, True)), (16, 16, 16))
    assert np.array_equal(out_image, image[:, ::-1, :, ::-1])
    assert np.array_equal(out_label, label[::-1, :, ::-1])


@pytest.mark.parametrize(("axis", "plane"), [(0, (1, 2)), (1, (2, 0)), (2, (0, 1))])
def test_rotation_by_90_degrees_matches_rot90(axis: int, plane: tuple[int, int]) -> None:
    image, label = _region((17, 17, 17))
    angles = [0.0, 0.0, 0.0]
    angles[axis] = math.pi / 2
    draw = AugmentationDraw(rotation=(angles[0], angles[1], angles[2]))
    out_image, out_label = apply_augmentation(image, label, draw, (17, 17, 17))
    assert np.array_equal(out_label, np.rot90(label, 1, axes=plane))  # nearest on grid points: exact
    np.testing.assert_allclose(out_image, np.rot90(image, 1, axes=(plane[0] + 1, plane[1] + 1)), atol=1e-5)


def test_spatial_draws_keep_the_label_value_set() -> None:
    image, label = _region((24, 24, 24))
    image, label = np.pad(image, ((0, 0), *[(6, 6)] * 3)), np.pad(label, 6)  # the patch [10, 26) holds the blocks
    values = set(np.unique(label).tolist())
    for seed in range(8):
        draw = sample_augmentation(np.random.default_rng(seed), ALWAYS)
        margin = draw_margin(draw, (16, 16, 16))
        lo = [10 - m for m in margin]
        assert min(lo) >= 0, "the test region is too small for this draw"
        window = tuple(slice(a, a + 16 + 2 * m) for a, m in zip(lo, margin, strict=True))
        out_image, out_label = apply_augmentation(image[(slice(None), *window)], label[window], draw, (16, 16, 16))
        assert out_image.shape == (2, 16, 16, 16)
        assert set(np.unique(out_label).tolist()) <= values
        assert len(np.unique(out_label)) >= 3  # the labels were moved, not wiped out


@pytest.mark.parametrize("zoom", [0.8, 1.25])
def test_zoom_scales_a_sphere_volume_by_zoom_cubed(zoom: float) -> None:
    patch = (33, 33, 33)
    draw = AugmentationDraw(zoom=zoom)
    margin = draw_margin(draw, patch)
    region = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    label = _sphere(region, radius=8)
    image = label[None].astype(np.float32)
    _, out_label = apply_augmentation(image, label, draw, patch)
    ratio = out_label.sum() / label.sum()
    assert ratio == pytest.approx(zoom**3, rel=0.1)


def test_intensity_scale_and_shift_are_exact() -> None:
    image, label = _region((16, 16, 16))
    draw = AugmentationDraw(intensity_mult=1.5, intensity_add=-0.25)
    out_image, out_label = apply_augmentation(image, label, draw, (16, 16, 16))
    assert np.array_equal(out_image, image * np.float32(1.5) + np.float32(-0.25))
    assert np.array_equal(out_label, label)


@pytest.mark.parametrize("gamma", [0.7, 2.0])
def test_gamma_keeps_each_channels_min_and_max(gamma: float) -> None:
    image, label = _region((16, 16, 16))
    out_image, _ = apply_augmentation(image, label, AugmentationDraw(gamma=gamma), (16, 16, 16))
    for channel, out in zip(image, out_image, strict=True):
        assert out.min() == channel.min()
        assert out.max() == channel.max()
        unit = (channel.astype(np.float64) - channel.min()) / (channel.max() - channel.min())
        expected = unit**gamma * (channel.max() - channel.min()) + channel.min()
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
        # gamma > 1 pulls values towards min, gamma < 1 towards max
        assert (np.mean(out < channel) > 0.9) == (gamma > 1)


def test_noise_is_deterministic_per_seed_with_the_drawn_std() -> None:
    image = np.zeros((1, 32, 32, 32), dtype=np.float32)
    label = np.zeros((32, 32, 32), dtype=np.uint8)
    draw = AugmentationDraw(noise_std=0.1, noise_seed=123)
    first, _ = apply_augmentation(image, label, draw, (32, 32, 32))
    again, _ = apply_augmentation(image, label, draw, (32, 32, 32))
    other, _ = apply_augmentation(image, label, AugmentationDraw(noise_std=0.1, noise_seed=124), (32, 32, 32))
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)
    assert first.std() == pytest.approx(0.1, rel=0.03)
    assert abs(first.mean()) < 0.002


def test_full_draw_is_byte_deterministic_and_leaves_the_input_alone() -> None:
    image, label = _region((24, 24, 24))
    before = image.copy(), label.copy()
    draw = AugmentationDraw(
        flips=(True, False, True),
        rotation=(0.3, -0.2, 0.1),
        zoom=1.2,
        intensity_mult=0.9,
        intensity_add=0.1,
        gamma=1.3,
        noise_std=0.05,
        noise_seed=5,
    )
    results = [apply_augmentation(image, label, draw, (16, 16, 16)) for _ in range(2)]
    assert results[0][0].tobytes() == results[1][0].tobytes()
    assert results[0][1].tobytes() == results[1][1].tobytes()
    assert np.array_equal(image, before[0])
    assert np.array_equal(label, before[1])


def test_read_margin_is_zero_without_rotation_or_zoom_out() -> None:
    assert read_margin(AugmentParams(enabled=False), (32, 32, 32)) == (0, 0, 0)
    assert read_margin(NEVER, (32, 32, 32)) == (0, 0, 0)
    zoom_in_only = AugmentParams(rotate_prob=0, scale_prob=1, scale_range=(1.0, 1.4))
    assert read_margin(zoom_in_only, (32, 32, 32)) == (0, 0, 0)
    assert read_margin(AugmentParams(rotate_prob=0, scale_prob=1, scale_range=(0.5, 1.0)), (33, 17, 9)) == (16, 8, 4)


def test_read_margin_covers_the_extreme_draws() -> None:
    """A region of ones, read with read_margin, is never sampled outside: no zero padding blends in."""
    params = AugmentParams(rotate_prob=1, rotate_deg=30, scale_prob=1, scale_range=(0.7, 1.3))
    patch = (20, 16, 12)
    margin = read_margin(params, patch)
    region = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    half = (np.asarray(patch) - 1) / 2
    assert all(m <= math.ceil(np.linalg.norm(half) / 0.7 - h) for m, h in zip(margin, half, strict=True))
    image, label = np.ones((1, *region), dtype=np.float32), np.ones(region, dtype=np.uint8)
    r = math.radians(30)
    corners = list(itertools.product((-r, 0.0, r), repeat=3))
    interior = [tuple(a) for a in np.random.default_rng(0).uniform(-r, r, (20, 3))]
    for angles in corners + interior:
        draw = AugmentationDraw(rotation=(angles[0], angles[1], angles[2]), zoom=0.7)
        assert all(d <= m for d, m in zip(draw_margin(draw, patch), margin, strict=True))
        out_image, out_label = apply_augmentation(image, label, draw, patch)
        assert out_image.min() > 1 - 1e-5, angles
        assert out_label.min() == 1, angles


def test_region_must_be_patch_plus_even_margin() -> None:
    image, label = _region((17, 16, 16))
    with pytest.raises(ValueError, match="even margin"):
        apply_augmentation(image, label, AugmentationDraw(), (16, 16, 16))
    with pytest.raises(ValueError, match="even margin"):
        apply_augmentation(image[:, :16], label[:16], AugmentationDraw(), (18, 16, 16))
