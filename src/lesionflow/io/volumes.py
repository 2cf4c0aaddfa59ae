"""Volumes on disk <-> arrays with exact geometry.

Contract (used everywhere in lesionflow):

* ``Volume.array`` is indexed ``(i, j, k)`` or ``(i, j, k, c)``, i.e. the NIfTI voxel order, channels last.
* ``Volume.affine`` is the 4x4 voxel-index -> world (RAS+, millimetres) matrix. Files in LPS conventions
  (NRRD, MHA, DICOM read through SimpleITK) are converted on read, so one affine means one geometry.
* Nothing is resampled or reoriented on read; spacing and orientation are derived from the affine.

NIfTI is written deterministically: the gzip stream carries no time stamp or file name, so the same
array, affine and header always give the same bytes (and the same sha256).
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from isal import igzip
from isal.igzip_lib import IsalError
from nibabel.fileholders import FileHolder

from lesionflow.errors import CaseRejected
from lesionflow.files import write_bytes_atomic
from lesionflow.io.geometry import itk_geometry_to_affine
from lesionflow.io.layout import x_fastest

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


@dataclass(frozen=True)
class Volume:
    """A voxel array with its voxel->RAS+ affine (mm). See the module docstring for the axis contract."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = field(default=None, compare=False, repr=False)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def n_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine's linear part)."""
        norms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def orientation(self) -> str:
        """Three-letter axis code (e.g. ``RAS``, ``LPS``): where each voxel axis points in world space."""
        return "".join(nib.orientations.aff2axcodes(self.affine))


# A broken gzip stream, from Python's zlib or from ISA-L's inflate (_read_nifti)
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    zlib.error,
    cast(type[BaseException], IsalError),
    gzip.BadGzipFile,
)


def volume_suffix(path: str | Path) -> str | None:
    """The recognised volume suffix of ``path`` (case-insensitive), or None."""
    name = str(path).lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_volume_suffix(name: str) -> str:
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def read_volume(path: str | Path, case_id: str) -> Volume:
    """Read NIfTI, NRRD or MHA into a :class:`Volume`; unreadable input raises :class:`CaseRejected`."""
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise CaseRejected(case_id, "unsupported_format", f"{path.name} is not NIfTI, NRRD or MHA; convert it")
    from lesionflow.io.headers import check_itk_header, check_nifti_header

    try:
        # The header is checked against the file first: nothing is allocated from an unchecked claim.
        if suffix in NIFTI_SUFFIXES:
            check_nifti_header(path, case_id)
            return _read_nifti(path)
        check_itk_header(path, case_id)
        return _read_itk(path, case_id)
    except CaseRejected:
        raise
    except PermissionError:
        raise CaseRejected(
            case_id, "unreadable_file", f"{path.name} cannot be read (permission denied); fix its permissions"
        ) from None
    except _INFLATE_ERRORS as err:
        raise CaseRejected(
            case_id,
            "truncated_file",
            f"{path.name} is truncated or corrupt ({type(err).__name__}); re-export or re-download it",
        ) from None
    except Exception as err:  # noqa: BLE001 - any reader failure is a property of this file, not a bug
        if _gzip_truncated(path):
            raise CaseRejected(
                case_id,
                "truncated_file",
                f"{path.name} is truncated (the gzip stream ends early); re-export or re-download it",
            ) from None
        raise _unreadable(path, case_id, err) from None


def read_volume_shape(path: str | Path, case_id: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel shape ``(i, j, k[, c])`` and the affine of a volume file, reading no voxel of a NIfTI file.

    Other formats are read whole (:func:`read_volume`); rejections are the same as :func:`read_volume`'s."""
    path = Path(path)
    if volume_suffix(path) not in NIFTI_SUFFIXES:
        volume = read_volume(path, case_id)
        return tuple(int(n) for n in volume.array.shape), volume.affine
    from lesionflow.io.headers import check_nifti_header

    check_nifti_header(path, case_id)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"not a NIfTI image: {type(img).__name__}")
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - any reader failure is a property of this file, not a bug
        raise _unreadable(path, case_id, err) from None


