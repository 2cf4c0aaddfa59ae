"""DICOM series discovery and reading, with the geometry checks done explicitly (pydicom, not SimpleITK).

Contract:

* :func:`find_series` groups every DICOM *image* file under a folder by SeriesInstanceUID. Files without
  the ``DICM`` preamble (raw ACR-NEMA, junk) and objects without pixel data (RTSTRUCT, SR, DICOMDIR...) are
  ignored, as are files whose header cannot be parsed at all (they cannot be assigned to a series; if one
  belonged to a stack, :func:`read_series` reports the hole it leaves as ``missing_slice``).
* :func:`read_series` returns a :class:`~lesionflow.io.volumes.Volume` in lesionflow's contract: array
  ``(i, j, k)`` = (column, row, slice), affine voxel -> RAS+ mm. Values are the modality values
  (RescaleSlope/RescaleIntercept applied: HU for CT), int16 when exact, float32 otherwise.
* A series that cannot be turned into one regular 3D grid raises :class:`CaseRejected` with a stable code
  (``too_few_slices``, ``inconsistent_series``, ``duplicate_slice``, ``missing_slice``,
  ``uneven_slice_spacing``, ``missing_geometry``, ``unreadable_file``, ``unsupported_transfer_syntax``,
  ``unsupported_image``, ``huge_dims``) and a one-line message naming the values and the fix. Nothing is resampled.

Messages name files by base name only (never the folder, which often carries a patient name), and never
print identifying header values. The SeriesInstanceUID is only held in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian

from lesionflow.errors import CaseRejected
from lesionflow.io.geometry import itk_geometry_to_affine
from lesionflow.io.headers import MAX_VOXELS
from lesionflow.io.layout import x_fastest
from lesionflow.io.volumes import Volume

# (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data, as the 4 tag
# bytes appear in little- and big-endian files.
_PIXEL_TAG_BYTES = frozenset(
    {b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08"}
)
_GEOMETRY_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found on disk.

    ``series_uid`` is the original SeriesInstanceUID: identifying, never stored by lesionflow (derive a
    folder name with :func:`lesionflow.io.deid.pseudonymous_case_id`). ``files`` are sorted along the slice
    normal (by header; :func:`read_series` re-sorts and checks anyway).
    """

    series_uid: str
    files: tuple[Path, ...]
    modality: str


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` starts with the 128-byte preamble + ``DICM`` (Part 10 file). Reads 132 bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_header(path: Path) -> tuple[Dataset, bool] | None:
    """(header without pixel data, whether the file holds pixel data), or None if unparsable."""
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # junk files with a DICM preamble are expected while scanning
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            # pydicom rewinds to the start of the pixel data element when it stops there, so the next 4
            # bytes are its tag; at the end of a file without pixel data they are empty.
            has_pixels = fh.read(4) in _PIXEL_TAG_BYTES
    except Exception:  # noqa: BLE001 - a file we cannot parse is not part of any series we can read
        return None
    return ds, has_pixels


def _header_sort_key(ds: Dataset, path: Path) -> tuple[int, float, str]:
    """Position along the slice normal where the geometry parses; otherwise InstanceNumber, then name."""
    try:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        return (0, float(ipp @ np.cross(iop[:3], iop[3:])), path.name)
    except Exception:  # noqa: BLE001 - read_series reports the missing geometry properly
        try:
            return (1, float(ds.InstanceNumber), path.name)
        except Exception:  # noqa: BLE001
            return (2, 0.0, path.name)


def find_series(folder: Path) -> list[DicomSeries]:
    """Every DICOM image series under ``folder`` (recursive), sorted by SeriesInstanceUID."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if not is_dicom_file(path):
            continue
        header = _read_header(path)
        if header is None or not header[1]:
            continue
        uid = str(header[0].get("SeriesInstanceUID", "") or "").strip()
        if uid:
            groups.setdefault(uid, []).append((path, header[0]))
    found = []
    for uid in sorted(groups):
        members = sorted(groups[uid], key=lambda m: _header_sort_key(m[1], m[0]))
        modality = str(members[0][1].get("Modality", "") or "")
        found.append(DicomSeries(series_uid=uid, files=tuple(p for p, _ in members), modality=modality))
    return found


def _reject(case_id: str, code: str) -> Callable[[str], CaseRejected]:
    return lambda message: CaseRejected(case_id, code, message)


def _first_line(err: Exception) -> str:
    """The gist of a library error for a one-line message (first sentence, at most 120 characters)."""
    text = str(err).splitlines()[0].split(" - ")[0] if str(err) else type(err).__name__
    return text[:120]


def _read_file(path: Path, case_id: str) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - any parser failure is a property of this file
        raise _reject(case_id, "unreadable_file")(
            f"{path.name} cannot be parsed as DICOM ({_first_line(err)}); re-export the series"
        ) from None
    if not any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)):
        raise _reject(case_id, "unreadable_file")(
            f"{path.name} has no pixel data (truncated file?); re-export the series"
        )
    return ds


def _slice_geometry(ds: Dataset, path: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(IOP[6], IPP[3], PixelSpacing[2], Rows, Columns) as numbers, validated."""
    missing = [kw for kw in _GEOMETRY_TAGS if ds.get(kw) in (None, "", [])]
    if missing:
        raise _reject(case_id, "missing_geometry")(
            f"{path.name} lacks {', '.join(missing)}; this is not a volume slice, re-export with geometry"
        )
    try:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64).reshape(6)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64).reshape(3)
        pixel_spacing = np.asarray(ds.PixelSpacing, dtype=np.float64).reshape(2)
    except (TypeError, ValueError):
        raise _reject(case_id, "missing_geometry")(
            f"{path.name} has malformed ImageOrientationPatient/ImagePositionPatient/PixelSpacing; re-export it"
        ) from None
    row, col = iop[:3], iop[3:]
    unit = abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
    if not unit or abs(row @ col) > 1e-3 or not np.all(pixel_spacing > 0):
        raise _reject(case_id, "missing_geometry")(
            f"{path.name} has invalid geometry (ImageOrientationPatient {_fmt(iop, 4)} must be two orthogonal unit"
            f" vectors, PixelSpacing {_fmt(pixel_spacing)} positive); fix the export"
        )
    return iop, ipp, pixel_spacing, int(ds.Rows), int(ds.Columns)


def _fmt(values: Sequence[float] | np.ndarray, digits: int = 3) -> str:
    return "\\".join(f"{float(v):.{digits}f}" for v in np.ravel(values))


def _check_consistent(name: str, values: list[np.ndarray], rtol: float, case_id: str) -> None:
    """All slices share ``name`` (to ``rtol``); else inconsistent_series listing the distinct values."""
    groups: list[tuple[np.ndarray, int]] = []
    for value in values:
        for index, (ref, count) in enumerate(groups):
            if np.allclose(value, ref, rtol=rtol, atol=rtol):
                groups[index] = (ref, count + 1)
                break
        else:
            groups.append((value, 1))
    if len(groups) > 1:
        found = "; ".join(f"{_fmt(ref, 4)} in {count} slice(s)" for ref, count in groups)
        raise _reject(case_id, "inconsistent_series")(
            f"{name} differs between slices of one series ({found}); export each acquisition as its own series"
        )


def _check_spacing(proj: np.ndarray, tolerance: float, case_id: str) -> float:
    """Checks the sorted positions along the normal; returns the median gap (mm)."""
    gaps = np.diff(proj)
    median = float(np.median(gaps))
    duplicate = gaps < max(1e-4, 0.05 * median)  # "the same position", scale-aware for micro-CT
    if duplicate.any():
        at = int(np.argmax(duplicate))
        raise _reject(case_id, "duplicate_slice")(
            f"{int(duplicate.sum()) + 1} slices share a position, e.g. {proj[at]:.3f} mm along the slice normal;"
            " remove the duplicates or split the series"
        )
    ratio = gaps / median
    # A gap of >= 1.5 median gaps is a hole: round(ratio) - 1 slices are missing there.
    holes = np.flatnonzero(ratio >= 1.5)
    if holes.size:
        at = int(holes[0])
        n_missing = int(sum(max(1, round(float(r)) - 1) for r in ratio[holes]))
        raise _reject(case_id, "missing_slice")(
            f"gap of {gaps[at]:.3f} mm between slice positions {proj[at]:.3f} and {proj[at + 1]:.3f} mm is"
            f" {ratio[at]:.2f}x the median gap {median:.3f} mm: about {n_missing} slice(s) missing in"
            f" {holes.size} gap(s); re-export the complete series"
        )
    if np.any(np.abs(ratio - 1) > tolerance):
        raise _reject(case_id, "uneven_slice_spacing")(
            f"slice gaps range from {gaps.min():.3f} to {gaps.max():.3f} mm (median {median:.3f} mm, tolerance"
            f" {tolerance:.1%}); resample to a regular grid or raise spacing_tolerance"
        )
    return median


def _pixels(ds: Dataset, path: Path, case_id: str) -> np.ndarray:
    """Stored pixel values (rows, columns) of one slice; decoder problems become CaseRejected."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian) if meta is not None else ""))
    try:
        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise _reject(case_id, "unsupported_transfer_syntax")(
            f"{path.name} uses transfer syntax {syntax.name or syntax} which cannot be decoded here; decompress"
            " the series first (dcmdjpeg/dcmdrle from DCMTK or `gdcmconv --raw`)"
        )
    try:
        return np.asarray(ds.pixel_array)
    except Exception as err:  # noqa: BLE001 - corrupt or truncated pixel data
        raise _reject(case_id, "unreadable_file")(
            f"{path.name} pixel data cannot be decoded ({_first_line(err)}); re-export the series"
        ) from None


def read_series(series: DicomSeries, case_id: str, *, spacing_tolerance: float = 0.01) -> Volume:
    """Read ``series`` into a Volume (see the module docstring for the contract and rejection codes).

    Slices are sorted by ImagePositionPatient projected on n = row_dir x col_dir. The slice axis of the
    affine is (IPP_last - IPP_first) / (n - 1), so gantry-tilted and oblique stacks keep their true geometry.
    ``spacing_tolerance`` is the allowed relative deviation of each gap from the median gap.
    """
    datasets = [_read_file(path, case_id) for path in series.files]
    # Multi-frame (enhanced) objects are named as such before counting files: one enhanced CT file is not
    # "a series with one slice".
    for path, ds in zip(series.files, datasets, strict=True):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise _reject(case_id, "unsupported_image")(
                f"{path.name} is multi-frame or colour (NumberOfFrames {ds.get('NumberOfFrames', 1)},"
                f" SamplesPerPixel {ds.get('SamplesPerPixel', 1)}); convert to single-frame greyscale slices"
            )
        if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
            raise _reject(case_id, "unsupported_image")(
                f"{path.name} maps values with a Modality LUT Sequence; convert to RescaleSlope/Intercept"
            )
        if str(ds.get("SeriesInstanceUID", "")).strip() != series.series_uid:
            raise _reject(case_id, "inconsistent_series")(
                f"{path.name} belongs to another series; group files with find_series"
            )
    if len(series.files) < 2:
        raise _reject(case_id, "too_few_slices")(
            f"series has {len(series.files)} slice(s), a volume needs at least 2; export the full series"
        )
    geometry = [_slice_geometry(ds, path, case_id) for path, ds in zip(series.files, datasets, strict=True)]
    _check_consistent("ImageOrientationPatient", [g[0] for g in geometry], 1e-4, case_id)
    _check_consistent("PixelSpacing", [g[2] for g in geometry], 1e-4, case_id)
    _check_consistent("Rows\\Columns", [np.array(g[3:5], dtype=np.float64) for g in geometry], 0.0, case_id)

    iop, _, pixel_spacing, n_rows, n_cols = geometry[0]
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([g[1] for g in geometry])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    median_gap = _check_spacing(positions @ normal, spacing_tolerance, case_id)

    n = len(order)
    slice_vec = (positions[-1] - positions[0]) / (n - 1)
    # Every slice must sit on the straight line through the first and last: an in-plane drift would
    # otherwise be silently flattened into the regular grid.
    off_line = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(n), slice_vec)), axis=1).max()
    if off_line > spacing_tolerance * median_gap:
        raise _reject(case_id, "uneven_slice_spacing")(
            f"slice positions deviate up to {off_line:.3f} mm from a straight stack (median gap"
            f" {median_gap:.3f} mm); resample to a regular grid"
        )

    if n_rows * n_cols * n > MAX_VOXELS:  # checked before the output buffer is allocated
        raise _reject(case_id, "huge_dims")(
            f"series claims {n_cols}x{n_rows}x{n} = {n_cols * n_rows * n:.3g} voxels, more than {MAX_VOXELS} (2^31);"
            " the headers are corrupt or the series must be split before ingest"
        )
    slopes = [float(ds.get("RescaleSlope", 1) or 1) for ds in datasets]
    intercepts = [float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets]
    # float32 holds every integer below 2**24 exactly, so it is a lossless buffer for the int16 case too.
    out = np.empty((n_cols, n_rows, n), dtype=np.float32)
    for k, index in enumerate(order):
        path, ds = series.files[index], datasets[index]
        stored = _pixels(ds, path, case_id)
        if stored.shape != (n_rows, n_cols):
            raise _reject(case_id, "unreadable_file")(
                f"{path.name} pixel array is {stored.shape}, header says {(n_rows, n_cols)}; re-export it"
            )
        out[:, :, k] = (stored.astype(np.float64) * slopes[index] + intercepts[index]).T  # (j, i) -> (i, j)
    integral = all(float(v).is_integer() for v in (*slopes, *intercepts))
    if integral and out.size and _INT16.min <= out.min() and out.max() <= _INT16.max:
        array: np.ndarray = out.astype(np.int16)
    else:
        array = out

    direction = np.column_stack([row_dir, col_dir, slice_vec / np.linalg.norm(slice_vec)])
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), float(np.linalg.norm(slice_vec)))
    affine = itk_geometry_to_affine(spacing, tuple(positions[0]), tuple(direction.reshape(-1)))
    return Volume(array=x_fastest(array), affine=affine)
