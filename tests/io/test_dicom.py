"""DICOM series discovery and reading on real files written by tests.helpers.dicom_factory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLossless, generate_uid

from lesionflow.errors import CaseRejected
from lesionflow.io.dicom import DicomSeries, find_series, is_dicom_file, read_series
from lesionflow.io.geometry import itk_geometry_to_affine
from tests.helpers.dicom_factory import write_ct_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE, SPACING = (16, 14), (0.7, 0.9, 2.0)  # non-square, anisotropic: catches swapped axes


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """Homogeneous voxel-corner coordinates (4 x 8) of a grid."""
    axes = [(-0.5, n - 0.5) for n in shape[:3]]
    return np.array([[i, j, k, 1.0] for i in axes[0] for j in axes[1] for k in axes[2]]).T


def _only_series(folder: Path) -> DicomSeries:
    found = find_series(folder)
    assert len(found) == 1
    return found[0]


def _rejected(series: DicomSeries, code: str, **kwargs: float) -> str:
    with pytest.raises(CaseRejected) as info:
        read_series(series, "case_x", **kwargs)
    assert info.value.code == code, info.value.message
    assert "\n" not in str(info.value)
    return info.value.message


def _rewrite(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.parametrize("orientation", ["axial", "oblique", "tilted"])
def test_round_trip_values_and_affine(tmp_path: Path, orientation: str) -> None:
    written = write_ct_series(tmp_path, orientation=orientation, shape=SHAPE, spacing=SPACING)
    series = _only_series(tmp_path)
    assert series.modality == "CT"
    assert series.series_uid == written.series_uid
    assert series.files == written.files  # sorted along the normal although names/InstanceNumber are shuffled

    volume = read_series(series, "case_1")
    assert volume.array.dtype == np.int16
    assert volume.array.shape == (*SHAPE, 12)
    np.testing.assert_array_equal(volume.array, written.array_hu)
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ written.affine_lps, atol=1e-6)
    assert volume.spacing[:2] == pytest.approx(SPACING[:2], abs=1e-6)


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_geometry_matches_simpleitk(tmp_path: Path, orientation: str) -> None:
    write_ct_series(tmp_path, orientation=orientation, shape=SHAPE, spacing=SPACING, seed=3)
    volume = read_series(_only_series(tmp_path), "case_1")

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path)))  # sitk sorts itself
    image = reader.Execute()
    itk_affine = itk_geometry_to_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    itk_array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)

    corners = _corners(volume.array.shape)
    np.testing.assert_allclose(volume.affine @ corners, itk_affine @ corners, atol=1e-4)
    np.testing.assert_array_equal(volume.array, itk_array)


def test_tilted_stack_keeps_true_slice_vector(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, orientation="tilted", shape=SHAPE, spacing=SPACING)
    volume = read_series(_only_series(tmp_path), "case_1")
    last_slice_centre = volume.affine @ np.array([0.0, 0.0, 11.0, 1.0])
    ipp_last = np.array(pydicom.dcmread(written.files[-1]).ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(last_slice_centre[:3], LPS_TO_RAS[:3, :3] @ ipp_last, atol=1e-6)


def test_find_series_groups_mixed_folder_and_ignores_junk(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path, n_slices=12, seed=1)
    b = write_ct_series(tmp_path / "nested" / "deeper", n_slices=8, orientation="oblique", seed=2)
    for path in b.files[:3]:  # mix the two series in one folder
        shutil.move(path, tmp_path / path.name)
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 50)
    (tmp_path / "DICM_but_garbage").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 20)
    _write_non_image(tmp_path / "report.dcm", a.series_uid)

    found = find_series(tmp_path)
    assert [s.series_uid for s in found] == sorted([a.series_uid, b.series_uid])
    by_uid = {s.series_uid: s for s in found}
    assert len(by_uid[a.series_uid].files) == 12
    assert len(by_uid[b.series_uid].files) == 8
    assert [p.name for p in by_uid[b.series_uid].files] == [p.name for p in b.files]
    assert is_dicom_file(a.files[0])
    assert not is_dicom_file(tmp_path / "fake.dcm")
    np.testing.assert_array_equal(read_series(by_uid[b.series_uid], "b").array, b.array_hu)


def _write_non_image(path: Path, series_uid: str) -> None:
    """A Part 10 object without pixel data (like SR / RTSTRUCT) in the same series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "SR"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_missing_slice(tmp_path: Path) -> None:
    write_ct_series(tmp_path, drop_slice=5)
    message = _rejected(_only_series(tmp_path), "missing_slice")
    assert "about 1 slice(s) missing" in message
    assert "4.000 mm" in message
    assert "2.000 mm" in message


def test_jittered_slice_is_uneven(tmp_path: Path) -> None:
    write_ct_series(tmp_path, jitter_slice=4, jitter_mm=0.3)
    message = _rejected(_only_series(tmp_path), "uneven_slice_spacing")
    assert "1.700" in message
    assert "2.300" in message
    # a generous tolerance accepts it
    assert read_series(_only_series(tmp_path), "c", spacing_tolerance=0.2).array.shape[2] == 12


def test_duplicate_slice(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path)
    shutil.copy(written.files[3], tmp_path / "copy.dcm")
    message = _rejected(_only_series(tmp_path), "duplicate_slice")
    assert "\n" not in message


def test_inconsistent_pixel_spacing(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, spacing=SPACING, shape=SHAPE)
    _rewrite(written.files[2], PixelSpacing=["0.5", "0.7"])
    message = _rejected(_only_series(tmp_path), "inconsistent_series")
    assert "PixelSpacing" in message
    assert "0.9000\\0.7000 in 11 slice(s)" in message
    assert "0.5000\\0.7000 in 1 slice(s)" in message


def test_truncated_file(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path)
    data = written.files[6].read_bytes()
    written.files[6].write_bytes(data[:-100])
    message = _rejected(_only_series(tmp_path), "unreadable_file")
    assert written.files[6].name in message


def test_missing_geometry_and_too_few_slices(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=3)
    _rewrite(written.files[1], ImagePositionPatient=None)
    message = _rejected(_only_series(tmp_path), "missing_geometry")
    assert "ImagePositionPatient" in message
    single = DicomSeries(written.series_uid, written.files[:1], "CT")
    _rejected(single, "too_few_slices")


def test_compressed_without_decoder(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=2)
    ds = pydicom.dcmread(written.files[0])
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(written.files[0])
    message = _rejected(_only_series(tmp_path), "unsupported_transfer_syntax")
    assert "JPEG Lossless" in message
    assert "dcmdjpeg" in message


def test_rescale_slope_gives_float32(tmp_path: Path) -> None:
    written = write_ct_series(tmp_path, n_slices=3)
    for path in written.files:
        _rewrite(path, RescaleSlope="0.5")
    volume = read_series(_only_series(tmp_path), "c")
    assert volume.array.dtype == np.float32
    expected = (written.array_hu.astype(np.float64) + 1024) * 0.5 - 1024
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