def _unreadable(path: Path, case_id: str, err: Exception) -> CaseRejected:
    """The one-line rejection of a file its reader failed on, naming the reader's first line."""
    text = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return CaseRejected(case_id, "unreadable_file", f"{path.name} cannot be read ({text}); check the file")


def _gzip_truncated(path: Path) -> bool:
    """True when ``path`` is a gzip stream that ends before its end marker (only checked on a read failure)."""
    try:
        with path.open("rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return False
        with gzip.open(path, "rb") as gz:
            while gz.read(1 << 20):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return True
    except OSError:
        return False
    return False


def _read_nifti(path: Path) -> Volume:
    if str(path).lower().endswith(".gz"):
        # ISA-L's inflate reads a .nii.gz in half the time of Python's zlib (0.63 vs 1.26 s for a 512x512x300
        # int16 CT, docs/benchmarks.md); the voxels go straight from the stream into the array, as with nibabel's.
        with igzip.open(path, "rb") as stream:
            # sizeof_hdr, the header's first field, tells NIfTI-1 (348) from NIfTI-2 (540) in either byte order
            size = stream.read(4)
            stream.seek(0)
            kind = (
                nib.Nifti2Image
                if 540 in (int.from_bytes(size, "little"), int.from_bytes(size, "big"))
                else nib.Nifti1Image
            )
            holder = FileHolder(filename=str(path), fileobj=stream)
            return _nifti_volume(kind.from_file_map({"header": holder, "image": holder}), path)
    return _nifti_volume(nib.load(path), path)


def _nifti_volume(img: object, path: Path) -> Volume:
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"not a NIfTI image: {type(img).__name__}")
    # np.asanyarray applies scl_slope/scl_inter and keeps the stored dtype otherwise. nibabel flattens
    # empty data, so a zero-length axis keeps the header's shape for the caller to name the axis.
    empty = 0 in img.shape
    array = np.zeros(img.shape, dtype=img.get_data_dtype()) if empty else np.asanyarray(img.dataobj)
    header = img.header.copy() if isinstance(img, nib.Nifti1Image) else None
    # NIfTI stores x fastest: x_fastest keeps nibabel's array as it is (no transposed copy).
    return Volume(array=x_fastest(array), affine=np.asarray(img.affine, dtype=np.float64), header=header)


def _read_itk(path: Path, case_id: str) -> Volume:
    import SimpleITK as sitk  # heavy; only needed for NRRD/MHA/DICOM

    img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3:
        raise CaseRejected(case_id, "not_3d", f"{path.name} has {img.GetDimension()} dimensions, expected 3")
    array = sitk.GetArrayFromImage(img)  # (k, j, i[, c]) -> (i, j, k[, c])
    array = array.transpose((2, 1, 0, 3)) if array.ndim == 4 else array.transpose((2, 1, 0))
    affine = itk_geometry_to_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    return Volume(array=x_fastest(array), affine=affine)


def nifti_bytes(volume: Volume) -> bytes:
    """Deterministic gzip-compressed NIfTI-1 bytes for ``volume`` (header kept where there is one)."""
    header = volume.header.copy() if volume.header is not None else None
    img = nib.Nifti1Image(volume.array, volume.affine, header=header)
    # Both qform and sform carry the exact affine, coded as scanner coordinates unless the source said otherwise.
    sform_code = int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 1
    qform_code = int(header["qform_code"]) if header is not None and int(header["qform_code"]) > 0 else 1
    img.set_sform(volume.affine, code=sform_code)
    img.set_qform(volume.affine, code=qform_code)
    img.header.set_data_dtype(volume.array.dtype)
    img.header["scl_slope"] = np.nan  # the array holds final values; no rescaling on read
    img.header["scl_inter"] = np.nan
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=1
    ) as gz:  # nibabel's own default: fast, ~10% larger
        gz.write(raw)
    return buffer.getvalue()


def write_nifti(volume: Volume, path: str | Path) -> str:
    """Write ``volume`` as .nii.gz atomically (temp file + rename); return the sha256 of the bytes."""
    import hashlib

    data = nifti_bytes(volume)
    write_bytes_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()
