"""LeFusion's histogram texture control: lesion histograms, the k-means bank and its sampling modes.

Reference: generative.md §2.3, §2.7, §9.2.4. A lesion histogram is ``h_k = #{v in M : I(v) in bin_k} / |M|`` over
the *normalised* intensities (default 16 bins over [-1, 1]); values outside the range are clipped into the edge
bins, so every histogram of a non-empty mask sums to 1. Images are (c, x, y, z) or (x, y, z), masks (x, y, z).
A multi-class condition is the concatenation of per-class histograms (zeros for an absent class), so a vector of
``n_classes * bins`` values whose non-empty blocks each sum to 1.

Sampling modes (:meth:`HistogramBank.sample`): ``cluster`` (a k-means centre with the ±10 % per-bin seeded
perturbation of LeFusion's ``perturb_tensor``, then renormalised per class block — the original did not
renormalise), ``empirical`` (a real training lesion's histogram), ``explicit`` (a caller's vector, validated and
renormalised). Every random choice takes an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lesionflow.seeding import rng_for

N_BINS = 16
VALUE_RANGE = (-1.0, 1.0)
PERTURBATION = 0.1
BANK_FORMAT = "lesionflow.histogram_bank/1"
Mode = Literal["cluster", "empirical", "explicit"]


def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite (lo, hi) with lo < hi, got {value_range}")
    return lo, hi


def lesion_histogram(
    image_roi: np.ndarray,
    mask: np.ndarray,
    bins: int = N_BINS,
    value_range: tuple[float, float] = VALUE_RANGE,
    *,
    channel: int = 0,
) -> np.ndarray:
    """Normalised ``bins``-bin histogram (float64, sums to 1) of the intensities of ``image_roi`` inside ``mask``.

    ``image_roi`` is (c, x, y, z) (``channel`` is used) or (x, y, z); ``mask`` (x, y, z), non-zero = lesion.
    Bins split ``value_range`` evenly (np.histogram edges); values outside it are clipped into the edge bins.
    Raises ValueError for an empty mask or a shape mismatch.
    """
    image = np.asarray(image_roi)
    if image.ndim == 4:
        image = image[channel]
    m = np.asarray(mask) > 0
    if image.shape != m.shape or m.ndim != 3:
        raise ValueError(f"image spatial shape {image.shape} != mask shape {m.shape} (both (x, y, z))")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo, hi = _check_range(value_range)
    values = image[m].astype(np.float64)
    if values.size == 0:
        raise ValueError("lesion_histogram of an empty mask")
    if not np.all(np.isfinite(values)):
        raise ValueError("non-finite intensities inside the mask")
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return counts.astype(np.float64) / values.size


def concatenated_histograms(
    image_roi: np.ndarray,
    label_roi: np.ndarray,
    class_values: Sequence[int],
    bins: int = N_BINS,
    value_range: tuple[float, float] = VALUE_RANGE,
    *,
    channel: int = 0,
) -> np.ndarray:
    """§2.7 multi-class condition: per-class histograms of ``label_roi == v`` for v in ``class_values``, concatenated
    (length ``len(class_values) * bins``); an absent class gives a block of zeros.
    """
    if len(class_values) == 0:
        raise ValueError("class_values must not be empty")
    label = np.asarray(label_roi)
    blocks = []
    for v in class_values:
        m = label == v
        blocks.append(lesion_histogram(image_roi, m, bins, value_range, channel=channel) if m.any() else np.zeros(bins))
    return np.concatenate(blocks)


def _renormalise_blocks(vec: np.ndarray, bins: int) -> np.ndarray:
    """Each length-``bins`` block divided by its sum; all-zero blocks stay zero."""
    blocks = vec.reshape(-1, bins)
    sums = blocks.sum(axis=1, keepdims=True)
    out = np.divide(blocks, sums, out=np.zeros_like(blocks), where=sums > 0)
    return out.reshape(-1)


def validate_histogram(values: Sequence[float] | np.ndarray, bins: int = N_BINS, n_classes: int = 1) -> np.ndarray:
    """Check an explicit histogram (``n_classes * bins`` finite values >= 0, total > 0) and renormalise each class
    block to sum to 1 (all-zero blocks = absent class stay zero). Returns float64; raises ValueError otherwise.
    """
    vec = np.asarray(values, dtype=np.float64)
    if vec.ndim != 1 or vec.size != bins * n_classes:
        raise ValueError(f"histogram must have {bins * n_classes} values ({n_classes} x {bins} bins), got {vec.shape}")
    if not np.all(np.isfinite(vec)):
        raise ValueError("histogram values must be finite")
    if np.any(vec < 0):
        raise ValueError("histogram values must be >= 0")
    if vec.sum() <= 0:
        raise ValueError("histogram must have a positive sum")
    return _renormalise_blocks(vec, bins)


def perturb_histogram(
    hist: np.ndarray,
    rng: np.random.Generator,
    fraction: float = PERTURBATION,
    *,
    bins: int = N_BINS,
    renormalise: bool = True,
) -> np.ndarray:
    """LeFusion's ``perturb_tensor``: zero-mean Gaussian noise scaled so that ``|delta_k| <= fraction * h_k``.

    The noise vector is divided by its largest magnitude, then multiplied bin-wise by ``fraction * h``; so every
    bin moves by at most ``fraction`` of its value (exactly ``fraction`` for the largest-noise bin), empty bins stay
    empty and no bin goes negative. With ``renormalise`` each class block is then rescaled to sum to 1.
    """
    h = np.asarray(hist, dtype=np.float64)
    if not 0 <= fraction < 1:
        raise ValueError(f"perturbation fraction must be in [0, 1), got {fraction}")
    noise = rng.standard_normal(h.shape)
    peak = np.abs(noise).max()
    delta = noise / peak * fraction * h if peak > 0 else np.zeros_like(h)
    out = h + delta
    return _renormalise_blocks(out, bins) if renormalise else out


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ initial centres (indices of distinct rows of ``x``)."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        # k <= distinct rows, so some row is still at a positive distance: the total is > 0.
        nxt = int(rng.choice(n, p=d2 / d2.sum()))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((x - x[nxt]) ** 2).sum(axis=1))
    return x[chosen].copy()


def _assign(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    labels = np.argmin(d2, axis=1)  # ties: lowest centre index (deterministic)
    return labels, d2[np.arange(len(x)), labels]


def kmeans(
    x: np.ndarray, k: int, *, seed: int, n_init: int = 4, max_iter: int = 100
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with seeded k-means++ init on rows of ``x`` (n, d); returns (centres, labels, inertia).

    ``n_init`` restarts use ``rng_for(seed, "kmeans", i)``; the one with the lowest inertia wins (first on ties).
    An empty cluster is re-seeded with the point farthest from its centre. Requires 1 <= k <= distinct rows.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty (n, d) array, got shape {x.shape}")
    if not 1 <= k <= len(np.unique(x, axis=0)):
        raise ValueError(f"k must be in 1..{len(np.unique(x, axis=0))} (distinct rows), got {k}")
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for init in range(max(1, n_init)):
        rng = rng_for(seed, "kmeans", init)
        centres = _kmeans_pp(x, k, rng)
        labels, d2 = _assign(x, centres)
        for _ in range(max_iter):
            new = centres.copy()
            for j in range(k):
                members = x[labels == j]
                if len(members):
                    new[j] = members.mean(axis=0)
                else:
                    far = int(np.argmax(d2))
                    new[j] = x[far]
                    d2[far] = 0.0
            new_labels, d2 = _assign(x, new)
            converged = np.array_equal(new_labels, labels) and np.allclose(new, centres, rtol=0, atol=1e-12)
            centres, labels = new, new_labels
            if converged:
                break
        inertia = float(d2.sum())
        if best is None or inertia < best[2]:
            best = (centres, labels, inertia)
    assert best is not None
    return best


@dataclass(frozen=True)
class HistogramDraw:
    """One sampled condition: ``histogram`` (float64, class blocks sum to 1), the mode, the cluster id (cluster
    mode) and the training-lesion index (empirical mode), for the synthesis metadata."""

    histogram: np.ndarray
    mode: str
    cluster: int | None = None
    source_index: int | None = None


@dataclass(frozen=True, eq=False)
class HistogramBank:
    """k-means centres over training lesions' histograms, plus the histograms themselves (empirical mode).

    ``centres`` is (k, n_classes * bins), ordered by the mean bin position of the first class block (cluster 0 =
    darkest texture), ``histograms`` (n, n_classes * bins), ``assignments`` (n,) the cluster of each training
    histogram. ``k_requested`` is the caller's k; ``k`` = min(k_requested, n lesions, distinct histograms).
    """

    centres: np.ndarray
    histograms: np.ndarray
    assignments: np.ndarray
    bins: int
    n_classes: int
    value_range: tuple[float, float]
    k_requested: int
    seed: int

    @property
    def k(self) -> int:
        return len(self.centres)

    @classmethod
    def fit(
        cls,
        histograms: Sequence[np.ndarray] | np.ndarray,
        k: int,
        *,
        seed: int,
        bins: int = N_BINS,
        value_range: tuple[float, float] = VALUE_RANGE,
        n_init: int = 4,
        max_iter: int = 100,
    ) -> HistogramBank:
        """Fit the bank on training histograms (each validated like an explicit one). Fewer lesions (or distinct
        histograms) than ``k`` → k is reduced to that number; it is recorded next to ``k_requested``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows = [np.asarray(h, dtype=np.float64) for h in histograms]
        if not rows:
            raise ValueError("no training histograms")
        dim = rows[0].size
        if dim % bins:
            raise ValueError(f"histogram length {dim} is not a multiple of bins={bins}")
        n_classes = dim // bins
        x = np.stack([validate_histogram(r, bins, n_classes) for r in rows])
        k_eff = min(k, len(np.unique(x, axis=0)))
        centres, labels, _ = kmeans(x, k_eff, seed=seed, n_init=n_init, max_iter=max_iter)
        order = np.argsort(centres[:, :bins] @ np.arange(bins), kind="stable")
        remap = np.empty_like(order)
        remap[order] = np.arange(len(order))
        return cls(
            centres=centres[order],
            histograms=x,
            assignments=remap[labels],
            bins=bins,
            n_classes=n_classes,
            value_range=_check_range(value_range),
            k_requested=k,
            seed=seed,
        )

    def sample(
        self,
        mode: Mode,
        rng: np.random.Generator,
        *,
        cluster: int | None = None,
        index: int | None = None,
        explicit: Sequence[float] | np.ndarray | None = None,
        perturbation: float = PERTURBATION,
    ) -> HistogramDraw:
        """Draw a condition. ``cluster``: centre ``cluster`` (uniform if None) perturbed (:func:`perturb_histogram`)
        and renormalised; ``empirical``: training histogram ``index`` (uniform if None); ``explicit``: the given
        vector, validated and renormalised (``rng`` unused).
        """
        if mode == "cluster":
            c = int(rng.integers(self.k)) if cluster is None else cluster
            if not 0 <= c < self.k:
                raise ValueError(f"cluster must be in 0..{self.k - 1}, got {c}")
            hist = perturb_histogram(self.centres[c], rng, perturbation, bins=self.bins)
            return HistogramDraw(histogram=hist, mode=mode, cluster=c)
        if mode == "empirical":
            i = int(rng.integers(len(self.histograms))) if index is None else index
            if not 0 <= i < len(self.histograms):
                raise ValueError(f"index must be in 0..{len(self.histograms) - 1}, got {i}")
            return HistogramDraw(histogram=self.histograms[i].copy(), mode=mode, source_index=i)
        if mode == "explicit":
            if explicit is None:
                raise ValueError("explicit mode needs an explicit histogram")
            return HistogramDraw(histogram=validate_histogram(explicit, self.bins, self.n_classes), mode=mode)
        raise ValueError(f"unknown histogram mode {mode!r} (cluster, empirical, explicit)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (floats written with full precision, so a round trip is exact)."""
        return {
            "format": BANK_FORMAT,
            "bins": self.bins,
            "n_classes": self.n_classes,
            "value_range": list(self.value_range),
            "k_requested": self.k_requested,
            "seed": self.seed,
            "centres": self.centres.tolist(),
            "histograms": self.histograms.tolist(),
            "assignments": [int(a) for a in self.assignments],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistogramBank:
        """Inverse of :meth:`to_dict`; raises ValueError on another format or inconsistent shapes."""
        if data.get("format") != BANK_FORMAT:
            raise ValueError(f"not a histogram bank: format {data.get('format')!r} != {BANK_FORMAT!r}")
        bins, n_classes = int(data["bins"]), int(data["n_classes"])
        centres = np.asarray(data["centres"], dtype=np.float64)
        hists = np.asarray(data["histograms"], dtype=np.float64)
        assignments = np.asarray(data["assignments"], dtype=np.int64)
        dim = bins * n_classes
        if centres.ndim != 2 or centres.shape[1] != dim or hists.ndim != 2 or hists.shape[1] != dim:
            raise ValueError(f"bank arrays must have {dim} columns")
        if assignments.shape != (len(hists),) or (
            assignments.size and not 0 <= assignments.min() <= assignments.max() < len(centres)
        ):
            raise ValueError("bank assignments do not match histograms / centres")
        lo, hi = data["value_range"]
        return cls(
            centres=centres,
            histograms=hists,
            assignments=assignments,
            bins=bins,
            n_classes=n_classes,
            value_range=_check_range((lo, hi)),
            k_requested=int(data["k_requested"]),
            seed=int(data["seed"]),
        )
