"""Lesion-centred and candidate ROIs from a tiny real Zarr store with spherical lesions of known geometry."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from lesionflow.store.zarr_store import CaseArrays, write_case
from lesionflow.synth.placement import sphere_mask
from lesionflow.synth.rois import (
    RoiSpec,
    candidate_rois,
    crop,
    extract_rois,
    lesion_components,
    lesion_rois,
)

SHAPE = (32, 32, 32)
# (centre, radius, class): the second lesion sits near the far corner, so its 16³ ROI is zero-padded.
LESIONS = [((10, 10, 12), 3.0, 1), ((27, 26, 28), 2.5, 2)]
SIZE = (16, 16, 16)


class Arrays(NamedTuple):
    image: np.ndarray
    label: np.ndarray
    organ: np.ndarray


def _case(seed: int, *, organ_empty: bool = False) -> Arrays:
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.3, (2, *SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    for centre, radius, cls in LESIONS:
        label[sphere_mask(SHAPE, centre, radius)] = cls
    organ = np.zeros(SHAPE, np.uint8)
    if not organ_empty:
        organ[2:30, 2:30, 2:30] = 1
    return Arrays(image=image, label=label, organ=organ)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for case_id, seed, empty in (("a", 1, False), ("b", 2, True)):
        write_case(
            root, case_id, CaseArrays(*_case(seed, organ_empty=empty)), {"spacing": [1, 1, 1]}, chunk_shape=(16, 16, 16)
        )
    return root


def test_lesion_rois_centred_on_known_spheres(store: Path) -> None:
    arrays = _case(1)
    rois = extract_rois(store, ["a"], SIZE, seed=0).lesions
    assert len(rois) == 2
    for roi, (centre, radius, cls) in zip(rois, LESIONS, strict=True):
        assert roi.case_id == "a"
        assert roi.kind == "lesion"
        assert roi.classes == (cls,)
        assert roi.origin == tuple(c - 8 for c in centre)
        assert roi.sphere is not None
        world = np.add(roi.sphere.centre, roi.origin)
        assert np.abs(world - centre).max() <= 1.0
        assert abs(roi.sphere.radius - radius) <= 1.0
        assert roi.voxels == int(sphere_mask(SHAPE, centre, radius).sum())
        assert roi.image.shape == (2, *SIZE)
        assert roi.image.dtype == np.float32
        assert roi.label.shape == SIZE
        assert roi.label.dtype == np.uint8
        # the crop equals the source arrays at the ROI offset, inside the volume
        o = roi.origin
        hi = [min(o[i] + SIZE[i], SHAPE[i]) for i in range(3)]
        src = (slice(o[0], hi[0]), slice(o[1], hi[1]), slice(o[2], hi[2]))
        dst = tuple(slice(0, hi[i] - o[i]) for i in range(3))
        np.testing.assert_array_equal(roi.image[(slice(None), *dst)], arrays.image[(slice(None), *src)])
        np.testing.assert_array_equal(roi.label[dst], arrays.label[src])
        assert roi.organ is not None
        np.testing.assert_array_equal(roi.organ[dst], arrays.organ[src])
        np.testing.assert_array_equal(roi.mask, roi.label == cls)


def test_border_roi_is_zero_padded(store: Path) -> None:
    roi = extract_rois(store, ["a"], SIZE, seed=0).lesions[1]
    assert roi.origin == (19, 18, 20)
    # x >= 32 - 19 = 13 lies outside the volume
    assert not roi.image[:, 13:].any()
    assert roi.image[:, :13, :14, :12].all()  # inside the volume: noise, never exactly 0
    assert not roi.label[13:].any()
    assert roi.organ is not None
    assert not roi.organ[:, :, 12:].any()


def test_roi_larger_than_volume() -> None:
    arrays = _case(3)
    rois = lesion_rois(arrays.image, arrays.label, arrays.organ, (40, 40, 40))
    assert [r.image.shape for r in rois] == [(2, 40, 40, 40)] * 2
    # everything of the volume that the window covers is copied, the rest is zero
    for roi in rois:
        np.testing.assert_array_equal(roi.image, crop(arrays.image, roi.origin, (40, 40, 40)))
        assert roi.label.sum() == arrays.label.sum()  # both lesions fit in the 40³ window


def test_roi_mask_excludes_other_lesions() -> None:
    label = np.zeros((24, 24, 24), np.uint8)
    label[5:8, 5:8, 5:8] = 1
    label[10:12, 5:7, 5:7] = 1
    image = np.ones((1, 24, 24, 24), np.float32)
    first, second = lesion_rois(image, label, None, (16, 16, 16))
    assert first.mask.sum() == 27
    assert first.label.astype(bool).sum() == 27 + 8
    assert second.mask.sum() == 8
    assert first.organ is None


def test_components_per_class_and_min_voxels() -> None:
    label = np.zeros((24, 24, 24), np.uint8)
    label[sphere_mask(label.shape, (12, 12, 12), 5)] = 1
    label[sphere_mask(label.shape, (12, 12, 12), 2)] = 2
    label[1, 1, 1] = 1
    merged = lesion_components(label)
    assert [c.classes for c in merged] == [(1,), (1, 2)]
    assert [c.classes for c in lesion_components(label, min_voxels=2)] == [(1, 2)]
    per_class = lesion_components(label, min_voxels=2, per_class=True)
    assert [c.classes for c in per_class] == [(1,), (2,)]
    assert per_class[1].voxels == int(sphere_mask(label.shape, (12, 12, 12), 2).sum())


def test_candidates_lesion_free_with_organ_centres(store: Path) -> None:
    arrays = _case(1)
    rois = extract_rois(store, ["a", "b"], SIZE, seed=7, candidates_per_case=4)
    cands = rois.candidates
    assert [c.case_id for c in cands] == ["a"] * 4
    assert len({c.origin for c in cands}) == 4
    for cand in cands:
        assert cand.kind == "candidate"
        assert cand.sphere is None
        assert not crop(arrays.label, cand.origin, SIZE).any()
        assert not cand.label.any()
        centre = tuple(o + s // 2 for o, s in zip(cand.origin, SIZE, strict=True))
        assert arrays.organ[centre] == 1
        np.testing.assert_array_equal(cand.image, crop(arrays.image, cand.origin, SIZE))
    # case "b" has an empty organ mask: reported, not raised
    assert rois.notes == ("b: 0 of 4 candidate ROIs (empty organ mask)",)
    again = extract_rois(store, ["a"], SIZE, seed=7, candidates_per_case=4).candidates
    assert [c.origin for c in again] == [c.origin for c in cands]
    other = extract_rois(store, ["a"], SIZE, seed=8, candidates_per_case=4).candidates
    assert [c.origin for c in other] != [c.origin for c in cands]


def test_candidate_shortfall_and_no_organ() -> None:
    arrays = _case(1)
    rng = np.random.default_rng(0)
    # a 40³ window around any organ voxel touches the first lesion: no room at all
    assert candidate_rois(arrays.image, arrays.label, arrays.organ, (40, 40, 40), 3, rng) == []
    assert candidate_rois(arrays.image, arrays.label, None, SIZE, 3, rng) == []
    few = candidate_rois(
        arrays.image, None, np.pad(np.ones((1, 1, 2), np.uint8), ((5, 26), (5, 26), (5, 25))), SIZE, 5, rng
    )
    assert len(few) == 2


def test_roi_spec_validation() -> None:
    assert RoiSpec((4, 5, 6)).size == (4, 5, 6)
    with pytest.raises(ValueError, match="3 ints"):
        RoiSpec((4, 5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        RoiSpec((4, 0, 6))
    arrays = _case(1)
    with pytest.raises(ValueError, match="spatial shape"):
        lesion_rois(arrays.image, arrays.label[:-1], None, SIZE)


def test_lesion_roi_problem_names_cut_and_border_lesions() -> None:
    from lesionflow.synth.rois import lesion_roi_problem

    label = np.zeros((20, 20, 20), np.uint8)
    label[8:13, 8:13, 8:13] = 1  # 5³, fully inside a 8³ ROI, away from the border
    label[0:3, 0:3, 15:18] = 1  # touches x = 0 and y = 0
    border, inside = lesion_rois(  # raster order: the x = 0 lesion comes first
        np.zeros((1, 20, 20, 20), np.float32), label, None, (8, 8, 8)
    )
    assert lesion_roi_problem(inside, label.shape) is None
    code, message = lesion_roi_problem(border, label.shape)  # type: ignore[misc]
    assert code == "lesion_touches_border"
    assert "along x,y" in message
    only_inside = label[:, :, :14]  # the border lesion cut away: one 5³ lesion left, larger than a 4³ ROI
    (big,) = lesion_rois(np.zeros((1, *only_inside.shape), np.float32), only_inside, None, (4, 4, 4))
    code, message = lesion_roi_problem(big, only_inside.shape)  # type: ignore[misc]
    assert code == "lesion_larger_than_roi"
    assert "synth.roi_size [4, 4, 4]" in message
