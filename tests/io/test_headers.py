"""Header checks before allocation (issue 17 item 3) and the geometry/dtype checks (item 4), on real files."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from lesionflow.errors import CaseRejected
from lesionflow.io.geometry import SHEAR_TOLERANCE, check_affine, check_dtype
from lesionflow.io.volumes import read_volume
from tests.helpers import broken_files as bf


def _rejected(path: Path, code: str) -> str:
    with pytest.raises(CaseRejected) as info:
        read_volume(path, "case_h")
    assert info.value.code == code, info.value.message
    assert "\n" not in info.value.message
    return info.value.message


def test_tiny_nifti2_claiming_huge_dims_is_refused_before_reading(tmp_path: Path) -> None:
    """The issue's 612-byte NIfTI-2 claiming 100000^3 voxels: refused in one line, no MemoryError."""
    path = bf.write(tmp_path / "huge.nii", bf.huge_nifti2())
    assert path.stat().st_size == 612
    start = time.perf_counter()
    message = _rejected(path, "huge_dims")
    assert time.perf_counter() - start < 1.0
    assert "100000x100000x100000 = 1e+15 voxels" in message


def test_gzip_claiming_more_than_deflate_can_hold_is_refused_without_decompressing(tmp_path: Path) -> None:
    data = bf.volume(1)
    path = bf.write(tmp_path / "bomb.nii.gz", bf.nifti_bytes(data, dims=(2000, 2000, 400)))  # 6.4 GB as float32
    message = _rejected(path, "size_mismatch")
    assert "2000x2000x400" in message
    assert "can hold at most" in message


def test_gzip_isize_is_only_a_hint(tmp_path: Path) -> None:
    """A valid two-member gzip (ISIZE names only the last member) is counted, not refused."""
    data = bf.volume(2)
    blob = bf.nifti_bytes(data)
    path = tmp_path / "two_members.nii.gz"
    path.write_bytes(gzip.compress(blob[:500], mtime=0) + gzip.compress(blob[500:], mtime=0))
    np.testing.assert_array_equal(read_volume(path, "case_h").array, data)


def test_vox_offset_inside_the_header_is_refused(tmp_path: Path) -> None:
    """nibabel would read the header bytes as voxels."""
    path = bf.write(tmp_path / "offset0.nii", bf.nifti_bytes(bf.volume(3), vox_offset=0)[:352] + bf.volume(3).tobytes())
    assert "vox_offset 0" in _rejected(path, "invalid_header")


@pytest.mark.parametrize(
    ("shear", "accepted"), [(0.0, True), (0.5 * SHEAR_TOLERANCE, True), (2 * SHEAR_TOLERANCE, False), (0.3, False)]
)
def test_shear_tolerance(shear: float, accepted: bool) -> None:
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[0, 1] = shear * 0.8 / np.sqrt(1 - shear**2)  # column 1 at cos = shear to column 0
    if accepted:
        check_affine(affine, "c", "x.nii")
    else:
        with pytest.raises(CaseRejected, match="sheared affine") as info:
            check_affine(affine, "c", "x.nii")
        assert f"off-orthogonality {shear:.4g}" in info.value.message


def test_oblique_and_flipped_orthogonal_affines_pass() -> None:
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.7, 0.9, -2.5])
    check_affine(affine, "c", "x.nii")


def test_int64_narrowed_exactly_or_refused() -> None:
    values = np.array([[[-5, 0, 2**31 - 1]]], dtype=np.int64)
    narrowed = check_dtype(values, "c", "x.nii")
    assert narrowed.dtype == np.int32
    np.testing.assert_array_equal(narrowed, values)
    with pytest.raises(CaseRejected, match=r"uint64 values in \[0, 4294967296\]"):
        check_dtype(np.array([0, 2**32], dtype=np.uint64), "c", "x.nii")
