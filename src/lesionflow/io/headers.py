"""Header checks before any voxel is read: dims x voxel type against the bytes the file can hold.

A header is a claim; a 612-byte file that claims 100000^3 voxels must be refused in one line, not read
until a ``MemoryError``. :func:`check_header` reads at most a header's worth of bytes (gzip streams are
decompressed only as far as needed, never into memory as a whole) and raises
:class:`~lesionflow.errors.CaseRejected`:

* ``huge_dims``: more than :data:`MAX_VOXELS` voxels.
* ``size_mismatch``: the data the header describes (dims x voxel type, after the header offset) is longer
  than the file holds (uncompressed), longer than a deflate stream of that size can hold
  (:data:`MAX_DEFLATE_RATIO`), or shorter than the file by at least one slice (voxels would be dropped).
  For ``.gz`` the gzip trailer's ISIZE is a hint only (it is mod 2**32 and names the last member): when it
  disagrees, the stream is counted in 1 MiB chunks up to the needed length plus one slice.
* ``invalid_dims``, ``invalid_header`` (vox_offset inside the header), ``invalid_spacing``,
  ``nonfinite_affine``, ``unsupported_dtype``, ``not_3d``,
  ``missing_data_file``, ``truncated_file``, ``unreadable_file`` (wrong magic / not a header).

NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``), NRRD (``.nrrd`` attached, ``.nhdr`` detached) and MetaImage
(``.mha`` attached, ``.mhd`` detached) are checked. Spacing values are checked raw, as the file states
them: nibabel turns a zero pixdim into 1 and SimpleITK a negative spacing into its absolute value, which
would invent geometry.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from lesionflow.errors import CaseRejected
from lesionflow.io.geometry import check_affine, check_dtype, itk_geometry_to_affine

# 2**31 voxels (8 GiB as float32) is beyond any CT/MR volume this pipeline handles on one host.
MAX_VOXELS = 2**31
# deflate cannot expand more than 1032:1 (a 258-byte match coded in 2 bits), so a .gz of C bytes holds at
# most ~1032*C bytes (plus a little slack for the headers of tiny streams).
MAX_DEFLATE_RATIO = 1032
_SLACK = 4096
_CHUNK = 1 << 20
_HEADER_CAP = 1 << 16  # an ITK text header longer than 64 KiB is not a header


def _reject(case_id: str, code: str, message: str) -> CaseRejected:
    return CaseRejected(case_id, code, message)


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _gzip_isize(path: Path) -> int:
    with path.open("rb") as fh:
        fh.seek(-4, 2)
        return int(struct.unpack("<I", fh.read(4))[0])


def _count_gzip(path: Path, cap: int) -> int:
    """Uncompressed length of a gzip file, counted without keeping it, stopping once past ``cap``."""
    total = 0
    with gzip.open(path, "rb") as gz:
        while total <= cap:
            chunk = gz.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
    return total


def _check_voxels(name: str, case_id: str, shape: tuple[int, ...], itemsize: int) -> int:
    if any(n < 0 for n in shape):
        raise _reject(case_id, "invalid_dims", f"{name} has negative dims {shape}; fix the header and re-export")
    n_voxels = math.prod(shape)
    if n_voxels > MAX_VOXELS:
        raise _reject(
            case_id,
            "huge_dims",
            f"{name} header claims dims {'x'.join(map(str, shape))} = {n_voxels:.3g} voxels, more than "
            f"{MAX_VOXELS} (2^31); the header is corrupt or the scan must be cropped/split before ingest",
        )
    return n_voxels * itemsize


def _check_length(
    name: str,
    case_id: str,
    shape: tuple[int, ...],
    needed: int,
    available: int,
    *,
    compressed: bool,
    exact: bool,
) -> None:
    """``available`` data bytes (uncompressed, or the compressed size when ``compressed`` and not exact)."""
    dims = "x".join(map(str, shape))
    if compressed and not exact:
        if needed > MAX_DEFLATE_RATIO * available + _SLACK:
            raise _reject(
                case_id,
                "size_mismatch",
                f"{name} header claims dims {dims} ({needed} bytes of voxels) but its {available} compressed "
                f"bytes can hold at most {MAX_DEFLATE_RATIO * available} bytes; the header is corrupt, re-export it",
            )
        return
    if available < needed:
        raise _reject(
            case_id,
            "size_mismatch",
            f"{name} header claims dims {dims} ({needed} bytes of voxels) but the file holds {available} bytes "
            "of data; the file is truncated or the dims are wrong, re-export it",
        )
    plane = needed // shape[-1] if shape and shape[-1] else needed
    if plane and available - needed >= plane:
        raise _reject(
            case_id,
            "size_mismatch",
            f"{name} holds {available} bytes of data but its header dims {dims} describe only {needed}; "
            "the dims are wrong (voxels would be dropped), fix the header and re-export",
        )


# -- NIfTI ------------------------------------------------------------------------------------------------


def _read_head(path: Path, n: int) -> bytes:
    if _is_gzip(path):
        with gzip.open(path, "rb") as gz:
            return gz.read(n)
    with path.open("rb") as fh:
        return fh.read(n)


def _nifti_header(path: Path, case_id: str) -> tuple[nib.Nifti1Header, int]:
    """(the raw header, unchecked and unfixed by nibabel, its size 348/540); wrong magic or truncation rejected."""
    name = path.name
    try:
        head = _read_head(path, 544)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise _reject(
            case_id, "truncated_file", f"{name} is truncated or corrupt (gzip stream); re-export or re-download it"
        ) from None
    sizes = {struct.unpack(f"{e}i", head[:4])[0] for e in "<>"} if len(head) >= 4 else set()
    header_class = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes else None
    need = 348 if header_class is nib.Nifti1Header else 540
    if header_class is None or len(head) < need:
        what = f"only {len(head)} bytes" if len(head) < 4 or header_class is not None else f"sizeof_hdr {head[:4]!r}"
        raise _reject(
            case_id,
            "truncated_file" if header_class is not None else "unreadable_file",
            f"{name} is not a NIfTI-1/2 file ({what} where a 348- or 540-byte header starts); re-export it",
        )
    header = header_class.from_fileobj(io.BytesIO(head[:need]), check=False)
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        raise _reject(
            case_id,
            "unreadable_file",
            f"{name} has NIfTI magic {magic!r}, expected b'n+1' or b'n+2' (single-file NIfTI); re-export it as .nii",
        )
    return header, need


def _nifti_data_fits(path: Path, case_id: str, shape: tuple[int, ...], needed: int, offset: int) -> None:
    """The voxel bytes the header describes against the file (a .gz: the deflate bound, then ISIZE)."""
    name = path.name
    total = offset + needed
    if not _is_gzip(path):
        _check_length(name, case_id, shape, needed, path.stat().st_size - offset, compressed=False, exact=True)
        return
    _check_length(name, case_id, shape, needed, path.stat().st_size, compressed=True, exact=False)
    if _gzip_isize(path) == total % 2**32:
        return
    try:  # ISIZE is a hint only (mod 2**32, last member): count the stream to be sure
        length = _count_gzip(path, total + needed // max(1, shape[-1]))
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise _reject(
            case_id, "truncated_file", f"{name} is truncated (the gzip stream ends early); re-export it"
        ) from None
    _check_length(name, case_id, shape, needed, length - offset, compressed=False, exact=True)


def check_nifti_header(path: Path, case_id: str) -> None:
    """Check a NIfTI-1/2 header against the file before nibabel allocates anything (see module docstring)."""
    name = path.name
    header, size = _nifti_header(path, case_id)
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise _reject(case_id, "invalid_dims", f"{name} has dim[0] = {dim[0]}, expected 1..7; fix the header")
    shape = tuple(dim[1 : dim[0] + 1])
    try:
        dtype = header.get_data_dtype()
    except Exception:  # noqa: BLE001 - an unknown datatype code is a property of this file
        raise _reject(
            case_id,
            "unsupported_dtype",
            f"{name} has NIfTI datatype code {int(header['datatype'])}, not a known type; re-export as int or float32",
        ) from None
    check_dtype(np.empty(0, dtype=dtype), case_id, name)
    needed = _check_voxels(name, case_id, shape, dtype.itemsize)
    offset = float(header["vox_offset"])
    if not math.isfinite(offset) or offset < size:
        raise _reject(
            case_id,
            "invalid_header",
            f"{name} has vox_offset {offset:g}, inside its {size}-byte header (nibabel would read the header as "
            f"voxels); set vox_offset to at least {size + 4} and re-export",
        )
    if 0 not in shape:  # a zero-length axis is named by the reader (zero_length_axis)
        _nifti_data_fits(path, case_id, shape, needed, int(offset))
    if int(header["sform_code"]) == 0 and len(shape) >= 3:
        # nibabel builds the affine from the qform (or pixdim alone) and silently turns 0 into 1 and -s into s.
        pixdim = [float(v) for v in header["pixdim"][1:4]]
        if not all(math.isfinite(v) and v > 0 for v in pixdim):
            raise _reject(
                case_id,
                "invalid_spacing",
                f"{name} has pixdim (voxel spacing) {_show(pixdim)} mm with no sform; spacing must be finite and "
                "positive, set the true spacing in the header and re-export",
            )


# -- NRRD and MetaImage ------------------------------------------------------------------------------------


def _text_header(path: Path, end: re.Pattern[bytes]) -> tuple[dict[str, str], int]:
    """(fields, header length in bytes) of a text header ending at ``end`` (or at end of file)."""
    with path.open("rb") as fh:
        blob = fh.read(_HEADER_CAP)
    match = end.search(blob)
    length = match.end() if match else len(blob)
    fields: dict[str, str] = {}
    for line in blob[:length].decode("latin-1").splitlines():
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":=" if ":=" in line else ":" if ":" in line else "=")
        if not sep:
            key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields, length


def _floats(text: str) -> list[float]:
    out = []
    for token in re.split(r"[\s,()]+", text.strip()):
        if token and token.lower() != "none":
            try:
                out.append(float(token))
            except ValueError:
                out.append(float("nan"))
    return out


def _data_file(path: Path, case_id: str, reference: str) -> Path | None:
    """The single detached data file a header names (None for LOCAL or multi-file lists)."""
    if reference.upper() in ("", "LOCAL") or reference.upper().startswith("LIST") or "%" in reference:
        return None
    data = path.parent / reference.split()[0]
    if not data.is_file():
        raise _reject(
            case_id,
            "missing_data_file",
            f"{path.name} is a detached header whose data file {data.name!r} does not exist; put the data file "
            "next to the header (or ingest an attached .nrrd/.mha)",
        )
    return data


def _show(values: list[float]) -> str:
    """``(1, -1.2, 2)``: float32 header values shown as written, not as 1.2000000476837158."""
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _spacing_problem(name: str, case_id: str, values: list[float], what: str) -> None:
    if any(not math.isfinite(v) for v in values) or any(v <= 0 for v in values):
        raise _reject(
            case_id,
            "invalid_spacing",
            f"{name} has {what} {_show(values)}; spacing must be finite and positive, set the true spacing and "
            "re-export",
        )


def check_itk_header(path: Path, case_id: str) -> None:
    """Check an NRRD or MetaImage header (and its data file) before SimpleITK allocates anything."""
    import SimpleITK as sitk

    name = path.name
    is_nrrd = path.name.lower().endswith((".nrrd", ".nhdr"))
    with path.open("rb") as fh:
        magic = fh.read(8)
    if is_nrrd and not magic.startswith(b"NRRD"):
        raise _reject(case_id, "unreadable_file", f"{name} does not start with 'NRRD' (found {magic[:4]!r}); re-export")
    end = re.compile(rb"\r?\n\r?\n") if is_nrrd else re.compile(rb"ElementDataFile\s*=[^\n]*\n")
    fields, header_length = _text_header(path, end)
    if not is_nrrd and "elementdatafile" not in fields:
        raise _reject(case_id, "unreadable_file", f"{name} has no MetaImage header (no ElementDataFile); re-export")
    reference = fields.get("data file", fields.get("datafile", "")) if is_nrrd else fields["elementdatafile"]
    data = _data_file(path, case_id, reference)
    if is_nrrd:
        directions = fields.get("space directions", "")
        vectors = re.findall(r"\(([^)]*)\)", directions)
        lengths = [math.sqrt(sum(v * v for v in _floats(vec))) for vec in vectors]
        if vectors:
            _spacing_problem(name, case_id, lengths, "space direction lengths (spacing)")
        if "spacings" in fields:
            _spacing_problem(name, case_id, [v for v in _floats(fields["spacings"])], "spacings")
        encoding = fields.get("encoding", "raw").lower()
        compressed = encoding in ("gzip", "gz", "bzip2", "bz2")
    else:
        spacing = fields.get("elementspacing", fields.get("elementsize", ""))
        if spacing:
            _spacing_problem(name, case_id, _floats(spacing), "ElementSpacing")
        compressed = fields.get("compresseddata", "false").lower() == "true"
        encoding = "gzip" if compressed else "raw"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        lines = [ln for ln in str(err).splitlines() if "ERROR" in ln or "trouble" in ln]
        detail = re.sub(r"\(0x[0-9a-f]+\)", "", lines[-1] if lines else "header not understood")  # no addresses
        detail = detail.split("ERROR: ", 1)[-1][:200]
        raise _reject(case_id, "unreadable_file", f"{name} header cannot be read ({detail}); re-export it") from None
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetDimension() != 3:
        raise _reject(
            case_id,
            "not_3d",
            f"{name} has {reader.GetDimension()} dimensions {size}, expected a 3D volume; split or re-export it",
        )
    # A sheared or singular direction matrix is named now: SimpleITK would refuse a singular one with a
    # C++ message, and accept a sheared one.
    check_affine(itk_geometry_to_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()), case_id, name)
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel_type.lower():
        raise _reject(
            case_id,
            "unsupported_dtype",
            f"{name} has voxel type {pixel_type}; convert it to a real-valued integer or float32 volume",
        )
    # bytes per voxel (all components): the array of a one-voxel image of the same pixel type
    components = (reader.GetNumberOfComponents(),) if "vector" in pixel_type.lower() else ()
    itemsize = sitk.GetArrayFromImage(sitk.Image([1, 1, 1], reader.GetPixelID(), *components)).nbytes
    needed = _check_voxels(name, case_id, size, itemsize)
    available = data.stat().st_size if data is not None else path.stat().st_size - header_length
    if reference.upper().startswith("LIST") or "%" in reference or 0 in size:
        return  # multi-file data: SimpleITK checks each file itself
    if encoding in ("raw",):
        _check_length(name, case_id, size, needed, available, compressed=False, exact=True)
    elif encoding in ("gzip", "gz"):
        _check_length(name, case_id, size, needed, available, compressed=True, exact=False)
    elif encoding in ("ascii", "text", "txt") and available < needed // itemsize:
        raise _reject(
            case_id,
            "size_mismatch",
            f"{name} header claims {needed // itemsize} text values but holds {available} bytes; re-export it",
        )
