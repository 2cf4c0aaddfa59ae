"""Bounding spheres, DiffMask placement sampling and the §2.7 multi-channel merge rule."""

from __future__ import annotations

import numpy as np
import pytest

from lesionflow.seeding import rng_for
from lesionflow.synth.placement import (
    bounding_sphere,
    merge_class_channels,
    merge_label_masks,
    radii_pool,
    sample_spheres,
    sphere_channel,
    sphere_mask,
)

SHAPE = (28, 24, 26)


def _organ() -> np.ndarray:
    """An ellipsoid organ touching nothing but itself, plus a detached 2-voxel-thin slab."""
    organ = sphere_mask(SHAPE, (13, 11, 12), 9).astype(np.uint8)
    organ[25:27, 2:20, 2:20] = 1
    return organ


def test_sphere_mask_and_bounding_sphere() -> None:
    m = sphere_mask(SHAPE, (10, 9, 8), 3.0)
    assert m.dtype == bool
    assert m[10, 9, 8]
    assert m[13, 9, 8]
    assert not m[14, 9, 8]
    assert m[12, 11, 8]  # distance sqrt(8) < 3 is in
    assert not m[12, 12, 8]  # sqrt(13) > 3 is out
    s = bounding_sphere(m)
    np.testing.assert_allclose(s.centre, (10, 9, 8))
    assert s.radius == pytest.approx(3.0)
    ch = sphere_channel(SHAPE, s)
    assert ch.dtype == np.float32
    assert set(np.unique(ch)) == {-1.0, 1.0}
    np.testing.assert_array_equal(ch > 0, m)
    with pytest.raises(ValueError, match="empty mask"):
        bounding_sphere(np.zeros(SHAPE))


def test_spheres_inside_organ_with_pool_radii() -> None:
    organ = _organ()
    pool = radii_pool([1.5, 2.0, 3.0, 0.0, float("nan")])
    np.testing.assert_array_equal(pool, [1.5, 2.0, 3.0])
    placed = sample_spheres(organ, pool, 12, rng_for(0, "place"))
    assert len(placed.spheres) == 12
    assert placed.shortfall == 0
    assert placed.notes == ()
    for s in placed.spheres:
        assert s.radius in pool
        assert np.all(organ[sphere_mask(SHAPE, s.centre, s.radius)] == 1)
    again = sample_spheres(organ, pool, 12, rng_for(0, "place"))
    assert again.spheres == placed.spheres


def test_rejection_is_exact_at_the_volume_border() -> None:
    organ = np.ones((9, 9, 9), np.uint8)  # organ fills the volume: outside the volume counts as non-organ
    placed = sample_spheres(organ, [2.0], 50, rng_for(1), max_tries=2000)
    assert len(placed.spheres) == 50
    for s in placed.spheres:
        assert all(2 <= c <= 6 for c in s.centre)


def test_no_overlap_option() -> None:
    placed = sample_spheres(_organ(), [2.0], 4, rng_for(2), allow_overlap=False)
    centres = np.array([s.centre for s in placed.spheres])
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    assert np.all(dist[np.triu_indices(len(centres), 1)] > 4.0)


def test_impossible_placement_is_reported() -> None:
    thin = np.zeros(SHAPE, np.uint8)
    thin[5:7, 2:20, 2:20] = 1  # 2 voxels thick: no sphere of radius >= 1 fits
    placed = sample_spheres(thin, [1.0, 2.5], 3, rng_for(0), max_tries=50)
    assert placed.spheres == ()
    assert (placed.shortfall, placed.tries) == (3, 50)
    assert "placed 0 of 3 spheres" in placed.notes[0]
    assert "organ too thin" in placed.notes[1]
    empty = sample_spheres(np.zeros(SHAPE), [1.0], 2, rng_for(0))
    assert empty.shortfall == 2
    assert empty.notes == ("empty organ mask: no sphere placed",)


def test_merge_rule_on_overlapping_channels() -> None:
    shape = (4, 4, 4)
    ch = np.stack([np.full(shape, 1.0), np.full(shape, 2.0)]).astype(np.float32)
    m3 = np.zeros(shape, bool)
    m3[:2] = True
    m4 = np.zeros(shape, bool)
    m4[1:3] = True
    out = merge_class_channels(ch, [m3, m4])
    assert out.dtype == np.float32
    # background and class-3 voxels from channel 1, class-4 voxels (overlap included) from channel 2
    np.testing.assert_array_equal(out[0], 1.0)
    np.testing.assert_array_equal(out[1:3], 2.0)
    np.testing.assert_array_equal(out[3], 1.0)
    # same as the §2.7 formula where the masks do not overlap
    m4_only = m4 & ~m3
    formula = ch[0] * m3 + ch[1] * m4_only + ch[0] * (1 - m3 - m4_only)
    np.testing.assert_array_equal(merge_class_channels(ch, [m3, m4_only]), formula)
    label = merge_label_masks(np.stack([m3, m4]), [3, 4])
    assert label.dtype == np.uint8
    assert [int(label[i, 0, 0]) for i in range(4)] == [3, 4, 4, 0]
    with pytest.raises(ValueError, match="channels shape"):
        merge_class_channels(ch[:1], [m3, m4])
    with pytest.raises(ValueError, match="class values"):
        merge_label_masks([m3, m4], [3])
