"""Broken (and a few tricky but valid) scans written byte by byte, for the ingest fuzz corpus.

Each :class:`Kind` writes one case into a loose source folder, named so that its case id is ``kind.name``
(DICOM series get a pseudonymous id from ingest; the corpus maps them back by SeriesInstanceUID). A kind
either expects a quarantine ``code`` and a ``value`` that its one-line message must quote, or is valid
(``code`` empty) and is checked for exact geometry and values after ingest.

NIfTI headers are packed with nibabel's header classes but written raw (``binaryblock`` + data), so that
nibabel's writer cannot repair what the test breaks; NRRD and MetaImage headers are plain text.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from tests.helpers.dicom_factory import write_ct_series

AFFINE = np.array([[1.0, 0, 0, -10.0], [0, 1.2, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
SHAPE = (6, 5, 4)


def volume(seed: int, shape: tuple[int, ...] = SHAPE, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(dtype)


def nifti_bytes(
    data: np.ndarray,
    *,
    version: int = 1,
    dims: tuple[int, ...] | None = None,
    affine: np.ndarray = AFFINE,
    sform: bool = True,
    **fields: object,
) -> bytes:
    """A single-file NIfTI with ``data`` (Fortran order) and a header whose fields are then overridden raw."""
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    if data.dtype.fields is None:
        header.set_data_dtype(data.dtype)
    else:
        header["datatype"] = 128  # RGB24
        header["bitpix"] = 24
    shape = dims if dims is not None else data.shape
    dim = np.ones(8, dtype=np.int64)
    dim[0] = len(shape)
    dim[1 : len(shape) + 1] = shape
    header["dim"] = dim
    header.set_qform(affine, code=1)
    if sform:
        header.set_sform(affine, code=1)
    else:
        header["sform_code"] = 0
    offset = 352 if version == 1 else 544
    header["vox_offset"] = offset
    for key, value in fields.items():
        header[key] = value
    block = header.binaryblock
    return block + b"\x00" * (offset - len(block)) + np.asfortranarray(data).tobytes(order="F")


def write(path: Path, blob: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob, mtime=0) if path.name.endswith(".gz") else blob)
    return path


def itk_data(data: np.ndarray) -> bytes:
    """Voxel bytes in ITK order (i fastest), from an (i, j, k) array."""
    return np.ascontiguousarray(data.transpose(2, 1, 0)).tobytes()


def nrrd(
    path: Path,
    data: np.ndarray | None,
    *,
    sizes: str = "6 5 4",
    directions: str = "(1,0,0) (0,1.2,0) (0,0,2)",
    kind: str = "float",
    dimension: int = 3,
    encoding: str = "raw",
    detached: bool = False,
    payload: bytes | None = None,
    magic: str = "NRRD0004",
    extra: tuple[str, ...] = (),
    space: bool = True,
) -> Path:
    """An NRRD (LPS space) with attached data, or a ``.nhdr`` + ``.raw`` pair when ``detached``."""
    raw = payload if payload is not None else (itk_data(data) if data is not None else b"")
    if encoding == "gzip" and payload is None:
        raw = gzip.compress(raw, mtime=0)
    geometry = ["space: left-posterior-superior", f"space directions: {directions}", "space origin: (3,-4,5)"]
    lines = [
        magic,
        f"type: {kind}",
        f"dimension: {dimension}",
        f"sizes: {sizes}",
        *(geometry if space else [f"spacings: {directions}"]),
        "endian: little",
        f"encoding: {encoding}",
        *extra,
    ]
    if detached:
        lines.append(f"data file: {path.stem}.raw")
        if data is not None or payload is not None:
            (path.parent / f"{path.stem}.raw").write_bytes(raw)
        path.write_bytes(("\n".join(lines) + "\n").encode())
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + raw)
    return path


def metaimage(
    path: Path,
    data: np.ndarray | None,
    *,
    dims: str = "6 5 4",
    spacing: str = "1 1.2 2",
    matrix: str = "1 0 0 0 1 0 0 0 1",
    element: str = "MET_FLOAT",
    ndims: int = 3,
    extra: str = "",
    payload: bytes | None = None,
    detached: bool = False,
) -> Path:
    """A MetaImage: ``.mha`` with LOCAL data, or ``.mhd`` + ``.raw`` when ``detached``."""
    raw = payload if payload is not None else (itk_data(data) if data is not None else b"")
    data_file = f"{path.stem}.raw" if detached else "LOCAL"
    offset = " ".join(["3", "-4", "5", "0", "0"][:ndims])
    header = (
        f"ObjectType = Image\nNDims = {ndims}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n{extra}"
        f"TransformMatrix = {matrix}\nOffset = {offset}\nElementSpacing = {spacing}\nDimSize = {dims}\n"
        f"ElementType = {element}\nElementDataFile = {data_file}\n"
    ).encode()
    if detached:
        path.write_bytes(header)
        if data is not None or payload is not None:
            (path.parent / data_file).write_bytes(raw)
    else:
        path.write_bytes(header + raw)
    return path


def itk_affine(spacing: tuple[float, ...], origin_lps: tuple[float, ...], direction: np.ndarray) -> np.ndarray:
    """voxel -> RAS+ affine the ITK header above means (LPS -> RAS flips x and y)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


