"""Write tiny synthetic DICOM CT series to disk for tests.

Every file carries the identifying values in :data:`PHI` (including a value in a private block), so
de-identification tests can search the written bytes for them. The geometry is exact and known:
:class:`WrittenSeries` returns the HU array in lesionflow's ``(i, j, k)`` = (column, row, slice) order and
the voxel -> LPS affine the files encode.

File names and InstanceNumber are shuffled so that neither reveals the slice order: a reader has to sort
by ImagePositionPatient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Original identifying values written into every file. Keys that are DICOM keywords are set as such;
# "PrivateValue" goes into a private block (0009,xx10). StudyDate is used for every date in the file.
PHI: dict[str, str] = {
    "PatientName": "DOE^JANE",
    "PatientID": "PID-5551234",
    "PatientBirthDate": "19610203",
    "PatientAddress": "12 Elm Street Springfield",
    "PatientTelephoneNumbers": "555-0199-321",
    "OtherPatientIDs": "OPID-31337",
    "PatientMotherBirthName": "ROE^MARY",
    "InstitutionName": "St Example Hospital",
    "InstitutionAddress": "1 Hospital Road Exampleton",
    "InstitutionalDepartmentName": "Radiology Example Wing",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PerformingPhysicianName": "QUINN^MICHAELA",
    "NameOfPhysiciansReadingStudy": "KILDARE^JAMES",
    "OperatorsName": "SMITH^OPERATOR",
    "AccessionNumber": "ACC-99887",
    "StudyID": "STUDY-4242",
    "StationName": "CTSTATION-7",
    "DeviceSerialNumber": "SN-777123",
    "StudyDate": "20240115",
    "StudyDescription": "CT chest DOE^JANE",
    "SeriesDescription": "Axial 2mm for JANE DOE",
    "ImageComments": "Comment about JANE DOE",
    "AdditionalPatientHistory": "History of DOE JANE",
    "PrivateValue": "PRIVATE-SECRET-42",
}

PRIVATE_CREATOR = "LESIONFLOW TEST"
_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate")
_NON_KEYWORD_KEYS = {"PrivateValue"}


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_ct_series` wrote.

    ``files`` are in true slice order (dropped slice omitted); ``array_hu`` holds all ``n_slices`` slices,
    including a dropped one, as int16 HU in ``(i, j, k)`` order; ``affine_lps`` maps voxel (i, j, k) to LPS mm
    for the intended regular stack (a jittered slice is off it).
    """

    files: tuple[Path, ...]
    array_hu: np.ndarray
    series_uid: str
    affine_lps: np.ndarray
    study_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[str, ...]


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts]))


def _ds(value: float) -> str:
    """A DS string (<= 16 chars) whose float value is exactly what the expected geometry uses."""
    text = f"{value:.8f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _directions(orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_dir, col_dir, slice_dir_unit_per_mm_of_normal) rounded as written to the files."""
    if orientation in ("axial", "tilted"):
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    elif orientation == "oblique":
        # Rotation by 25 deg about a non-axis direction: every IOP component is non-trivial.
        axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
        angle = np.deg2rad(25.0)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
        row, col = rot[:, 0], rot[:, 1]
    else:
        raise ValueError(f"orientation must be axial, oblique or tilted, not {orientation!r}")
    row = np.array([float(_ds(v)) for v in row])
    col = np.array([float(_ds(v)) for v in col])
    normal = np.cross(row, col)
    # "tilted": gantry tilt of 15 deg, the stack is sheared along the column direction.
    slice_dir = normal + (np.tan(np.deg2rad(15.0)) * col if orientation == "tilted" else 0.0)
    return row, col, slice_dir


