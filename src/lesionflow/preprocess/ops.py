"""Pure array operations of the preprocessing stage (no file I/O, no globals), in nnU-Net v2's order.

Conventions (see also :mod:`lesionflow.preprocess.geometry`, re-exported here):

* Raw input: ``Volume.array`` indexed ``(i, j, k)`` or ``(i, j, k, c)`` (channels last) with ``affine``
  voxel -> RAS+ mm (4x4 float64).
* Preprocessed output: images channel-first ``(c, x, y, z)`` float32 on the RAS grid
  (``aff2axcodes(final_affine) == ("R", "A", "S")``: increasing x/y/z goes towards Right/Anterior/Superior);
  labels ``(x, y, z)`` integer on the same grid.
* Resampling follows the cell-centred contract ``x_in = (u + 0.5) * t / s - 0.5`` (output spacing exactly
  ``t`` mm); images use cubic B-splines, labels linear interpolation of one-hot maps then argmax
  (nnU-Net ``resample_data_or_seg``; nnU-Net's "separate z" for anisotropic data is not reproduced).
* Data problems raise ``ValueError`` with a one-line message naming the value and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from lesionflow.io.layout import empty_x_fastest, on_disk, present_values
from lesionflow.preprocess.geometry import (
    CropBox,
    PreprocessRecord,
    _check_spacings,
    _matrix,
    crop,
    cropped_affine,
    from_ras,
    invert_to_raw,
    resampled_affine,
    sample_grid,
    sample_spline,
    spacing_of,
    spline_buffer,
    target_shape,
    to_ras,
)
from lesionflow.preprocess.holes import fill_holes
from lesionflow.preprocess.normstats import NormStats, mean_std, normalization_stats

__all__ = [
    "CropBox",
    "NormStats",
    "PreprocessRecord",
    "crop",
    "cropped_affine",
    "ct_normalize",
    "foreground_bbox",
    "from_ras",
    "invert_to_raw",
    "nonzero_mask",
    "preprocess_arrays",
    "resample_image",
    "resample_label",
    "resampled_affine",
    "spacing_of",
    "target_shape",
    "to_ras",
    "zscore",
]


def _spatial_label(label: np.ndarray | None, spatial: tuple[int, ...]) -> None:
    if label is not None and tuple(label.shape) != tuple(spatial):
        raise ValueError(f"label of shape {label.shape}: expected the image's spatial shape {tuple(spatial)}")


def foreground_bbox(image_cf: np.ndarray, label: np.ndarray | None) -> CropBox:
    """nnU-Net's nonzero crop: bbox of voxels non-zero in any channel of ``(c, x, y, z)``, united with label > 0.

    An all-zero image (and empty label) gives the full extent, so nothing is ever cropped to nothing.
    """
    if image_cf.ndim != 4 or min(image_cf.shape) == 0:
        raise ValueError(f"image of shape {image_cf.shape}: expected a non-empty channel-first (c, x, y, z)")
    spatial = image_cf.shape[1:]
    _spatial_label(label, spatial)
    fg = np.any(image_cf != 0, axis=0)
    if label is not None:
        fg |= label > 0
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(np.any(fg, axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(hit[0]) if hit.size else 0)
        hi.append(int(hit[-1]) + 1 if hit.size else int(spatial[axis]))
    return CropBox(lo=(lo[0], lo[1], lo[2]), hi=(hi[0], hi[1], hi[2]))


def nonzero_mask(image_cf: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask``: non-zero in any channel, holes filled, plus label > 0 (bool x,y,z)."""
    # On the reversed view: runs along memory for x-fastest volumes (io.layout); the 6-connected fill does not
    # depend on the axis order.
    mask = on_disk(fill_holes(np.any(on_disk(image_cf) != 0, axis=0)))
    if label is not None:
        mask |= label > 0
    return np.asarray(mask, dtype=bool)


