"""chest-ct demo: HU values, lung mask, nodules, anisotropic spacing, orientation handling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lesionflow.demo import DemoResult, build_demo_dataset, chest_ct, plan_cases
from lesionflow.io.volumes import Volume, read_volume

SEED, SIZE, CASES = 7, 32, 4


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return build_demo_dataset("chest-ct", CASES, tmp_path_factory.mktemp("chest") / "out", seed=SEED, size=SIZE)


def _read(result: DemoResult, index: int) -> tuple[Volume, Volume, Volume]:
    case = result.cases[index]
    folder = "Ts" if case.split == "test" else "Tr"
    return tuple(
        read_volume(result.out / f"{kind}{folder}/{case.case_id}.nii.gz", case.case_id)
        for kind in ("images", "labels", "organs")
    )


def test_hu_values_and_geometry(chest: DemoResult) -> None:
    for index in range(CASES):
        image, _, organ = _read(chest, index)
        hu = image.array
        assert hu.dtype == np.int16
        assert hu.min() >= -1024
        assert hu.max() <= 3071
        assert image.spacing == pytest.approx(chest_ct.SPACING)
        assert image.spacing[2] > 2 * image.spacing[0]  # anisotropic: thick slices
        assert image.spatial_shape == (SIZE, SIZE, SIZE // 2)
        lung = organ.array > 0
        assert lung.mean() > 0.03
        assert -900 <= hu[lung].mean() <= -750
        assert hu[0, 0, :].mean() == pytest.approx(-1000, abs=30)  # air in the corner
        assert hu.max() > 700  # cortical bone (spine, ribs)


def test_nodules_inside_lungs_and_lesion_free_case(chest: DemoResult) -> None:
    free = 0
    for index, case in enumerate(chest.cases):
        image, label, organ = _read(chest, index)
        nodules = label.array == 1
        assert set(np.unique(label.array)) <= {0, 1}
        assert not (nodules & (organ.array == 0)).any(), f"{case.case_id}: nodule outside the lung mask"
        assert case.lesion_voxels == {1: int(nodules.sum())}
        if nodules.any():
            # Nodules are denser than the surrounding parenchyma (solid or ground-glass).
            assert image.array[nodules].mean() > image.array[(organ.array > 0) & ~nodules].mean() + 50
        else:
            free += 1
    assert free == 1


def test_reoriented_case_has_the_same_world_content(chest: DemoResult) -> None:
    image, label, organ = _read(chest, 2)  # every third case is stored LPS, like DICOM-derived files
    assert image.orientation == label.orientation == organ.orientation == "LPS"
    _, free = plan_cases(CASES, np.random.default_rng(np.random.SeedSequence([SEED, 1])), 0.25)
    canonical = chest_ct.synthesize(np.random.default_rng(np.random.SeedSequence([SEED, 1, 2])), SIZE, not free[2])
    for stored, reference in ((image, canonical.image), (label, canonical.label), (organ, canonical.organ)):
        back = nib.as_closest_canonical(nib.Nifti1Image(stored.array, stored.affine))
        np.testing.assert_allclose(back.affine, reference.affine, atol=1e-4)  # NIfTI stores float32
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), reference.array)
    # World coordinates of one voxel agree: the stored corner (0, 0, 0) is the canonical (n-1, n-1, 0).
    n = image.spatial_shape
    corner = image.affine @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(corner, canonical.image.affine @ np.array([n[0] - 1, n[1] - 1, 0, 1.0]))
    assert image.array[0, 0, 0] == canonical.image.array[n[0] - 1, n[1] - 1, 0]


def test_canonical_affine_is_ras_and_centred() -> None:
    shape, affine = chest_ct.chest_grid(80)
    assert shape == (80, 80, 40)
    assert "".join(nib.orientations.aff2axcodes(affine)) == "RAS"
    centre = affine @ np.array([*(np.asarray(shape) - 1) / 2.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
