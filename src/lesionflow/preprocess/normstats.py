"""Normalization statistics, measured where normalization happens, and the checks of a stored image against them.

Contract:

* :func:`normalization_stats` runs on the *cropped, normalized* image ``(c, x, y, z)`` float32, right after
  normalization and **before** resampling, over the very mask each channel was normalized in (the
  hole-filled nonzero mask of the crop, or every crop voxel when no mask was used). Means and standard
  deviations are accumulated in float64. ``lo``/``hi`` are the channel's minimum/maximum over the whole
  crop (background included), in normalized units.
* :func:`stored_image_checks` compares the image as stored (resampled, ``(c, x, y, z)``, any float dtype)
  with those statistics. It never recomputes z-score statistics on the resampled grid: cubic B-spline
  resampling smears an exact-zero background into small non-zero values (and averages noise when
  downsampling), so "non-zero voxels of the resampled image" is not the normalization mask and its std is
  not 1 even for a perfect normalization (issue 17, item 11: std 0.71 on valid 1 mm / 2x2x3 mm MR).
  What resampling does keep is the intensity range, up to the spline's overshoot at sharp edges, so the
  stored image is checked by ``range_excess``: how far it leaves the normalized crop's ``[lo, hi]``, as a
  fraction of ``hi - lo`` (0 when inside).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STATS_SLAB = 1 << 18  # voxels per float64 temporary of mean_std (2 MiB): small beside even a 160x160x80 volume


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation of ``values``, accumulated in float64 (NaN, NaN when empty).

    Two passes over slabs of ``STATS_SLAB`` voxels in memory order: ``np.std(values, dtype=np.float64)`` allocates a
    float64 array the size of the input (2x a float32 volume), which set the preprocess worker's memory peak on
    clinical-size scans (docs/benchmarks.md, "Clinical-size scans"). A strided view (the interior of a padded
    buffer) is read a plane at a time, never copied whole; the slabs, and so the sums, are the same either way.
    """
    n = values.size
    if n == 0:
        return float("nan"), float("nan")
    total = sum(float(np.sum(slab, dtype=np.float64)) for slab in memory_order_slabs(values, STATS_SLAB))
    mean = total / n
    squares = 0.0
    deviation = np.empty(min(n, STATS_SLAB), np.float64)  # one buffer for every slab
    for slab in memory_order_slabs(values, STATS_SLAB):
        np.subtract(slab, mean, out=deviation[: slab.size], dtype=np.float64)
        squares += float(np.dot(deviation[: slab.size], deviation[: slab.size]))
    return mean, float(np.sqrt(squares / n))


