"""Exact grid geometry of preprocessing: RAS reorientation, cropping, cell-centred resampling, and the inverse.

Conventions (shared with :mod:`lesionflow.preprocess.ops`):

* Raw arrays come from :class:`lesionflow.io.volumes.Volume`: indexed ``(i, j, k)`` or ``(i, j, k, c)``
  (channels last); ``affine`` (4x4 float64) maps voxel ``(i, j, k)`` -> world RAS+ millimetres.
* "RAS grid": after :func:`to_ras`, ``nib.orientations.aff2axcodes(affine) == ("R", "A", "S")``, i.e.
  increasing x / y / z index moves (closest to) towards world +x = Right, +y = Anterior, +z = Superior.
  Reorientation is by flips and axis permutations only, so it is exact; an oblique affine stays oblique.
* Resampling contract (one definition used by arrays *and* affines): for spacing ``s`` and target ``t``
  along an axis, output voxel centre ``u`` (0-based) samples the input coordinate
  ``x_in = (u + 0.5) * t / s - 0.5``. The grids are cell-centred (the first/last cell edges coincide when
  ``n * s / t`` is integral), so the field of view is kept up to the rounding of :func:`target_shape`
  and the output spacing is exactly ``t``. Outside the input, values are extended (``mode="nearest"``).
* :class:`CropBox` is half-open ``[lo, hi)`` in voxel indices of the grid it was computed on.

Data problems (empty shapes, degenerate affines, non-positive spacings) raise one-line ``ValueError``
messages with the offending value; the preprocessing stage turns them into quarantine reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from lesionflow.io.layout import empty_x_fastest, on_disk, x_fastest
from lesionflow.preprocess.normstats import NormStats

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
_RAS_ORNT = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class CropBox:
    """Half-open voxel box ``[lo, hi)`` per spatial axis (x, y, z) of the RAS grid before cropping."""

    lo: Shape3
    hi: Shape3

    @property
    def shape(self) -> Shape3:
        return (self.hi[0] - self.lo[0], self.hi[1] - self.lo[1], self.hi[2] - self.lo[2])

    def slices(self) -> tuple[slice, slice, slice]:
        return (slice(self.lo[0], self.hi[0]), slice(self.lo[1], self.hi[1]), slice(self.lo[2], self.hi[2]))


def _matrix(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(a, dtype=np.float64))


def _ints(v: Sequence[Any]) -> Shape3:
    return (int(v[0]), int(v[1]), int(v[2]))


def _floats(v: Sequence[Any]) -> Spacing3:
    return (float(v[0]), float(v[1]), float(v[2]))


@dataclass(frozen=True)
class PreprocessRecord:
    """Everything needed to map a prediction on the preprocessed grid back to the raw grid.

    Shapes are spatial voxel counts, spacings in mm, affines 4x4 voxel -> RAS+ mm. ``ras_ornt`` is the
    nibabel orientation transform raw -> RAS grid. JSON-able through :meth:`to_dict` / :meth:`from_dict`
    (floats survive a JSON round trip exactly, so ``from_dict(json.loads(json.dumps(r.to_dict()))) == r``).
    ``normalization`` (one :class:`NormStats` per channel, measured before resampling) is what the processed
    gate checks; records written before it existed load with ``()`` (the inverse mapping does not need it).
    """

    raw_shape: Shape3
    raw_affine: tuple[tuple[float, ...], ...]
    ras_ornt: tuple[tuple[float, float], ...]
    ras_shape: Shape3
    crop: CropBox
    cropped_shape: Shape3
    spacing_before: Spacing3
    spacing_after: Spacing3
    final_shape: Shape3
    final_affine: tuple[tuple[float, ...], ...]
    normalization: tuple[NormStats, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw_shape": list(self.raw_shape),
            "raw_affine": [list(r) for r in self.raw_affine],
            "ras_ornt": [list(r) for r in self.ras_ornt],
            "ras_shape": list(self.ras_shape),
            "crop": {"lo": list(self.crop.lo), "hi": list(self.crop.hi)},
            "cropped_shape": list(self.cropped_shape),
            "spacing_before": list(self.spacing_before),
            "spacing_after": list(self.spacing_after),
            "final_shape": list(self.final_shape),
            "final_affine": [list(r) for r in self.final_affine],
            "normalization": [n.to_dict() for n in self.normalization],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessRecord:
        return cls(
            raw_shape=_ints(d["raw_shape"]),
            raw_affine=_matrix(np.asarray(d["raw_affine"])),
            ras_ornt=tuple((float(a), float(b)) for a, b in d["ras_ornt"]),
            ras_shape=_ints(d["ras_shape"]),
            crop=CropBox(lo=_ints(d["crop"]["lo"]), hi=_ints(d["crop"]["hi"])),
            cropped_shape=_ints(d["cropped_shape"]),
            spacing_before=_floats(d["spacing_before"]),
            spacing_after=_floats(d["spacing_after"]),
            final_shape=_ints(d["final_shape"]),
            final_affine=_matrix(np.asarray(d["final_affine"])),
            normalization=tuple(NormStats.from_dict(n) for n in d.get("normalization", [])),
        )


def spacing_of(affine: np.ndarray) -> Spacing3:
    """Voxel size in mm along the three array axes: column norms of the affine's linear part."""
    norms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return _floats(norms)