def write_ct_series(
    folder: str | Path,
    *,
    n_slices: int = 12,
    shape: tuple[int, int] = (16, 16),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.0),
    orientation: Literal["axial", "oblique", "tilted"] = "axial",
    series_uid: str | None = None,
    drop_slice: int | None = None,
    jitter_slice: int | None = None,
    jitter_mm: float = 0.3,
    values: np.ndarray | None = None,
    patient: Mapping[str, str] = PHI,
    seed: int = 0,
) -> WrittenSeries:
    """Write an explicit VR little endian CT Image Storage series (RescaleIntercept -1024, slope 1).

    ``shape`` is ``(columns, rows)`` = (n_i, n_j) and ``spacing`` is (along i, along j, between slices) in mm,
    both in lesionflow's (i, j, k) order. ``values`` (HU, shape ``shape + (n_slices,)``, within
    [-1024, 3071]) defaults to random integers from ``seed``. ``drop_slice`` leaves that slice's file out;
    ``jitter_slice`` moves that slice by ``jitter_mm`` along the slice normal.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_i, n_j = shape
    if values is None:
        values = rng.integers(-1024, 2000, size=(n_i, n_j, n_slices))
    values = np.asarray(values)
    if values.shape != (n_i, n_j, n_slices) or values.min() < -1024 or values.max() > 3071:
        raise ValueError(f"values must have shape {(n_i, n_j, n_slices)} and lie in [-1024, 3071]")
    array_hu = values.astype(np.int16)

    row, col, slice_dir = _directions(orientation)
    normal = np.cross(row, col)
    origin = np.array([-0.5 * n_i * spacing[0], -0.5 * n_j * spacing[1], -40.0 + 7.0 * seed])
    slice_vec = slice_dir * spacing[2]
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2] = row * spacing[0], col * spacing[1], slice_vec
    affine_lps[:3, 3] = origin

    series_uid = series_uid or _uid("series", seed, orientation, patient.get("PatientID", ""))
    study_uid = _uid("study", seed, patient.get("PatientID", ""))
    for_uid = _uid("frame", series_uid)
    sop_uids = tuple(_uid("sop", series_uid, k) for k in range(n_slices))
    order = rng.permutation(n_slices)  # file number / InstanceNumber of slice k: not the slice order

    files: list[Path] = []
    for k in range(n_slices):
        if k == drop_slice:
            continue
        position = origin + k * slice_vec + (jitter_mm * normal if k == jitter_slice else 0.0)
        ds = _slice_dataset(
            patient, array_hu[:, :, k], position, row, col, spacing, sop_uids[k], series_uid, study_uid, for_uid
        )
        ds.InstanceNumber = int(order[k]) + 1
        if k > 0:  # a reference to another instance: UIDs inside sequences must be remapped consistently
            ref = Dataset()
            ref.ReferencedSOPClassUID = CTImageStorage
            ref.ReferencedSOPInstanceUID = sop_uids[k - 1]
            ds.ReferencedImageSequence = [ref]
        path = folder / f"img{int(order[k]) * 7 % 101:03d}_{series_uid[-4:]}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return WrittenSeries(tuple(files), array_hu, series_uid, affine_lps, study_uid, for_uid, sop_uids)


def _slice_dataset(
    patient: Mapping[str, str],
    hu: np.ndarray,
    position: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    spacing: tuple[float, float, float],
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    for_uid: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = "CT"
    ds.PatientSex = "F"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 3
    for keyword, value in patient.items():
        if keyword not in _NON_KEYWORD_KEYS:
            setattr(ds, keyword, value)
    study_date = patient.get("StudyDate", "20240115")
    for keyword in _DATE_KEYWORDS:
        setattr(ds, keyword, study_date)
    ds.AcquisitionDateTime = study_date + "101512.250000"
    if "PrivateValue" in patient:
        block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", patient["PrivateValue"])

    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # DICOM order: (between rows, between columns)
    ds.SliceThickness = _ds(spacing[2])
    ds.SliceLocation = _ds(float(position @ np.cross(row, col)))
    ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # (rows, columns) = (j, i) in the file
    return ds
