"""Checks that a volume's geometry and voxel type can be stored without losing or inventing anything.

Contract: every volume ingest stores passes :func:`check_affine` and :func:`check_dtype` first; a failure
raises :class:`~lesionflow.errors.CaseRejected` with a stable code and one line naming the value and the fix:

* ``nonfinite_affine``: a NaN/Inf entry in the 4x4 voxel -> RAS+ (mm) affine.
* ``invalid_spacing``: a voxel axis of zero, negative or non-finite length (header pixdim / spacing values
  are checked where they are read, :mod:`lesionflow.io.headers`; here the affine's column norms).
* ``singular_affine``: two voxel axes point the same way (the grid has no volume).
* ``sheared_affine``: voxel axes not orthogonal beyond :data:`SHEAR_TOLERANCE` (cosine of the angle between
  two axes). Downstream reorientation to RAS uses flips and permutations only, so a shear would be silently
  lost; a gantry-tilted DICOM stack is the common source (code ``gantry_tilt`` there).
* ``unsupported_dtype``: complex, RGB/structured, bool, float16/longdouble or 64-bit integers outside int32.

Nothing is resampled here: a sheared scan must be resampled by the user (the fix names how).
"""

from __future__ import annotations

import numpy as np

from lesionflow.errors import CaseRejected

# |cos(angle)| between two voxel axes above which the grid counts as sheared. Float32 sforms and 8-digit
# DICOM direction cosines leave ~1e-7; 1e-4 (0.006 deg) displaces the far corner of a 512 mm field of view
# by 0.05 mm, far below a voxel, so anything larger is a real shear, not rounding.
SHEAR_TOLERANCE = 1e-4
# Axes closer to parallel than this are collinear: the affine is singular, not merely sheared.
_COLLINEAR = 1.0 - 1e-6
_INT32 = np.iinfo(np.int32)


def _fmt(matrix: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(matrix)) + "]"


def off_orthogonality(affine: np.ndarray) -> tuple[float, int, int]:
    """(max |cos| between two voxel axes of the affine's 3x3 part, axis a, axis b); axes must be non-zero."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = linear / np.linalg.norm(linear, axis=0)
    gram = np.abs(unit.T @ unit)
    np.fill_diagonal(gram, 0.0)
    a, b = np.unravel_index(int(np.argmax(gram)), gram.shape)
    return float(gram[a, b]), int(min(a, b)), int(max(a, b))


def check_affine(affine: np.ndarray, case_id: str, name: str, *, tilt: bool = False) -> None:
    """Raise CaseRejected unless ``affine`` is a finite, non-singular, orthogonal voxel -> world map.

    ``name`` is how the message names the file (base name or ``DICOM series``); ``tilt`` names a shear
    ``gantry_tilt`` (DICOM stacks, where the slice vector leans along the column direction)."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise CaseRejected(
            case_id,
            "nonfinite_affine",
            f"{name} has a non-finite voxel-to-world affine {_fmt(matrix[:3])}; fix the header's sform/qform "
            "(or spacing/direction) and re-export",
        )
    norms = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(norms <= 0):
        axis = int(np.argmin(norms))
        raise CaseRejected(
            case_id,
            "invalid_spacing",
            f"{name} has voxel spacing ({', '.join(f'{n:.6g}' for n in norms)}) mm: axis {axis} has zero length; "
            "set the true spacing in the header and re-export",
        )
    cosine, a, b = off_orthogonality(matrix)
    if cosine >= _COLLINEAR or abs(np.linalg.det(matrix[:3, :3] / norms)) < 1e-6:
        raise CaseRejected(
            case_id,
            "singular_affine",
            f"{name} has a singular voxel-to-world affine {_fmt(matrix[:3, :3])} (voxel axes {a} and {b} are "
            "parallel); fix the header's sform/qform or direction and re-export",
        )
    if cosine > SHEAR_TOLERANCE:
        angle = float(np.degrees(np.arccos(min(cosine, 1.0))))
        if tilt:
            raise CaseRejected(
                case_id,
                "gantry_tilt",
                f"{name} is a gantry-tilted stack: tilt {90 - angle:.2f} deg (voxel axes {a} and {b} meet at "
                f"{angle:.2f} deg, off-orthogonality {cosine:.4g} > {SHEAR_TOLERANCE:g}); correct the tilt first "
                "(e.g. dcm2niix's gantry-tilt correction) and ingest the result",
            )
        raise CaseRejected(
            case_id,
            "sheared_affine",
            f"{name} has a sheared affine: voxel axes {a} and {b} meet at {angle:.2f} deg (off-orthogonality "
            f"{cosine:.4g} > {SHEAR_TOLERANCE:g}); resample it to an orthogonal grid (e.g. nibabel "
            "resample_from_to or ITK Resample) and ingest the result",
        )


def check_dtype(array: np.ndarray, case_id: str, name: str) -> np.ndarray:
    """``array`` in a voxel type NIfTI stores losslessly; 64-bit integers are narrowed to int32 when exact.

    Complex, RGB/structured, bool, float16 and long double voxels, and 64-bit integers outside int32, raise
    CaseRejected ``unsupported_dtype``."""
    dtype = array.dtype
    if dtype.kind in "iu" and dtype.itemsize == 8:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if _INT32.min <= lo and hi <= _INT32.max:
            return array.astype(np.int32)  # every value kept exactly
        raise CaseRejected(
            case_id,
            "unsupported_dtype",
            f"{name} holds {dtype} values in [{lo}, {hi}], beyond int32; rescale or relabel to fit int32",
        )
    if (dtype.kind in "iu" and dtype.itemsize <= 4) or (dtype.kind == "f" and dtype.itemsize in (4, 8)):
        return array
    raise CaseRejected(
        case_id,
        "unsupported_dtype",
        f"{name} has voxel type {dtype.str if dtype.fields is None else 'RGB/structured ' + str(dtype.names)} "
        f"({'complex' if dtype.kind == 'c' else dtype.name}); convert it to a real-valued integer or float32 "
        "volume (one channel per file)",
    )


# LPS (ITK, DICOM) <-> RAS (NIfTI): flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_geometry_to_affine(
    spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]
) -> np.ndarray:
    """voxel (i, j, k) -> RAS+ mm affine from ITK's LPS spacing/origin/direction (row-major 3x3)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return _LPS_TO_RAS @ lps
