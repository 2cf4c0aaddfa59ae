"""The copy-paste baseline: real lesions pasted voxel for voxel at new positions inside the organ."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from lesionflow.params_synth import SynthParams
from lesionflow.seeding import rng_for
from lesionflow.synth.compose import ComposedSample, paste_lesions
from lesionflow.synth.placement import sphere_mask
from lesionflow.synth.rois import Roi, lesion_rois

SHAPE = (32, 30, 24)
ROI = (16, 16, 16)


Case = tuple[np.ndarray, np.ndarray, np.ndarray]


def _case(seed: int, lesions: list[tuple[tuple[float, float, float], float]], dtype: str = "float32") -> Case:
    """(image (2, *SHAPE), label, organ): an ellipsoid organ with two-class sphere lesions (outer 1, core 2)."""
    rng = np.random.default_rng(seed)
    organ = sphere_mask(SHAPE, (16, 15, 12), 11).astype(np.uint8)
    label = np.zeros(SHAPE, np.uint8)
    for centre, radius in lesions:
        label[sphere_mask(SHAPE, centre, radius)] = 1
        label[sphere_mask(SHAPE, centre, radius / 2)] = 2
    image = rng.normal(0, 1, (2, *SHAPE)).astype(dtype)
    image[:, label > 0] += 2.5
    return image, label, organ


def _donors() -> list[Roi]:
    """Real lesion ROIs of two donor cases, as extract-rois stores them (float32 image)."""
    out: list[Roi] = []
    for i, lesions in enumerate([[((10.3, 12.0, 11.6), 3.2)], [((20.0, 18.0, 12.0), 2.2), ((12.0, 10.0, 12.0), 4.0)]]):
        image, label, organ = _case(100 + i, lesions)
        out += lesion_rois(image, label, organ, ROI, min_voxels=4, case_id=f"donor_{i}")
    return out


def _paste(
    seed: int = 0, count: int = 3, src: Case | None = None, donors: list[Roi] | None = None
) -> tuple[Case, list[Roi], ComposedSample]:
    src = src or _case(7, [((16.0, 15.0, 12.0), 2.5)])
    donors = donors or _donors()
    image, label, organ = src
    out = paste_lesions(image, label, organ, donors, ROI, count=count, rng=rng_for(seed, "synth", "c", "new", 0))
    return src, donors, out


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


def _at(a: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``a[..., p]`` for each (x, y, z) row of ``points``."""
    return a[..., points[:, 0], points[:, 1], points[:, 2]]


def test_pasted_lesions_are_the_donors_exactly_and_the_rest_is_untouched() -> None:
    (image, label, organ), donors, out = _paste(count=3)
    assert len(out.lesions) == 3, out.notes
    by_name = {f"{d.case_id}#{d.index}": d for d in donors}
    outside = out.generated == 0
    assert np.array_equal(_bits(out.image[:, outside]), _bits(image[:, outside]))
    assert np.array_equal(out.label[outside], label[outside])
    near_lesion = ndimage.binary_dilation(label > 0, iterations=2)
    for k, lesion in enumerate(out.lesions):
        region = out.generated == k + 1
        donor = by_name[str(lesion.donor)]
        assert lesion.mask_source == "paste"
        assert (lesion.histogram, lesion.histogram_mode, lesion.cluster) == ((), "none", None)
        assert lesion.voxels == int(region.sum()) == int(donor.mask.sum()) == donor.voxels
        assert lesion.classes == donor.classes
        # voxel p of the volume is voxel p - origin of the donor ROI: the mask, image and label line up exactly
        local = np.argwhere(region) - np.asarray(lesion.origin)
        assert _at(donor.mask, local).all()
        assert np.array_equal(_bits(out.image[:, region]), _bits(_at(donor.image, local)))  # every channel
        assert np.array_equal(out.label[region], _at(donor.label, local))
        assert set(np.unique(out.label[region]).tolist()) <= {1, 2}
        assert np.all(organ[region] > 0)  # inside the organ
        assert not near_lesion[region].any()  # away from the case's own lesion
        assert lesion.sphere is not None
        centre, radius = np.asarray(lesion.sphere[:3]), lesion.sphere[3]
        assert np.all(np.linalg.norm(np.argwhere(region) - centre, axis=1) <= radius + 1e-9)
    # lesions of one sample do not overlap: every generated voxel belongs to exactly one marker
    assert set(np.unique(out.generated)) == {0, 1, 2, 3}