def memory_order_slabs(values: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``values.ravel(order="K")`` in consecutive pieces of ``size`` elements (the last may be shorter).

    Views when the array is contiguous in any order; otherwise the array is walked along its memory order (axes
    sorted by stride) one plane of its slowest axis at a time into one reused buffer, so a piece is only valid
    until the next one is asked for (read it, do not keep it).
    """
    if values.flags.c_contiguous or values.flags.f_contiguous or values.ndim < 2 or min(values.strides) < 0:
        flat = values.ravel(order="K")
        for start in range(0, flat.size, size):
            yield flat[start : start + size]
        return
    walk = values.transpose(np.argsort([-abs(s) for s in values.strides], kind="stable"))
    piece = np.empty(size, values.dtype)  # reused: each piece is valid until the next one is asked for
    fill = 0
    for plane in walk:
        flat = plane.ravel()  # a copy of one plane when the plane itself is strided
        start = 0
        while start < flat.size:
            take = min(size - fill, flat.size - start)
            piece[fill : fill + take] = flat[start : start + take]
            fill, start = fill + take, start + take
            if fill == size:
                yield piece
                fill = 0
    if fill:
        yield piece[:fill]


@dataclass(frozen=True)
class NormStats:
    """One channel's normalization, measured on its normalized values before resampling.

    ``scheme`` "zscore" or "ct"; ``masked``: statistics over the normalization mask (else every crop voxel);
    ``n_voxels`` counted in them; ``mean``/``std`` of the normalized values there (z-score: 0 and 1);
    ``lo``/``hi`` the normalized channel's range over the whole crop.
    """

    scheme: str
    masked: bool
    n_voxels: int
    mean: float
    std: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "masked": self.masked,
            "n_voxels": self.n_voxels,
            "mean": self.mean,
            "std": self.std,
            "lo": self.lo,
            "hi": self.hi,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormStats:
        return cls(
            scheme=str(d["scheme"]),
            masked=bool(d["masked"]),
            n_voxels=int(d["n_voxels"]),
            mean=float(d["mean"]),
            std=float(d["std"]),
            lo=float(d["lo"]),
            hi=float(d["hi"]),
        )


def normalization_stats(
    normed_cf: np.ndarray, masks: Sequence[np.ndarray | None], schemes: Sequence[str]
) -> tuple[NormStats, ...]:
    """Per-channel :class:`NormStats` of a normalized crop ``(c, x, y, z)``; ``masks[c]`` is the bool
    ``(x, y, z)`` mask channel ``c`` was normalized in, or None for all voxels."""
    if normed_cf.ndim != 4 or len(masks) != normed_cf.shape[0] or len(schemes) != normed_cf.shape[0]:
        raise ValueError(
            f"image of shape {normed_cf.shape} with {len(masks)} masks / {len(schemes)} schemes: "
            "expected channel-first (c, x, y, z) and one mask and scheme per channel"
        )
    out = []
    for channel, mask, scheme in zip(normed_cf, masks, schemes, strict=True):
        values = channel[mask] if mask is not None else channel
        mean, std = mean_std(values)
        out.append(
            NormStats(
                scheme=str(scheme),
                masked=mask is not None,
                n_voxels=int(values.size),
                mean=mean,
                std=std,
                lo=float(channel.min()),
                hi=float(channel.max()),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class StoredImageChecks:
    """The processed gate's per-case intensity columns (see the module docstring).

    ``zscore_mean_abs`` / ``zscore_std_dev``: max over z-scored channels of ``|mean|`` and ``|std - 1|`` as
    recorded at normalization (0 without z-scored channels). ``n_nonfinite``: NaN/Inf voxels of the stored
    image. ``intensity_min``/``intensity_max``: its range over all channels. ``range_excess``: max over
    channels of how far the stored channel's finite voxels leave its recorded ``[lo, hi]``, relative to
    ``hi - lo`` (``1e6`` when a channel normalized to a constant is stored non-constant). All finite, so
    the row fits JSON attributes and CSV alike.
    """

    zscore_mean_abs: float
    zscore_std_dev: float
    n_nonfinite: int
    intensity_min: float
    intensity_max: float
    range_excess: float


def stored_image_checks(stored_cf: np.ndarray, stats: Sequence[NormStats]) -> StoredImageChecks:
    """Checks of a stored image ``(c, x, y, z)`` against the :class:`NormStats` of its normalization."""
    if stored_cf.ndim != 4 or stored_cf.shape[0] != len(stats):
        raise ValueError(
            f"image of shape {stored_cf.shape} with {len(stats)} recorded channels: expected one record per "
            "channel (a store written before normalization statistics were recorded: rerun preprocess)"
        )
    zscored = [s for s in stats if s.scheme == "zscore"]
    mean_abs = max((abs(s.mean) for s in zscored), default=0.0)
    std_dev = max((abs(s.std - 1.0) for s in zscored), default=0.0)
    n_nonfinite = 0
    excess = 0.0
    lows, highs = [], []
    for channel, s in zip(stored_cf, stats, strict=True):
        finite = np.isfinite(channel)
        n_bad = int(channel.size - np.count_nonzero(finite))
        n_nonfinite += n_bad
        # the range of the finite voxels (n_nonfinite names the rest), so every column stays a finite number
        values = channel[finite] if n_bad else channel
        lo, hi = (float(values.min()), float(values.max())) if values.size else (s.lo, s.hi)
        lows.append(lo)
        highs.append(hi)
        outside = max(0.0, s.lo - lo, hi - s.hi)
        width = s.hi - s.lo
        # a constant normalized channel (CT clipped flat) has width 0: any change of it is a fault
        excess = max(excess, outside / width if width > 0 else (0.0 if outside == 0 else 1e6))
    return StoredImageChecks(
        zscore_mean_abs=mean_abs,
        zscore_std_dev=std_dev,
        n_nonfinite=n_nonfinite,
        intensity_min=min(lows),
        intensity_max=max(highs),
        range_excess=excess,
    )
