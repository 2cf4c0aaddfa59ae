"""Read one discovered case into checked volumes: channels stacked, labels made integral, DICOM de-identified.

Structural problems (unreadable, wrong dimensionality, zero-length axes, channel mismatch, a sheared, singular
or non-finite affine, a voxel type NIfTI cannot store: :mod:`lesionflow.io.geometry`) raise
:class:`CaseRejected` here; content problems (NaN, label values, image/label mismatch) are measured into
the manifest and judged by the raw gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lesionflow.errors import CaseRejected
from lesionflow.io.geometry import check_affine, check_dtype
from lesionflow.io.sources import CaseSource, DatasetInfo
from lesionflow.io.volumes import Volume, read_volume, volume_suffix

_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}


@dataclass(frozen=True)
class LoadedCase:
    image: Volume  # (i, j, k) or (i, j, k, c)
    label: Volume | None  # (i, j, k), integer dtype when the values are whole numbers
    organ: Volume | None
    source_format: str
    modality: str
    dicom_header_json: str = ""  # de-identified header of the first slice (DICOM only)
    deid_report_json: str = ""


def _checked(volume: Volume, case_id: str, name: str, *, tilt: bool = False) -> Volume:
    """``volume`` once its affine is orthogonal and finite and its voxel type storable (int64 narrowed)."""
    check_affine(volume.affine, case_id, name, tilt=tilt)
    array = check_dtype(volume.array, case_id, name)
    return volume if array is volume.array else Volume(array, volume.affine, volume.header)


def _check_spatial(volume: Volume, case_id: str, what: str, name: str) -> None:
    if volume.array.ndim < 3:
        raise CaseRejected(
            case_id,
            "not_3d",
            f"{what} {name} is {volume.array.ndim}D with shape {tuple(volume.array.shape)}; expected a 3D volume, "
            "re-export it as one",
        )
    if 0 in volume.array.shape:
        raise CaseRejected(
            case_id,
            "zero_length_axis",
            f"{what} {name} has a zero-length axis, shape {tuple(volume.array.shape)}; re-export the volume",
        )


def _squeeze_trailing(volume: Volume) -> Volume:
    array = volume.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return volume if array is volume.array else Volume(array, volume.affine)


def _as_image(volumes: list[Volume], n_channels: int, case_id: str, names: list[str]) -> Volume:
    for v, name in zip(volumes, names, strict=True):
        _check_spatial(v, case_id, "image", name)
    if len(volumes) == 1:
        v = _squeeze_trailing(volumes[0])
        if v.array.ndim == 3 or (v.array.ndim == 4 and v.array.shape[3] == n_channels and n_channels > 1):
            return v
        raise CaseRejected(
            case_id,
            "not_3d",
            f"image {names[0]} has shape {tuple(v.array.shape)}; expected 3D"
            f"{f' or 4D with {n_channels} channels last' if n_channels > 1 else ''} "
            "(split time series, or declare the channels in dataset.json)",
        )
    first = volumes[0]
    for v, name in zip(volumes[1:], names[1:], strict=True):
        if v.array.shape != first.array.shape or not np.allclose(v.affine, first.affine, atol=1e-4):
            raise CaseRejected(
                case_id,
                "channel_mismatch",
                f"channel {name} has shape {tuple(v.array.shape)} "
                f"vs {tuple(first.array.shape)} or another affine; channels must share one grid",
            )
    if len({v.array.dtype for v in volumes}) > 1:
        stacked = np.stack([v.array.astype(np.float32) for v in volumes], axis=-1)
    else:
        stacked = np.stack([v.array for v in volumes], axis=-1)
    return Volume(stacked, first.affine)


def _as_label(volume: Volume, case_id: str, what: str, name: str) -> Volume:
    """Squeeze singleton trailing axes; whole-number float labels become the smallest fitting int type."""
    _check_spatial(volume, case_id, what, name)
    v = _squeeze_trailing(volume)
    if v.array.ndim != 3:
        raise CaseRejected(case_id, f"{what}_not_3d", f"{what} {name} has shape {tuple(v.array.shape)}; expected 3D")
    a = v.array
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(np.mod(a, 1) == 0):
            return Volume(a, v.affine)  # left as measured; the raw gate rejects fractional labels
        a = a.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return Volume(a.astype(dtype, copy=False), v.affine, header=None)
    return Volume(a, v.affine)


def read_case(
    case: CaseSource, info: DatasetInfo, *, deid_key: object = None, spacing_tolerance: float = 0.01
) -> LoadedCase:
    """Read ``case`` (paths from discovery) into checked volumes."""
    if case.dicom_series is not None:
        return _read_dicom(case, deid_key, spacing_tolerance)
    names = [p.name for p in case.images]
    cid = case.case_id
    volumes = [_checked(read_volume(p, cid), cid, p.name) for p in case.images]
    image = _as_image(volumes, len(info.modalities), cid, names)
    label = organ = None
    if case.label is not None:
        label = _as_label(_checked(read_volume(case.label, cid), cid, case.label.name), cid, "label", case.label.name)
        label = _checked(label, cid, case.label.name)  # a float label of huge whole numbers stays int64
    if case.organ is not None:
        organ = _as_label(_checked(read_volume(case.organ, cid), cid, case.organ.name), cid, "organ", case.organ.name)
        organ = _checked(organ, cid, case.organ.name)
    fmt = _FORMATS.get(volume_suffix(case.images[0]) or "", "unknown")
    return LoadedCase(image, label, organ, fmt, info.modalities[0])


def _read_dicom(case: CaseSource, deid_key: object, spacing_tolerance: float) -> LoadedCase:
    import pydicom

    from lesionflow.io import deid, dicom

    series = case.dicom_series
    image = dicom.read_series(series, case.case_id, spacing_tolerance=spacing_tolerance)
    _check_spatial(image, case.case_id, "image", "DICOM series")
    # read_series keeps a gantry tilt as a sheared slice axis; stored, the shear would be lost downstream.
    image = _checked(image, case.case_id, "DICOM series", tilt=True)
    header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    report = deid.deidentify(header, deid_key)  # type: ignore[arg-type]
    return LoadedCase(
        image,
        None,
        None,
        "dicom",
        series.modality or "unknown",
        dicom_header_json=deid.deidentified_header_json(header),
        deid_report_json=report.to_json(),
    )