def test_same_seed_same_bytes_other_seed_other_positions() -> None:
    _, _, a = _paste(seed=3)
    _, _, b = _paste(seed=3)
    _, _, c = _paste(seed=4)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.generated.tobytes() == b.generated.tobytes()
    assert (a.lesions, a.notes) == (b.lesions, b.notes)
    assert [r.origin for r in a.lesions] != [r.origin for r in c.lesions]


def test_float16_case_gets_the_stored_values_back() -> None:
    src = _case(7, [((16.0, 15.0, 12.0), 2.5)], dtype="float16")
    donors = []
    for i, lesions in enumerate([[((10.3, 12.0, 11.6), 3.2)], [((20.0, 18.0, 12.0), 2.2)]]):
        image, label, organ = _case(200 + i, lesions, dtype="float16")
        donors += lesion_rois(image.astype(np.float32), label, organ, ROI, min_voxels=4, case_id=f"d{i}")  # ROI store
    (image, label, _), donors, out = _paste(src=src, donors=donors, count=2)
    assert out.image.dtype == np.float16
    assert out.lesions
    by_name = {f"{d.case_id}#{d.index}": d for d in donors}
    for k, lesion in enumerate(out.lesions):
        region = out.generated == k + 1
        local = np.argwhere(region) - np.asarray(lesion.origin)
        donor = by_name[str(lesion.donor)]
        assert np.array_equal(out.image[:, region].astype(np.float32), _at(donor.image, local))
    outside = out.generated == 0
    assert np.array_equal(_bits(out.image[:, outside]), _bits(image[:, outside]))


def test_donors_that_cannot_be_pasted_are_noted_never_pasted_outside() -> None:
    donors = _donors()
    cut = replace(donors[0], voxels=donors[0].voxels + 5)  # the crop cuts this lesion
    _, _, out = _paste(donors=[cut], count=1)
    assert not out.lesions
    assert "not whole in their ROI" in " ".join(out.notes)
    image, label, _ = _case(7, [])
    tiny = np.zeros(SHAPE, np.uint8)
    tiny[14:17, 14:17, 10:13] = 1  # an organ thinner than every donor
    out = paste_lesions(image, label, tiny, donors, ROI, count=2, rng=rng_for(0, "x"))
    assert not out.lesions
    assert "placed 0 of 2" in out.notes[0]
    assert np.array_equal(out.image, image)
    assert np.array_equal(out.label, label)
    assert not out.generated.any()
    out = paste_lesions(image, label, None, donors, ROI, count=1, rng=rng_for(0, "x"))
    assert not out.lesions
    assert out.notes == ["no organ mask: nowhere to paste a lesion"]
    with pytest.raises(ValueError, match="channel"):
        paste_lesions(image[:1], label, tiny, donors, ROI, count=1, rng=rng_for(0, "x"))


def test_params_copy_paste_needs_no_generator_and_no_relesion() -> None:
    sp = SynthParams(method="copy-paste", generators=(), relesion_per_case=0)
    assert (sp.method, sp.generators) == ("copy-paste", ())
    with pytest.raises(ValidationError, match="relesion_per_case to 0"):
        SynthParams(method="copy-paste", generators=(), relesion_per_case=1)
    with pytest.raises(ValidationError, match="not among the trained generators"):
        SynthParams(method="lefusion", generators=())
