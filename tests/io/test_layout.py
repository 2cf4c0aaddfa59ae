"""The memory-layout rule (x fastest): no copy where the layout already holds, same values in every layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lesionflow.errors import CaseRejected
from lesionflow.io.layout import empty_x_fastest, on_disk, present_values, x_fastest
from lesionflow.io.volumes import Volume, nifti_bytes, read_volume, read_volume_shape


def test_a_nifti_volume_is_read_x_fastest_without_a_copy_and_written_to_disk_order_for_free(tmp_path: Path) -> None:
    data = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    volume = read_volume(tmp_path / "a.nii.gz", "a")
    np.testing.assert_array_equal(volume.array, data)  # same values, (x, y, z) indexing
    assert on_disk(volume.array).flags.c_contiguous  # (z, y, x) on disk is this array's memory as it is
    assert np.shares_memory(x_fastest(volume.array), volume.array)  # already x fastest: no copy
    shape, header_affine = read_volume_shape(tmp_path / "a.nii.gz", "a")
    assert shape == (5, 4, 3)
    np.testing.assert_array_equal(header_affine, volume.affine)


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int16, np.float32]),
        shape=hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=6),
    ),
    order=st.sampled_from(["C", "F"]),
)
def test_x_fastest_keeps_the_values_and_makes_the_disk_view_contiguous(array: np.ndarray, order: str) -> None:
    source = np.asarray(array, order=order)
    out = x_fastest(source)
    np.testing.assert_array_equal(out, source)
    assert on_disk(out).flags.c_contiguous
    assert np.shares_memory(x_fastest(out), out)  # already laid out: no copy
    empty = empty_x_fastest(source.shape, np.float32)
    assert empty.shape == source.shape
    assert on_disk(empty).flags.c_contiguous


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.bool_, np.uint8, np.uint16, np.int16, np.int64, np.float32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7),
    ),
    order=st.sampled_from(["C", "F"]),
)
def test_present_values_is_numpys_unique_in_any_layout(array: np.ndarray, order: str) -> None:
    got = present_values(np.asarray(array, order=order))
    want = np.unique(array)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_write_then_read_keeps_values_from_either_layout(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    for order in ("C", "F"):
        path = tmp_path / f"{order}.nii.gz"
        path.write_bytes(nifti_bytes(Volume(np.asarray(data, order=order), np.eye(4))))
        np.testing.assert_array_equal(read_volume(path, order).array, data)
    assert (tmp_path / "C.nii.gz").read_bytes() == (tmp_path / "F.nii.gz").read_bytes()  # same bytes either way


@pytest.mark.parametrize("kind", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_gzipped_nifti_1_and_2_in_either_byte_order_read_as_nibabel_reads_them(
    tmp_path: Path, kind: type, byteorder: str
) -> None:
    data = np.random.default_rng(1).integers(-1000, 3000, size=(7, 6, 5)).astype(f"{byteorder}i2")
    affine = np.array([[0, -0.8, 0, 10], [0.7, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    path = tmp_path / "v.nii.gz"
    img = kind(data, affine)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, path)
    volume = read_volume(path, "v")
    np.testing.assert_array_equal(volume.array, np.asanyarray(nib.load(path).dataobj))
    np.testing.assert_array_equal(volume.affine, nib.load(path).affine)


def test_a_corrupt_deflate_stream_is_one_line_naming_the_file(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 100, size=(40, 40, 20)).astype(np.int16)
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 64] = bytes(255 - b for b in blob[middle : middle + 64])  # garbage inside the stream
    path.write_bytes(bytes(blob))
    with pytest.raises(CaseRejected) as caught:
        read_volume(path, "bad")
    assert caught.value.code in ("truncated_file", "unreadable_file")
    assert "bad.nii.gz" in str(caught.value)
    assert "\n" not in str(caught.value)
