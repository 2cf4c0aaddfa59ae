"""Per-sample and per-population checks of synthetic lesions (generative.md §9.7, checks 1, 2, 7-11, 15).

Pure numpy/scipy functions over arrays, no I/O. The ``validate-synthetic`` stage computes one table row per
synthetic sample with them and hands the table to :mod:`lesionflow.quality.synthetic_suite`.

Conventions: images are (x, y, z) or (c, x, y, z) float arrays in the store's normalised units; masks are
(x, y, z), non-zero = lesion (bool in the store). Functions that look at texture (histograms, gradients) use
channel 0 of a 4D image; the background checks and the correlations use every channel. Distances are in voxel
units (isotropic spacing 1), intensities in the image's units. A shape mismatch raises ValueError; a value
that is undefined for the input (empty mask, too few samples) is NaN unless the function says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from lesionflow.synth.histograms import lesion_histogram


def _spatial(mask: np.ndarray) -> np.ndarray:
    """``mask`` as a 3D bool array (non-zero = inside)."""
    m = np.asarray(mask) != 0
    if m.ndim != 3:
        raise ValueError(f"mask must be (x, y, z), got shape {m.shape}")
    return m


def _check_image(image: np.ndarray, mask: np.ndarray, name: str = "image") -> None:
    if image.ndim not in (3, 4) or image.shape[-3:] != mask.shape:
        raise ValueError(f"{name} shape {image.shape} does not match mask {mask.shape} ((x, y, z) or (c, x, y, z))")


def _channel0(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    return a[0] if a.ndim == 4 else a


# ----------------------------------------------------------------------------------- 1-2. background exactness


def _outside(original: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The voxels outside ``mask`` of both images (every channel), as 1D/2D arrays in their own dtype."""
    a, b, m = np.asarray(original), np.asarray(synthetic), _spatial(mask)
    if a.shape != b.shape:
        raise ValueError(f"original shape {a.shape} != synthetic shape {b.shape}")
    _check_image(a, m)
    return a[..., ~m], b[..., ~m]


def background_max_abs_diff(original: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> float:
    """``max |original - synthetic|`` over the voxels outside ``mask``, all channels (check 1; 0.0 = exact).

    Compared in float64 (exact for float32/float64 and for integers up to 2**53). NaN-safe: NaN against NaN at
    the same voxel (and +inf against +inf) counts as equal, NaN against anything else as ``inf``. The result is
    0.0 exactly when the backgrounds are numerically equal; ``-0.0`` vs ``0.0`` and NaN payloads are *not* seen
    here — use :func:`background_identical` for bitwise equality. 0.0 when the mask covers everything.
    """
    a, b = _outside(original, synthetic, mask)
    if a.size == 0:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - b64)
    diff = np.where(same, 0.0, diff)
    diff[np.isnan(diff)] = np.inf  # NaN vs number, inf vs NaN
    return float(diff.max())