def zscore(image_cf: np.ndarray, mask: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` (float32) with statistics over ``mask`` (bool x,y,z) or all voxels.

    With a mask, voxels outside it are set to 0, like nnU-Net's ``ZScoreNormalization`` with
    ``use_mask_for_norm`` (background stays exactly 0 instead of becoming ``-mean/std``). Statistics are
    accumulated in float64 (:func:`~lesionflow.preprocess.normstats.mean_std`). A constant channel (std 0) or an
    empty mask raises ``ValueError``. ``out`` (float32, the image's shape) receives the result, saving a copy.
    """
    if image_cf.ndim != 4:
        raise ValueError(f"image of shape {image_cf.shape}: expected channel-first (c, x, y, z)")
    _spatial_label(mask, image_cf.shape[1:])
    if mask is not None and not mask.any():
        raise ValueError("normalization mask is empty (0 voxels): expected at least one foreground voxel")
    out = empty_x_fastest(image_cf.shape, np.float32) if out is None else out
    for c, channel in enumerate(image_cf):
        mean, std = mean_std(channel[mask] if mask is not None else channel)
        if not (np.isfinite(mean) and np.isfinite(std)):
            raise ValueError(f"channel {c}: mean {mean}, std {std}; expected finite intensities (NaN/inf?)")
        if std == 0:
            raise ValueError(f"constant image: std is 0 in channel {c} (every voxel = {mean:g}); expected contrast")
        np.copyto(out[c], channel, casting="unsafe")  # as float32, in place: no temporaries the volume's size
        out[c] -= np.float32(mean)
        out[c] /= np.float32(std)
        if mask is not None:
            out[c][~mask] = 0.0
    return out


def ct_normalize(
    image_cf: np.ndarray, clip_lo: float, clip_hi: float, mean: float, std: float, out: np.ndarray | None = None
) -> np.ndarray:
    """nnU-Net ``CTNormalization``: clip to ``[clip_lo, clip_hi]`` (HU) then ``(x - mean) / std`` (float32).

    The four numbers are dataset-wide foreground statistics (0.5/99.5 percentiles, mean, std) from the
    fingerprint, not per case, so every CT case lands on the same scale.
    """
    if not (np.isfinite(std) and std > 0):
        raise ValueError(f"CT normalization std {std}: expected a positive dataset standard deviation")
    if not (np.isfinite(clip_lo) and np.isfinite(clip_hi) and clip_lo <= clip_hi and np.isfinite(mean)):
        raise ValueError(f"CT clip range [{clip_lo}, {clip_hi}] / mean {mean}: expected finite lo <= hi")
    if out is None:
        out = empty_x_fastest(image_cf.shape, np.float32)
    np.copyto(out, image_cf, casting="unsafe")  # as float32 into ``out`` (the caller's buffer): clip, scale in place
    np.clip(out, np.float32(clip_lo), np.float32(clip_hi), out=out)
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


def resample_image(
    image_cf: np.ndarray, spacing: Sequence[float], target: Sequence[float], order: int = 3
) -> np.ndarray:
    """Resample every channel of ``(c, x, y, z)`` from ``spacing`` to ``target`` mm (float32).

    Spline ``order`` 3 with prefiltering (nnU-Net's image default), borders extended. ``spacing ==
    target`` returns the input itself when it is already float32 (no copy: the per-worker memory peak
    matters more than aliasing, and no caller modifies the result in place).
    """
    if image_cf.ndim != 4:
        raise ValueError(f"image of shape {image_cf.shape}: expected channel-first (c, x, y, z)")
    s, t = _check_spacings(spacing, target)
    if np.array_equal(s, t):
        return image_cf.astype(np.float32, copy=False)
    shape = target_shape(image_cf.shape[1:], spacing, target)
    out = empty_x_fastest((image_cf.shape[0], *shape), np.float32)
    for c, channel in enumerate(image_cf):
        out[c] = sample_grid(channel.astype(np.float32, copy=False), t / s, shape, order)
    return out


def resample_label(
    label: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    mode: Literal["onehot_linear", "nearest"] = "onehot_linear",
) -> np.ndarray:
    """Resample an integer label ``(x, y, z)``; the dtype is kept.

    ``onehot_linear`` (nnU-Net): each label value present is a binary map, linearly interpolated; the
    output takes the value with the highest weight (ties -> the lowest value, since values are visited in
    ascending order and only a strictly higher weight wins). ``nearest``: order 0 (exact indexing).
    """
    if label.ndim != 3:
        raise ValueError(f"label of shape {label.shape}: expected (x, y, z)")
    s, t = _check_spacings(spacing, target)
    if np.array_equal(s, t):
        return label.copy(order="K")  # keeps the layout (io.layout): x fastest stays x fastest
    shape = target_shape(label.shape, spacing, target)
    if mode == "nearest":
        return sample_grid(label, t / s, shape, 0)
    if mode != "onehot_linear":
        raise ValueError(f"label resampling mode {mode!r}: expected 'onehot_linear' or 'nearest'")
    values = present_values(label)
    out = empty_x_fastest(shape, label.dtype)
    out.fill(values[0])
    if values.size == 1:
        return out
    best = sample_grid((label == values[0]).astype(np.float32), t / s, shape, 1)
    for value in values[1:]:
        weight = sample_grid((label == value).astype(np.float32), t / s, shape, 1)
        wins = weight > best
        out[wins] = value
        best = np.where(wins, weight, best)
    return out


def _use_mask(normalization: Mapping[str, Any], c: int, mask: np.ndarray) -> bool:
    """Per-case stand-in for nnU-Net's ``use_mask_for_norm``: explicit setting, else "zeros outside"."""
    setting = normalization.get("use_mask_for_norm")
    if setting is None:
        # nnU-Net decides per dataset (crop shrank the median case below 3/4); per case we use the mask
        # whenever the hole-filled nonzero mask leaves out part of the crop (zero background exists).
        return not bool(mask.all())
    return bool(setting[c] if isinstance(setting, Sequence) else setting)


def _schemes(normalization: Mapping[str, Any], n_channels: int) -> list[str]:
    schemes = list(normalization.get("schemes", []))
    if len(schemes) != n_channels:
        raise ValueError(f"{len(schemes)} normalization schemes {schemes}: expected one per channel ({n_channels})")
    return schemes


def _normalize_channel(
    image_cf: np.ndarray, c: int, scheme: str, mask: np.ndarray, normalization: Mapping[str, Any], out: np.ndarray
) -> np.ndarray | None:
    """Channel ``c`` of ``image_cf`` normalized into ``out`` (1, x, y, z); returns the mask it was normalized in."""
    channel = image_cf[c : c + 1]
    if scheme == "zscore":
        used = mask if _use_mask(normalization, c, mask) else None
        zscore(channel, used, out=out)
        return used
    if scheme == "ct":
        p = normalization["ct"][c]
        ct_normalize(channel, p["clip_lo"], p["clip_hi"], p["mean"], p["std"], out=out)
        return None  # dataset-wide scale: recorded over the whole crop, for the range check only
    raise ValueError(f"normalization scheme {scheme!r} for channel {c}: expected 'zscore' or 'ct'")


def _normalize(
    image_cf: np.ndarray, mask: np.ndarray, normalization: Mapping[str, Any]
) -> tuple[np.ndarray, tuple[NormStats, ...]]:
    """Normalized crop (float32) and, per channel, its statistics in the mask it was normalized in."""
    schemes = _schemes(normalization, image_cf.shape[0])
    out = empty_x_fastest(image_cf.shape, np.float32)
    masks = [
        _normalize_channel(image_cf, c, scheme, mask, normalization, out[c : c + 1]) for c, scheme in enumerate(schemes)
    ]
    # Measured here, before resampling, in the normalization's own mask: afterwards the mask is gone (cubic
    # resampling smears the zero background), so this is the only place the z-score can be checked exactly.
    return out, normalization_stats(out, masks, schemes)


def _normalize_resampled(
    image_cf: np.ndarray,
    mask: np.ndarray,
    normalization: Mapping[str, Any],
    spacing: Sequence[float],
    target: Sequence[float],
) -> tuple[np.ndarray, tuple[NormStats, ...]]:
    """``_normalize`` then ``resample_image(order=3)``, the same values bit for bit, with less memory.

    Each channel is normalized straight into the padded buffer its spline prefilter runs in
    (:func:`~lesionflow.preprocess.geometry.spline_buffer`), so the normalized crop never exists as a volume of its
    own, and a single channel's sampled volume is the result itself (no copy into an output array): two float32
    volumes fewer at the worker's memory peak.
    """
    schemes = _schemes(normalization, image_cf.shape[0])
    s, t = _check_spacings(spacing, target)
    shape = target_shape(image_cf.shape[1:], spacing, target)
    out = None if len(schemes) == 1 else empty_x_fastest((len(schemes), *shape), np.float32)
    stats: list[NormStats] = []
    for c, scheme in enumerate(schemes):
        padded, interior = spline_buffer(image_cf.shape[1:], np.float32)
        used = _normalize_channel(image_cf, c, scheme, mask, normalization, interior[None])
        stats.extend(normalization_stats(interior[None], [used], [scheme]))  # before sampling, as in _normalize
        del interior
        sampled = sample_spline(padded, t / s, shape, 3)
        del padded
        if out is None:
            out = sampled[None]
        else:
            out[c] = sampled
    assert out is not None  # at least one channel: _schemes matched the image's channel count
    return out, tuple(stats)


def preprocess_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    target_spacing: Sequence[float],
    normalization: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray | None, PreprocessRecord]:
    """One case, nnU-Net order: RAS -> channel-first -> nonzero crop -> normalize -> resample.

    ``image`` ``(i, j, k[, c])``, ``label`` ``(i, j, k)`` or None, ``affine`` voxel -> RAS+ mm,
    ``target_spacing`` mm per RAS axis (x, y, z), not per raw axis. ``normalization``: ``schemes``
    ("zscore" / "ct" per channel), ``ct`` (per channel ``{clip_lo, clip_hi, mean, std}``, read for "ct"
    channels; others may be None) and optional ``use_mask_for_norm`` (bool or per-channel list;
    default automatic, see ``_use_mask``). The z-score mask is the hole-filled nonzero mask of the crop
    united with label > 0 (nnU-Net's ``seg >= 0`` after marking background -1).
    Normalization comes before resampling because resampling would blur the zero background of the mask
    (nnU-Net's comment in ``DefaultPreprocessor``). Returns image ``(c, x, y, z)`` float32, label
    ``(x, y, z)`` uint8 or None, and the :class:`PreprocessRecord` for :func:`invert_to_raw`, which also
    carries the per-channel :class:`NormStats` measured on the normalized crop before resampling.
    """
    _spatial_label(label, image.shape[:3])
    img_ras, ras_affine, ornt = to_ras(image, affine)
    lab_ras = to_ras(label, affine)[0] if label is not None else None
    if lab_ras is not None:
        fractional = lab_ras.dtype.kind == "f" and not np.array_equal(lab_ras, np.round(lab_ras))
        if lab_ras.min() < 0 or lab_ras.max() > 255 or fractional:
            raise ValueError(f"label values in [{lab_ras.min()}, {lab_ras.max()}]: expected integers 0..255")
        lab_ras = lab_ras.astype(np.uint8, copy=False)  # a uint8 label (the common case) is not copied
    img_cf = img_ras[None] if img_ras.ndim == 3 else np.moveaxis(img_ras, -1, 0)
    spacing = spacing_of(ras_affine)

    box = foreground_bbox(img_cf, lab_ras)
    img_c = crop(img_cf, box)
    lab_c = crop(lab_ras, box) if lab_ras is not None else None
    crop_affine = cropped_affine(ras_affine, box)

    mask = nonzero_mask(img_c, lab_c)
    s, t = _check_spacings(spacing, target_spacing)
    if np.array_equal(s, t):
        out_img, norm_stats = _normalize(img_c, mask, normalization)  # stored as normalized (resample_image's no-op)
    else:
        out_img, norm_stats = _normalize_resampled(img_c, mask, normalization, spacing, target_spacing)
    del mask
    out_lab = resample_label(lab_c, spacing, target_spacing) if lab_c is not None else None

    record = PreprocessRecord(
        raw_shape=(int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
        raw_affine=_matrix(affine),
        ras_ornt=tuple((float(a), float(b)) for a, b in ornt),
        ras_shape=(int(img_ras.shape[0]), int(img_ras.shape[1]), int(img_ras.shape[2])),
        crop=box,
        cropped_shape=box.shape,
        spacing_before=spacing,
        spacing_after=(float(target_spacing[0]), float(target_spacing[1]), float(target_spacing[2])),
        final_shape=(int(out_img.shape[1]), int(out_img.shape[2]), int(out_img.shape[3])),
        final_affine=_matrix(resampled_affine(crop_affine, spacing, target_spacing)),
        normalization=norm_stats,
    )
    return out_img, out_lab, record