def _check_spacings(spacing: Sequence[float], target: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(spacing, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if s.shape != (3,) or t.shape != (3,) or not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise ValueError(f"spacing {tuple(spacing)} / target {tuple(target)}: expected 3 finite values each")
    if np.any(s <= 0) or np.any(t <= 0):
        raise ValueError(f"spacing {tuple(spacing)} / target {tuple(target)}: expected positive mm values")
    return s, t


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient ``(i, j, k[, c])`` to the RAS grid ``(x, y, z[, c])`` by flips/permutations only.

    Returns ``(array_ras, affine_ras, ornt)`` where ``ornt`` (3x2, nibabel) is the raw -> RAS transform.
    Every voxel keeps its world coordinate: ``affine_ras = affine @ inv_ornt_aff(ornt, shape)``
    (what nibabel's ``as_reoriented`` does). The returned array is a fresh C-contiguous copy.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine of shape {affine.shape}: expected a finite 4x4 matrix")
    if array.ndim not in (3, 4) or min(array.shape[:3], default=0) == 0:
        raise ValueError(f"array of shape {array.shape}: expected non-empty (i, j, k) or (i, j, k, c)")
    io_ornt = nib.orientations.io_orientation(affine)
    if not np.all(np.isfinite(io_ornt)):
        raise ValueError(f"affine {affine[:3, :3].tolist()}: degenerate (a voxel axis has no direction)")
    ornt = nib.orientations.ornt_transform(io_ornt, _RAS_ORNT)
    out = x_fastest(nib.orientations.apply_orientation(array, ornt))
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return out, new_affine, ornt


def from_ras(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_ras` given its ``ornt`` (raw -> RAS): RAS grid ``(x, y, z[, c])`` -> raw ``(i, j, k[, c])``."""
    back = nib.orientations.ornt_transform(_RAS_ORNT, np.asarray(ornt, dtype=np.float64))
    return x_fastest(nib.orientations.apply_orientation(array, back))


def crop(array: np.ndarray, box: CropBox) -> np.ndarray:
    """Copy of ``array[..., lo:hi]`` over the last three (spatial) axes; works on (x,y,z) and (c,x,y,z)."""
    spatial = array.shape[-3:]
    if array.ndim < 3 or any(not 0 <= lo < hi <= n for lo, hi, n in zip(box.lo, box.hi, spatial, strict=True)):
        raise ValueError(f"crop box {box.lo}-{box.hi}: expected a non-empty box inside shape {array.shape}")
    return x_fastest(array[(Ellipsis, *box.slices())])


def cropped_affine(affine: np.ndarray, box: CropBox) -> np.ndarray:
    """Affine of the cropped grid: voxel 0 of the crop is voxel ``lo`` of the input (translation only)."""
    shift = np.eye(4)
    shift[:3, 3] = box.lo
    return np.asarray(affine, dtype=np.float64) @ shift


def target_shape(shape: tuple[int, int, int], spacing: Sequence[float], target: Sequence[float]) -> Shape3:
    """Output voxel counts ``max(1, round(n * s / t))`` per axis (round half to even, like numpy/nnU-Net)."""
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"shape {tuple(shape)}: expected three positive voxel counts")
    s, t = _check_spacings(spacing, target)
    return _ints([max(1, round(n * si / ti)) for n, si, ti in zip(shape, s, t, strict=True)])


def resampled_affine(affine: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Affine of the resampled grid: ``A_in @ [[diag(t/s), 0.5*t/s - 0.5], [0, 1]]`` (the contract above)."""
    s, t = _check_spacings(spacing, target)
    ratio = t / s
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = 0.5 * ratio - 0.5
    return np.asarray(affine, dtype=np.float64) @ step


# scipy.ndimage pads by this many edge voxels before its spline prefilter with mode "nearest" (its
# _prepad_for_spline_filter), so that the filter's mirror boundary sits far from the data.
_SPLINE_PAD = 12


def sample_grid(volume: np.ndarray, ratio: np.ndarray, out_shape: Shape3, order: int) -> np.ndarray:
    """Sample a 3D ``volume`` at ``x_in = (u + 0.5) * ratio - 0.5`` for every output voxel ``u``.

    ``order == 0`` picks ``floor(x_in + 0.5)`` (clamped) by pure indexing: exact and dtype-preserving,
    so integer labels never pass through floats. Other orders use scipy's B-splines (prefiltered for
    order > 1) via ``affine_transform`` with a diagonal matrix (separable, no coordinate arrays) and
    ``mode="nearest"`` at the borders; the result is float32 (float64 if the input is float64).
    """
    if volume.ndim == 3 and not volume.flags.c_contiguous and on_disk(volume).flags.c_contiguous:
        # x fastest in memory (io.layout): sample the reversed view, so that every pass runs along memory and the
        # result comes out x fastest too. The transform is separable, so reversing the axes samples the same points.
        flipped = sample_grid(
            on_disk(volume), np.asarray(ratio)[::-1], (out_shape[2], out_shape[1], out_shape[0]), order
        )
        return on_disk(flipped)
    if order == 0:
        index = []
        for n_in, n_out, r in zip(volume.shape, out_shape, ratio, strict=True):
            x_in = (np.arange(n_out, dtype=np.float64) + 0.5) * r - 0.5
            index.append(np.clip(np.floor(x_in + 0.5).astype(np.intp), 0, n_in - 1))
        return np.ascontiguousarray(volume[np.ix_(*index)])
    dtype = np.float64 if volume.dtype == np.float64 else np.float32
    if order > 1:
        pad = _SPLINE_PAD
        padded = np.empty(tuple(n + 2 * pad for n in volume.shape), dtype)
        padded[pad:-pad, pad:-pad, pad:-pad] = volume
        return _sample_padded(padded, ratio, out_shape, order)
    return _affine_sample(volume, ratio, 0.0, out_shape, order)


def spline_buffer(shape: Shape3, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """An uninitialized x-fastest buffer of ``shape`` plus _SPLINE_PAD voxels on every side, and its interior view.

    Write a volume into the interior (a normalizer's ``out=``), then :func:`sample_spline` samples it like
    :func:`sample_grid`: the volume never needs a buffer of its own beside the padded one.
    """
    pad = _SPLINE_PAD
    padded = empty_x_fastest(tuple(n + 2 * pad for n in shape), dtype)
    return padded, padded[pad:-pad, pad:-pad, pad:-pad]


def sample_spline(padded: np.ndarray, ratio: np.ndarray, out_shape: Shape3, order: int = 3) -> np.ndarray:
    """:func:`sample_grid` (``order > 1``) of the volume in the interior of ``padded`` (from :func:`spline_buffer`).

    The same values, bit for bit, as ``sample_grid`` of that volume. ``padded`` is overwritten with the spline
    coefficients. The result is x fastest, in ``padded``'s dtype.
    """
    if order < 2:
        raise ValueError(f"spline order {order}: sample_spline prefilters, expected 2..5")
    if padded.flags.c_contiguous:
        return _sample_padded(padded, ratio, out_shape, order)
    if not on_disk(padded).flags.c_contiguous:
        raise ValueError("padded buffer is neither C-ordered nor x fastest: expected one from spline_buffer")
    flipped = _sample_padded(
        on_disk(padded), np.asarray(ratio)[::-1], (out_shape[2], out_shape[1], out_shape[0]), order
    )
    return on_disk(flipped)


def _sample_padded(padded: np.ndarray, ratio: np.ndarray, out_shape: Shape3, order: int) -> np.ndarray:
    # scipy's own prefilter pads by _SPLINE_PAD edge voxels and filters into a float64 copy: two float32
    # volumes more than needed. The same padding, filtered in place in the volume's dtype, samples the same
    # values within float32 rounding (tests/preprocess/test_geometry.py) at a third of the work memory.
    _extend_edges(padded, _SPLINE_PAD)
    ndimage.spline_filter(padded, order, output=padded, mode="nearest")
    return _affine_sample(padded, ratio, _SPLINE_PAD, out_shape, order)


def _extend_edges(padded: np.ndarray, pad: int) -> None:
    """``np.pad(interior, pad, mode="edge")`` in place: each padding voxel takes the nearest interior voxel's value.

    Axis by axis over the full extent of the others, so the corners end up right whatever was there before."""
    for axis in range(padded.ndim):
        n = padded.shape[axis]

        def span(lo: int, hi: int, axis: int = axis) -> tuple[slice, ...]:
            index = [slice(None)] * padded.ndim
            index[axis] = slice(lo, hi)
            return tuple(index)

        padded[span(0, pad)] = padded[span(pad, pad + 1)]
        padded[span(n - pad, n)] = padded[span(n - pad - 1, n - pad)]


def _affine_sample(volume: np.ndarray, ratio: np.ndarray, shift: float, out_shape: Shape3, order: int) -> np.ndarray:
    """The contract's sampling as one diagonal ``affine_transform``; ``shift`` voxels of padding precede the data."""
    scale = np.asarray(ratio, dtype=np.float64)
    return ndimage.affine_transform(
        volume,
        scale,
        offset=0.5 * scale - 0.5 + shift,
        output_shape=out_shape,
        output=np.float64 if volume.dtype == np.float64 else np.float32,
        order=order,
        mode="nearest",
        prefilter=False,
    )


def invert_to_raw(pred: np.ndarray, record: PreprocessRecord, *, order: int = 0) -> np.ndarray:
    """Map a prediction on the preprocessed grid back onto the raw grid.

    ``pred`` is ``(x, y, z)`` (labels: ``order=0``, nearest, dtype kept) or channel-first ``(c, x, y, z)``
    probabilities (e.g. ``order=1``). Steps: resample to ``cropped_shape`` with the same cell-centred
    contract (target -> spacing_before, output shape forced), pad into ``ras_shape`` with 0, undo the RAS
    reorientation. Returns ``(i, j, k)`` or channels-last ``(i, j, k, c)`` with ``raw_shape``; its voxel
    geometry is exactly ``raw_affine``.
    """
    if pred.ndim not in (3, 4) or tuple(pred.shape[-3:]) != record.final_shape:
        raise ValueError(f"prediction of shape {pred.shape}: expected (x, y, z) or (c, x, y, z) = {record.final_shape}")
    channels = pred[None] if pred.ndim == 3 else pred
    ratio = np.asarray(record.spacing_before) / np.asarray(record.spacing_after)
    same = record.spacing_before == record.spacing_after and record.final_shape == record.cropped_shape
    back = [c.copy() if same else sample_grid(c, ratio, record.cropped_shape, order) for c in channels]
    padded = np.zeros((len(back), *record.ras_shape), dtype=back[0].dtype)
    for c, arr in enumerate(back):
        padded[c][record.crop.slices()] = arr
    ras = padded[0] if pred.ndim == 3 else np.moveaxis(padded, 0, -1)
    raw = from_ras(ras, np.asarray(record.ras_ornt))
    if raw.shape[:3] != record.raw_shape:  # a corrupted record, not data: fail loudly
        raise ValueError(f"inverted shape {raw.shape[:3]}: expected raw_shape {record.raw_shape}")
    return raw