def background_identical(original: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> bool:
    """True when the voxels outside ``mask`` are bitwise identical (all channels, check 1/2).

    The raw bytes are compared, so ``-0.0`` vs ``0.0`` or two different NaN payloads differ; arrays of different
    dtypes (byte order included) are never identical. Empty masks must give True (check 2).
    """
    a, b = _outside(original, synthetic, mask)
    if a.dtype != b.dtype:
        return False
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# ----------------------------------------------------------------------------------- 7. mask post-processing


def is_binary(mask: np.ndarray) -> bool:
    """True for a bool array or one whose values all lie in {0, 1} (an empty array is binary; NaN is not)."""
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        return True
    return bool(np.all((m == 0) | (m == 1)))


def component_count(mask: np.ndarray, connectivity: int = 3) -> int:
    """Number of connected components of ``mask != 0``; ``connectivity`` 1 (faces) .. ndim (corners) as in
    :func:`scipy.ndimage.generate_binary_structure` (3 = 26-neighbourhood in 3D). 0 for an empty mask."""
    m = np.asarray(mask) != 0
    if not 1 <= connectivity <= max(m.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{m.ndim}, got {connectivity}")
    _, n = ndimage.label(m, structure=ndimage.generate_binary_structure(m.ndim, connectivity))
    return int(n)


def inside_fraction(mask: np.ndarray, organ: np.ndarray | None) -> float:
    """Share of the mask's voxels where ``organ > 0``, in [0, 1]; 1.0 when ``organ`` is None or the mask empty."""
    m = np.asarray(mask) != 0
    if organ is None:
        return 1.0
    o = np.asarray(organ)
    if o.shape != m.shape:
        raise ValueError(f"organ shape {o.shape} != mask shape {m.shape}")
    n = int(np.count_nonzero(m))
    if n == 0:
        return 1.0
    return float(np.count_nonzero(m & (o > 0))) / n


# ----------------------------------------------------------------------------------- 8. texture fidelity


def _w1_block(a: np.ndarray, b: np.ndarray, width: float) -> float:
    """W1 of two histograms on the same equal-width bins, each renormalised to sum 1 (NaN if one is empty)."""
    sa, sb = a.sum(), b.sum()
    if not (sa > 0 and sb > 0):
        return float("nan")
    return float(np.abs(np.cumsum(a / sa) - np.cumsum(b / sb)).sum() * width)


def histogram_w1(
    hist_a: np.ndarray, hist_b: np.ndarray, value_range: tuple[float, float], bins: int | None = None
) -> float:
    """Wasserstein-1 distance (intensity units) between two histograms on the same equal-width bins over
    ``value_range``: ``sum_k |CDF_a(k) - CDF_b(k)| * bin_width``, the mass sitting at the bin centres.

    Each histogram is renormalised to sum 1 first (a perturbed condition may not sum exactly to 1), so two
    one-bin deltas give the distance of their bin centres. ``bins`` = None: one block of ``len(hist)`` bins.
    With ``bins`` and ``len = C * bins`` (LeFusion's concatenated multi-class condition) the result is the mean
    W1 over the class blocks that are non-zero in *both* histograms. NaN when no block is non-zero in both.
    Raises ValueError on different lengths, a length not a multiple of ``bins``, negative or non-finite bins.
    """
    a = np.asarray(hist_a, dtype=np.float64).ravel()
    b = np.asarray(hist_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"histograms must have the same non-zero length, got {a.size} and {b.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a.min() < 0 or b.min() < 0:
        raise ValueError("histogram bins must be finite and >= 0")
    nb = a.size if bins is None else int(bins)
    if nb < 1 or a.size % nb:
        raise ValueError(f"histogram length {a.size} is not a multiple of bins={bins}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite (lo, hi) with lo < hi, got {value_range}")
    width = (hi - lo) / nb
    dists = [_w1_block(a[i : i + nb], b[i : i + nb], width) for i in range(0, a.size, nb)]
    valid = [d for d in dists if not np.isnan(d)]
    return float(np.mean(valid)) if valid else float("nan")


def nearest_histogram_w1(
    hist: np.ndarray, references: Sequence[np.ndarray], value_range: tuple[float, float], bins: int | None = None
) -> float:
    """The smallest :func:`histogram_w1` of ``hist`` to any of ``references`` (same bins and ``value_range``):
    how far a lesion's texture is from the closest real lesion's, for lesions without a condition histogram
    (RePaint DDPM insertion, pasted copies). NaN when no reference gives a finite distance (none given)."""
    dists = [histogram_w1(hist, ref, value_range, bins=bins) for ref in references]
    finite = [d for d in dists if np.isfinite(d)]
    return float(min(finite)) if finite else float("nan")


def lesion_w1(
    image: np.ndarray, mask: np.ndarray, target: np.ndarray, bins: int, value_range: tuple[float, float]
) -> float:
    """W1 between the histogram of ``image`` (channel 0 if 4D) inside ``mask`` and the conditioning ``target``.

    The histogram is :func:`lesion_histogram` (values outside ``value_range`` clipped into the edge bins);
    ``target`` is one class block of ``bins`` values (pass the class's block of a multi-class condition).
    NaN for an empty mask or non-finite intensities inside it (a broken sample, rejected downstream, rather
    than an exception that stops the whole check run).
    """
    target = np.asarray(target, dtype=np.float64).ravel()
    if target.size != bins:
        raise ValueError(f"target has {target.size} bins, expected {bins} (one class block)")
    img, m = _channel0(image), _spatial(mask)
    if img.shape != m.shape:
        raise ValueError(f"image spatial shape {img.shape} != mask shape {m.shape}")
    if not m.any() or not np.all(np.isfinite(img[m])):
        return float("nan")
    hist = lesion_histogram(img, m, bins, value_range)
    return histogram_w1(hist, target, value_range, bins=bins)


# ----------------------------------------------------------------------------------- 9. mask realism


@dataclass(frozen=True)
class KsResult:
    """Two-sample Kolmogorov-Smirnov test of lesion volumes (voxels): statistic D in [0, 1] and its p-value."""

    statistic: float  # NaN when a side has fewer than 2 values
    pvalue: float  # 1.0 when not testable (no evidence against "same distribution")
    n_real: int
    n_synthetic: int


def volume_ks(real_voxels: Sequence[int], synthetic_voxels: Sequence[int]) -> KsResult:
    """Two-sided :func:`scipy.stats.ks_2samp` between real and synthetic lesion volumes (voxel counts).

    With fewer than 2 values on either side there is not enough data to test: statistic NaN, p-value 1.0.
    """
    real = np.asarray(real_voxels, dtype=np.float64).ravel()
    synth = np.asarray(synthetic_voxels, dtype=np.float64).ravel()
    if real.size < 2 or synth.size < 2:
        return KsResult(float("nan"), 1.0, int(real.size), int(synth.size))
    res = stats.ks_2samp(real, synth)
    return KsResult(float(res.statistic), float(res.pvalue), int(real.size), int(synth.size))


# ----------------------------------------------------------------------------------- 10. boundary plausibility


def boundary_shell(mask: np.ndarray) -> np.ndarray:
    """``dilation(mask) XOR erosion(mask)`` (6-connected, one voxel each way): a 2-voxel-thick shell across the
    lesion border. The array border counts as background for the erosion."""
    m = _spatial(mask)
    return np.asarray(ndimage.binary_dilation(m) ^ ndimage.binary_erosion(m))


def boundary_gradient(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude of ``image`` (channel 0 if 4D) over :func:`boundary_shell` (check 10).

    Gradient by :func:`numpy.gradient` in voxel units (intensity units per voxel); an axis of length 1 has
    zero gradient. A pasted "sticker" has a sharp edge and a larger value than a lesion that blends in.
    NaN for an empty mask.
    """
    img, m = _channel0(image).astype(np.float64), _spatial(mask)
    if img.shape != m.shape:
        raise ValueError(f"image spatial shape {img.shape} != mask shape {m.shape}")
    if not m.any():
        return float("nan")
    squared = np.zeros_like(img)
    for axis, n in enumerate(img.shape):
        if n >= 2:
            squared += np.gradient(img, axis=axis) ** 2
    return float(np.sqrt(squared)[boundary_shell(m)].mean())


# ----------------------------------------------------------------------------------- 11. diversity, memorisation


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of ``a`` and ``b`` over the voxels in ``mask`` (every voxel when None), in [-1, 1].

    ``a``/``b`` have the same shape, (x, y, z) or (c, x, y, z) (a 3D mask then selects in every channel).
    Voxels non-finite on either side are left out. 0.0 when either side is constant over the selection
    (including a selection of fewer than 2 voxels): no evidence of similarity.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    if mask is not None:
        m = _spatial(mask)
        _check_image(x, m, "a")
        x, y = x[..., m], y[..., m]
    x, y = x.ravel(), y.ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0 or syy == 0.0:
        return 0.0
    return float(np.clip(float(dx @ dy) / np.sqrt(sxx * syy), -1.0, 1.0))


def pairwise_similarity(samples: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None) -> float:
    """Mean :func:`normalized_cross_correlation` over all pairs of ``samples`` (same shape), a diversity proxy
    for samples of one condition: lower = more diverse, 1.0 = identical. The mask of a pair is the union of
    both masks (all voxels when ``masks`` is None). NaN with fewer than 2 samples."""
    if masks is not None and len(masks) != len(samples):
        raise ValueError(f"{len(masks)} masks for {len(samples)} samples")
    if len(samples) < 2:
        return float("nan")
    values = []
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            pair_mask = None if masks is None else (_spatial(masks[i]) | _spatial(masks[j]))
            values.append(normalized_cross_correlation(samples[i], samples[j], pair_mask))
    return float(np.mean(values))


def nearest_neighbour_similarity(sample: np.ndarray, references: Sequence[np.ndarray]) -> tuple[float, int]:
    """Highest :func:`normalized_cross_correlation` of ``sample`` against the ``references`` of the same shape
    (others are skipped) and the index of that reference in ``references`` (first one on ties).

    A value close to 1 flags a memorised training lesion. ``(nan, -1)`` when no reference has the same shape.
    """
    s = np.asarray(sample)
    best, index = float("nan"), -1
    for i, ref in enumerate(references):
        r = np.asarray(ref)
        if r.shape != s.shape:
            continue
        value = normalized_cross_correlation(s, r)
        if index < 0 or value > best:
            best, index = value, i
    return best, index


# ----------------------------------------------------------------------------------- 15. acceptance filter


def detected_fraction(predicted_label: np.ndarray, mask: np.ndarray) -> float:
    """Share of the mask's voxels that the segmenter predicts as foreground (``predicted_label > 0``), in
    [0, 1] (FreeTumor's acceptance filter keeps a sample at >= 0.7). An empty mask counts as not detected (0.0),
    so NaN in the gate table keeps its one meaning: no segmenter was run."""
    m, p = _spatial(mask), np.asarray(predicted_label)
    if p.shape != m.shape:
        raise ValueError(f"prediction shape {p.shape} != mask shape {m.shape}")
    n = int(np.count_nonzero(m))
    if n == 0:
        return 0.0
    return float(np.count_nonzero(m & (p > 0))) / n