ITK_AFFINE = itk_affine((1.0, 1.2, 2.0), (3.0, -4.0, 5.0), np.eye(3))


@dataclass(frozen=True)
class Kind:
    """One corpus entry: ``write(root)`` creates it; ``code`` empty means the case must be accepted."""

    name: str
    fmt: str  # nifti1 | nifti2 | nrrd | mha | dicom
    write: Callable[[Path], object]
    code: str = ""
    value: str = ""  # must appear in the quarantine message
    accept: dict[str, object] = field(default_factory=dict)  # expected array/affine/dtype when accepted


def _n(name: str, blob: Callable[[], bytes], code: str = "", value: str = "", suffix: str = ".nii", **accept: object):
    return Kind(name, "nifti1", lambda root: write(root / f"{name}{suffix}", blob()), code, value, dict(accept))


def _n2(name: str, blob: Callable[[], bytes], code: str, value: str, suffix: str = ".nii") -> Kind:
    return Kind(name, "nifti2", lambda root: write(root / f"{name}{suffix}", blob()), code, value)


def _pixdim(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.array([1.0, *spacing, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)


def _srows(matrix: list[list[float]]) -> dict[str, object]:
    return {"sform_code": 1, "srow_x": matrix[0], "srow_y": matrix[1], "srow_z": matrix[2]}


def huge_nifti2() -> bytes:
    """The issue's 612-byte NIfTI-2 whose header claims 100000^3 voxels."""
    blob = nifti_bytes(volume(0, (2, 2, 2)), version=2, dims=(100000, 100000, 100000))
    return (blob + b"\x01" * 612)[:612]


def _rgb() -> np.ndarray:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = 7
    return rgb


def nifti_kinds() -> list[Kind]:
    v = volume(1)
    good = nifti_bytes(v)
    return [
        _n(
            "n1_zero_spacing",
            lambda: nifti_bytes(v, sform=False, pixdim=_pixdim((1, 0, 2))),
            "invalid_spacing",
            "(1, 0, 2)",
        ),
        _n(
            "n1_negative_spacing",
            lambda: nifti_bytes(v, sform=False, pixdim=_pixdim((1, -1.2, 2))),
            "invalid_spacing",
            "(1, -1.2, 2)",
        ),
        _n(
            "n1_nan_spacing",
            lambda: nifti_bytes(v, sform=False, pixdim=_pixdim((1, np.nan, 2))),
            "invalid_spacing",
            "(1, nan, 2)",
        ),
        # the crash: an sform with a zero column reached set_qform ("Could not decompose affine")
        _n(
            "n1_sform_zero_column",
            lambda: nifti_bytes(v, **_srows([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]])),
            "invalid_spacing",
            "(1, 0, 2)",
        ),
        _n(
            "n1_singular_sform",
            lambda: nifti_bytes(v, **_srows([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0]])),
            "singular_affine",
            "parallel",
        ),
        _n(
            "n1_sheared_sform",
            lambda: nifti_bytes(v, **_srows([[1, 0.3, 0, 0], [0, 1.2, 0, 0], [0, 0, 2, 0]])),
            "sheared_affine",
            "0.2425",
        ),
        _n(
            "n1_nan_sform",
            lambda: nifti_bytes(v, **_srows([[1, np.nan, 0, 0], [0, 1.2, 0, 0], [0, 0, 2, 0]])),
            "nonfinite_affine",
            "nan",
        ),
        _n("n1_nan_quaternion", lambda: nifti_bytes(v, sform=False, quatern_b=np.nan), "nonfinite_affine", "nan"),
        _n("n1_dims_exceed_data", lambda: nifti_bytes(v, dims=(6, 5, 9)), "size_mismatch", "6x5x9"),
        _n("n1_data_exceeds_dims", lambda: nifti_bytes(v, dims=(6, 5, 2)), "size_mismatch", "6x5x2"),
        _n("n1_gz_dims_disagree", lambda: nifti_bytes(v, dims=(6, 5, 9)), "size_mismatch", "6x5x9", ".nii.gz"),
        _n("n1_truncated_in_header", lambda: good[:200], "truncated_file", "200 bytes"),
        _n("n1_truncated_in_data", lambda: good[: 352 + 200], "size_mismatch", "200 bytes"),
        Kind(
            "n1_gz_truncated_half",
            "nifti1",
            lambda root: (root / "n1_gz_truncated_half.nii.gz").write_bytes(
                gzip.compress(good, mtime=0)[: len(gzip.compress(good, mtime=0)) // 2]
            ),
            "truncated_file",
            "n1_gz_truncated_half.nii.gz",
        ),
        Kind(
            "n1_gz_no_trailer",
            "nifti1",
            lambda root: (root / "n1_gz_no_trailer.nii.gz").write_bytes(gzip.compress(good, mtime=0)[:-6]),
            "truncated_file",
            "n1_gz_no_trailer.nii.gz",
        ),
        _n("n1_wrong_magic", lambda: nifti_bytes(v, magic=b"xyz"), "unreadable_file", "b'xyz'"),
        _n("n1_wrong_sizeof", lambda: b"\x05\x00\x00\x00" + good[4:], "unreadable_file", "sizeof_hdr"),
        _n(
            "n1_huge_dims",
            lambda: nifti_bytes(volume(0, (2, 2, 2)), dims=(32767, 32767, 32767)),
            "huge_dims",
            "32767x32767x32767",
        ),
        _n("n1_2d", lambda: nifti_bytes(v[:, :, 0]), "not_3d", "2D"),
        _n("n1_5d", lambda: nifti_bytes(np.stack([v, v], axis=-1)[..., None, :]), "not_3d", "(6, 5, 4, 1, 2)"),
        _n("n1_complex", lambda: nifti_bytes(v.astype(np.complex64)), "unsupported_dtype", "complex"),
        _n("n1_rgb", lambda: nifti_bytes(_rgb()), "unsupported_dtype", "RGB"),
        _n("n1_unknown_datatype", lambda: nifti_bytes(v, datatype=9999), "unsupported_dtype", "9999"),
        _n(
            "n1_int64_beyond_int32",
            lambda: nifti_bytes(np.full(SHAPE, 2**40, np.int64)),
            "unsupported_dtype",
            str(2**40),
        ),
        _n2("n2_huge_dims", huge_nifti2, "huge_dims", "100000x100000x100000"),
        _n2("n2_huge_dims_gz", huge_nifti2, "huge_dims", "100000x100000x100000", ".nii.gz"),
        _n2(
            "n2_sheared_sform",
            lambda: nifti_bytes(v, version=2, **_srows([[1, 0, 0, 0], [0, 1.2, 0.5, 0], [0, 0, 2, 0]])),
            "sheared_affine",
            "0.2425",
        ),
        _n2(
            "n2_zero_spacing",
            lambda: nifti_bytes(v, version=2, sform=False, pixdim=_pixdim((0, 1.2, 2))),
            "invalid_spacing",
            "(0, 1.2, 2)",
        ),
        _n2("n2_truncated_in_data", lambda: nifti_bytes(v, version=2)[:700], "size_mismatch", "156 bytes"),
        # valid, if unusual: accepted with exact values and geometry
        _n("n1_5d_singleton", lambda: nifti_bytes(v[..., None, None]), array=v),
        _n(
            "n1_int64_image",
            lambda: nifti_bytes((v * 10).astype(np.int64)),
            array=(v * 10).astype(np.int32),
            dtype="int32",
        ),
        _n("n1_mixed_size", lambda: nifti_bytes(volume(5, (9, 7, 3))), array=volume(5, (9, 7, 3))),
        _n("n1_valid_gz", lambda: nifti_bytes(v), suffix=".nii.gz", array=v),
    ]


def label_kinds() -> list[Kind]:
    """Valid images with unusual labels (``<name>_seg.nii``): accepted, label values kept exactly."""
    lab64 = (volume(3) > 50).astype(np.int64) * 2
    neg = (volume(4) > 50).astype(np.int16) - 1

    def pair(name: str, label: np.ndarray) -> Callable[[Path], object]:
        def make(root: Path) -> None:
            write(root / f"{name}.nii", nifti_bytes(volume(2)))
            write(root / f"{name}_seg.nii", nifti_bytes(label))

        return make

    return [
        Kind("n1_lab_int64", "nifti1", pair("n1_lab_int64", lab64), accept={"label": lab64, "label_dtype": "uint8"}),
        Kind("n1_lab_negative", "nifti1", pair("n1_lab_negative", neg), accept={"label": neg, "label_dtype": "int16"}),
    ]


def itk_kinds() -> list[Kind]:
    v = volume(6)
    b = itk_data(v)
    eye = "1 0 0 0 1 0 0 0 1"
    return [
        Kind(
            "nrrd_zero_spacing",
            "nrrd",
            lambda r: nrrd(r / "nrrd_zero_spacing.nrrd", v, directions="(0,0,0) (0,1.2,0) (0,0,2)"),
            "invalid_spacing",
            "(0, 1.2, 2)",
        ),
        Kind(
            "nrrd_nan_spacing",
            "nrrd",
            lambda r: nrrd(r / "nrrd_nan_spacing.nrrd", v, directions="(nan,0,0) (0,1.2,0) (0,0,2)"),
            "invalid_spacing",
            "(nan, 1.2, 2)",
        ),
        Kind(
            "nrrd_sheared",
            "nrrd",
            lambda r: nrrd(r / "nrrd_sheared.nrrd", v, directions="(1,0,0) (0.3,1.2,0) (0,0,2)"),
            "sheared_affine",
            "0.2425",
        ),
        Kind(
            "nrrd_singular",
            "nrrd",
            lambda r: nrrd(r / "nrrd_singular.nrrd", v, directions="(1,0,0) (1.2,0,0) (0,0,2)"),
            "singular_affine",
            "parallel",
        ),
        Kind(
            "nrrd_huge_dims",
            "nrrd",
            lambda r: nrrd(r / "nrrd_huge_dims.nrrd", v, sizes="100000 100000 100000"),
            "huge_dims",
            "100000x100000x100000",
        ),
        Kind(
            "nrrd_truncated",
            "nrrd",
            lambda r: nrrd(r / "nrrd_truncated.nrrd", None, payload=b[:100]),
            "size_mismatch",
            "100 bytes",
        ),
        Kind(
            "nrrd_gzip_dims_disagree",
            "nrrd",
            lambda r: nrrd(r / "nrrd_gzip_dims_disagree.nrrd", v, encoding="gzip", sizes="600 500 400"),
            "size_mismatch",
            "600x500x400",
        ),
        Kind(
            "nrrd_wrong_magic",
            "nrrd",
            lambda r: nrrd(r / "nrrd_wrong_magic.nrrd", v, magic="NRDR0004"),
            "unreadable_file",
            "NRDR",
        ),
        Kind(
            "nrrd_detached_no_data",
            "nrrd",
            lambda r: nrrd(r / "nrrd_detached_no_data.nhdr", None, detached=True),
            "missing_data_file",
            "nrrd_detached_no_data.raw",
        ),
        Kind(
            "nrrd_complex",
            "nrrd",
            lambda r: nrrd(
                r / "nrrd_complex.nrrd",
                None,
                payload=itk_data(np.zeros(SHAPE, np.complex64)),
                sizes="2 6 5 4",
                dimension=4,
                directions="none (1,0,0) (0,1.2,0) (0,0,2)",
                extra=("kinds: complex domain domain domain",),
            ),
            "unsupported_dtype",
            "complex",
        ),
        Kind(
            "nrrd_2d",
            "nrrd",
            lambda r: nrrd(
                r / "nrrd_2d.nrrd", None, payload=b[:120], sizes="6 5", dimension=2, directions="1 1.2", space=False
            ),
            "not_3d",
            "2 dimensions",
        ),
        Kind(
            "nrrd_detached_ok",
            "nrrd",
            lambda r: nrrd(r / "nrrd_detached_ok.nhdr", v, detached=True),
            accept={"array": v, "affine": ITK_AFFINE},
        ),
        Kind(
            "nrrd_attached_ok",
            "nrrd",
            lambda r: nrrd(r / "nrrd_attached_ok.nrrd", v),
            accept={"array": v, "affine": ITK_AFFINE},
        ),
        Kind(
            "mha_zero_spacing",
            "mha",
            lambda r: metaimage(r / "mha_zero_spacing.mha", v, spacing="1 0 2"),
            "invalid_spacing",
            "(1, 0, 2)",
        ),
        Kind(
            "mha_negative_spacing",
            "mha",
            lambda r: metaimage(r / "mha_negative_spacing.mha", v, spacing="1 -1.2 2"),
            "invalid_spacing",
            "(1, -1.2, 2)",
        ),
        Kind(
            "mha_nan_spacing",
            "mha",
            lambda r: metaimage(r / "mha_nan_spacing.mha", v, spacing="1 nan 2"),
            "invalid_spacing",
            "(1, nan, 2)",
        ),
        Kind(
            "mha_sheared",
            "mha",
            lambda r: metaimage(r / "mha_sheared.mha", v, matrix="1 0 0 0.3 1 0 0 0 1"),
            "sheared_affine",
            "0.2873",
        ),
        Kind(
            "mha_huge_dims",
            "mha",
            lambda r: metaimage(r / "mha_huge_dims.mha", v, dims="100000 100000 100000"),
            "huge_dims",
            "100000x100000x100000",
        ),
        Kind(
            "mha_truncated",
            "mha",
            lambda r: metaimage(r / "mha_truncated.mha", None, payload=b[:300]),
            "size_mismatch",
            "300 bytes",
        ),
        Kind(
            "mha_5d",
            "mha",
            lambda r: metaimage(
                r / "mha_5d.mha",
                v,
                ndims=5,
                dims="6 5 4 1 1",
                spacing="1 1.2 2 1 1",
                matrix=" ".join(str(int(i == j)) for i in range(5) for j in range(5)),
            ),
            "not_3d",
            "5 dimensions",
        ),
        Kind(
            "mha_rgb",
            "mha",
            lambda r: metaimage(
                r / "mha_rgb.mha",
                None,
                element="MET_UCHAR",
                extra="ElementNumberOfChannels = 3\n",
                payload=bytes(6 * 5 * 4 * 3),
            ),
            "not_3d",
            "(6, 5, 4, 3)",
        ),
        Kind(
            "mhd_missing_data",
            "mha",
            lambda r: metaimage(r / "mhd_missing_data.mhd", None, detached=True),
            "missing_data_file",
            "mhd_missing_data.raw",
        ),
        Kind(
            "mhd_detached_ok",
            "mha",
            lambda r: metaimage(r / "mhd_detached_ok.mhd", v, detached=True),
            accept={"array": v, "affine": ITK_AFFINE},
        ),
        Kind(
            "mha_int64_ok",
            "mha",
            lambda r: metaimage(
                r / "mha_int64_ok.mha", None, element="MET_LONG_LONG", payload=itk_data((v * 10).astype(np.int64))
            ),
            accept={"array": (v * 10).astype(np.int32), "affine": ITK_AFFINE, "dtype": "int32"},
        ),
        Kind(
            "mha_eye_ok",
            "mha",
            lambda r: metaimage(r / "mha_eye_ok.mha", v, matrix=eye),
            accept={"array": v, "affine": ITK_AFFINE},
        ),
    ]


# -- DICOM series (each in its own sub-folder; ingest names them dcm_<pseudonym>) ----------------------------


def _rewrite(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _dcm_mixed_sizes(root: Path) -> str:
    written = write_ct_series(root, n_slices=4, seed=21)
    small = write_ct_series(root / "tmp", n_slices=4, shape=(12, 12), seed=21, series_uid=written.series_uid)
    shutil.move(small.files[0], written.files[1])  # one slice of another size in the same series
    shutil.rmtree(root / "tmp")
    return written.series_uid


def _dcm_multiframe(root: Path) -> str:
    """An enhanced (multi-frame) CT object: one file holding every slice."""
    written = write_ct_series(root, n_slices=3, seed=22)
    ds = pydicom.dcmread(written.files[0])
    ds.NumberOfFrames = 3
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    stack = np.stack([pydicom.dcmread(f).pixel_array for f in written.files])
    ds.PixelData = stack.astype(np.uint16).tobytes()
    for path in written.files:
        path.unlink()
    ds.save_as(root / "enhanced.dcm")
    return written.series_uid


def _dcm_huge(root: Path) -> str:
    written = write_ct_series(root, n_slices=3, seed=23)
    for path in written.files:
        _rewrite(path, Rows=65535, Columns=65535)
    return written.series_uid


def _dcm_truncated(root: Path) -> str:
    written = write_ct_series(root, n_slices=4, seed=24)
    written.files[2].write_bytes(written.files[2].read_bytes()[:-200])
    return written.series_uid


@dataclass(frozen=True)
class DicomKind:
    """A DICOM series kind: ``write(folder)`` returns its SeriesInstanceUID."""

    name: str
    write: Callable[[Path], str]
    code: str = ""
    value: str = ""


def dicom_kinds() -> list[DicomKind]:
    return [
        DicomKind(
            "dcm_missing_slice",
            lambda r: write_ct_series(r, n_slices=6, drop_slice=3, seed=11).series_uid,
            "missing_slice",
            "4.000 mm",
        ),
        DicomKind("dcm_duplicate_slice", lambda r: _dcm_duplicate(r), "duplicate_slice", "2 slices share"),
        DicomKind(
            "dcm_uneven",
            lambda r: write_ct_series(r, n_slices=6, jitter_slice=2, seed=13).series_uid,
            "uneven_slice_spacing",
            "1.700",
        ),
        DicomKind(
            "dcm_gantry_tilt",
            lambda r: write_ct_series(r, n_slices=5, orientation="tilted", seed=14).series_uid,
            "gantry_tilt",
            "tilt 15.00 deg",
        ),
        DicomKind("dcm_mixed_sizes", _dcm_mixed_sizes, "inconsistent_series", "Rows\\Columns"),
        DicomKind("dcm_multiframe", _dcm_multiframe, "unsupported_image", "NumberOfFrames 3"),
        DicomKind("dcm_huge_dims", _dcm_huge, "huge_dims", "65535x65535x3"),
        DicomKind("dcm_truncated", _dcm_truncated, "unreadable_file", ".dcm"),
        DicomKind("dcm_valid", lambda r: write_ct_series(r, n_slices=5, seed=15).series_uid),
    ]


def _dcm_duplicate(root: Path) -> str:
    written = write_ct_series(root, n_slices=5, seed=12)
    shutil.copy(written.files[2], root / "copy.dcm")
    return written.series_uid
