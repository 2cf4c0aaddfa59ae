"""brain-mri demo: anatomy-derived volumes, lesion placement, orientation handling."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from lesionflow.demo import DemoResult, brain_mri, build_demo_dataset, plan_cases
from lesionflow.io.volumes import Volume, read_volume

SEED, SIZE, CASES = 5, 32, 3


@pytest.fixture(scope="module")
def brain(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return build_demo_dataset("brain-mri", CASES, tmp_path_factory.mktemp("brain") / "out", seed=SEED, size=SIZE)


def _read(result: DemoResult, index: int) -> tuple[Volume, Volume, Volume]:
    case = result.cases[index]
    folder = "Ts" if case.split == "test" else "Tr"
    return tuple(
        read_volume(result.out / f"{kind}{folder}/{case.case_id}.nii.gz", case.case_id)
        for kind in ("images", "labels", "organs")
    )


def test_volumes_and_grid(brain: DemoResult) -> None:
    for index in range(CASES):
        image, label, organ = _read(brain, index)
        assert image.array.dtype == np.float32
        assert np.isfinite(image.array).all()
        assert label.array.dtype == np.uint8
        assert set(np.unique(label.array)) <= {0, 1, 2}
        assert max(image.spatial_shape) == SIZE
        assert image.spacing[0] == pytest.approx(image.spacing[1]) == pytest.approx(image.spacing[2])
        brain_mask = organ.array > 0
        assert 0.2 < brain_mask.mean() < 0.6
        # Rician background is dim; tissue (WM ~ 1) is bright.
        assert image.array[brain_mask].mean() > 5 * image.array[~brain_mask].mean()


def test_lesions_inside_brain_with_core_wrapped_by_edema(brain: DemoResult) -> None:
    lesion_cases = 0
    for index, case in enumerate(brain.cases):
        _, label, organ = _read(brain, index)
        lab = label.array
        assert not (lab[organ.array == 0]).any(), f"{case.case_id}: lesion outside the brain mask"
        assert case.lesion_voxels == {1: int((lab == 1).sum()), 2: int((lab == 2).sum())}
        if not lab.any():
            continue
        lesion_cases += 1
        assert (lab == 1).sum() > 0
        assert (lab == 2).sum() > 0
        cores, n = ndi.label(lab == 2, structure=np.ones((3, 3, 3)))
        for component in range(1, n + 1):
            ring = ndi.binary_dilation(cores == component, structure=np.ones((3, 3, 3)))
            assert (lab[ring] == 1).any(), f"{case.case_id}: enhancing core {component} has no edema around it"
    assert lesion_cases == 2
    assert sum(1 for c in brain.cases if not any(c.lesion_voxels.values())) == 1


def test_world_coordinates_are_mni() -> None:
    shape, affine = brain_mri.brain_grid(64)
    assert max(shape) == 64
    centre = affine @ np.array([*(np.asarray(shape) - 1) / 2.0, 1.0])
    # MNI152 brain bounding box centre: x ~ 0, y ~ -17, z ~ +5 mm.
    np.testing.assert_allclose(centre[:3], [0.0, -17.0, 5.0], atol=6.0)
    assert "".join(nib.orientations.aff2axcodes(affine)) == "RAS"


def test_reoriented_case_has_the_same_world_content(brain: DemoResult) -> None:
    image, label, organ = _read(brain, 2)  # every third case is stored LAS
    assert image.orientation == label.orientation == organ.orientation == "LAS"
    _, free = plan_cases(CASES, np.random.default_rng(np.random.SeedSequence([SEED, 0])), 0.25)
    rng = np.random.default_rng(np.random.SeedSequence([SEED, 0, 2]))
    canonical = brain_mri.synthesize(rng, SIZE, lesions=not free[2])
    for stored, reference in ((image, canonical.image), (label, canonical.label), (organ, canonical.organ)):
        back = nib.as_closest_canonical(nib.Nifti1Image(stored.array, stored.affine))
        np.testing.assert_allclose(back.affine, reference.affine, atol=1e-4)  # NIfTI stores float32
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), reference.array)

    # Same statement in world terms: the brain-mask centroid maps to the same MNI point.
    def centroid_mm(v: Volume) -> np.ndarray:
        return (v.affine @ np.append(np.argwhere(v.array > 0).mean(axis=0), 1.0))[:3]

    np.testing.assert_allclose(centroid_mm(organ), centroid_mm(canonical.organ), atol=1e-3)  # float32 sform
    assert not np.array_equal(organ.array, canonical.organ.array)  # the voxel order really differs


def test_lesion_free_flag_is_respected() -> None:
    rng = np.random.default_rng(0)
    case = brain_mri.synthesize(rng, 24, lesions=False)
    assert not case.label.array.any()


def test_missing_template_is_a_source_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lesionflow.errors import SourceError

    monkeypatch.setattr(brain_mri.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match="nilearn"):
        build_demo_dataset("brain-mri", 3, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
