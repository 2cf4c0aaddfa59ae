"""LeFusion's histogram texture control: lesion histograms, the k-means bank and its sampling modes.

Reference: generative.md §2.3, §2.7, §9.2.4. A lesion histogram is ``h_k = #{v in M : I(v) in bin_k} / |M|`` over
the *normalised* intensities (default 16 bins over [-1, 1]); values outside the range are clipped into the edge
bins, so every histogram of a non-empty mask sums to 1. Images are (c, x, y, z) or (x, y, z), masks (x, y, z).
A multi-class condition is the concatenation of per-class histograms (zeros for an absent class), so a vector of
``n_classes * bins`` values whose non-empty blocks each sum to 1. The all-zero block is the "absent" value the
network sees at training for a class the lesion does not contain, so a draw gives it to every class the *target*
mask lacks and a histogram to every class it holds.

The bank is **per class** (docs/decisions.md, "Per-class histogram banks"): class ``i`` has its own k-means centres,
fitted on block ``i`` of the training lesions that contain class ``i`` (zero blocks never enter a fit, so no centre
is a blend of "present" and "absent"). One class is the single bank it always was.

Sampling modes (:meth:`HistogramBank.sample`), each per class present in the target: ``cluster`` (a k-means centre
with the ±10 % per-bin seeded perturbation of LeFusion's ``perturb_tensor``, then renormalised per class block —
the original did not renormalise), ``empirical`` (the block of a real training lesion holding that class),
``explicit`` (a caller's vector, validated and renormalised, absent classes' blocks zeroed). Every random choice
takes an explicit ``numpy.random.Generator``.
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
BANK_FORMAT = "lesionflow.histogram_bank/2"
_SINGLE_BANK_FORMAT = "lesionflow.histogram_bank/1"  # one joint bank; still read for one class (same meaning)
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
    """One sampled condition: ``histogram`` (float64, the blocks of present classes sum to 1, absent ones are 0),
    the mode, per class the cluster (cluster mode) or training-lesion index (empirical mode) it came from (None for
    an absent class), and ``cluster`` / ``source_index``: those of the first present class, for the metadata."""

    histogram: np.ndarray
    mode: str
    cluster: int | None = None
    source_index: int | None = None
    clusters: tuple[int | None, ...] = ()
    sources: tuple[int | None, ...] = ()


def _first(values: Sequence[int | None]) -> int | None:
    return next((v for v in values if v is not None), None)


@dataclass(frozen=True, eq=False)
class HistogramBank:
    """Per-class k-means centres over training lesions' histograms, plus the histograms themselves (empirical mode).

    ``class_centres[i]`` is (k_i, bins): the centres of class ``i`` over block ``i`` of the lesions that contain it,
    ordered by mean bin position (cluster 0 = darkest texture); empty (0, bins) for a class no lesion holds.
    ``histograms`` is (n, n_classes * bins), ``class_assignments[i]`` (n,) the class-``i`` cluster of each training
    lesion (-1 where it lacks class ``i``). ``k_requested`` is the caller's k; each ``k_i`` = min(k_requested,
    distinct class-``i`` histograms). ``value_range`` is the histogram support, also the generator's x0 clamp.
    """

    class_centres: tuple[np.ndarray, ...]
    histograms: np.ndarray
    class_assignments: tuple[np.ndarray, ...]
    bins: int
    n_classes: int
    value_range: tuple[float, float]
    k_requested: int
    seed: int

    @property
    def k(self) -> int:
        """The smallest per-class k among the classes that have training lesions (the one bank_k limits most)."""
        return min((len(c) for c in self.class_centres if len(c)), default=0)

    @property
    def centres(self) -> np.ndarray:
        """(k, bins) centres of a one-class bank (a multi-class bank has ``class_centres``, one set per class)."""
        return self._only(self.class_centres, "class_centres")

    @property
    def assignments(self) -> np.ndarray:
        """(n,) cluster of each training histogram, for a one-class bank (else ``class_assignments``)."""
        return self._only(self.class_assignments, "class_assignments")

    def _only(self, per_class: tuple[np.ndarray, ...], name: str) -> np.ndarray:
        if self.n_classes != 1:
            raise ValueError(f"a {self.n_classes}-class bank has one set per class: use {name}")
        return per_class[0]

    def members(self, i: int) -> np.ndarray:
        """Indices of the training lesions that contain class ``i`` (a non-zero block ``i``)."""
        return np.flatnonzero(self.histograms[:, i * self.bins : (i + 1) * self.bins].sum(axis=1) > 0)

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
        """Fit one k-means bank per class on training histograms (each validated like an explicit one; class ``i``
        uses block ``i`` of the lesions containing it). Fewer lesions (or distinct histograms) of a class than ``k``
        → that class's k is reduced to that number; ``k_requested`` keeps the caller's.
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
        all_centres, all_assignments = [], []
        for i in range(n_classes):
            block = x[:, i * bins : (i + 1) * bins]
            members = np.flatnonzero(block.sum(axis=1) > 0)
            assignments = np.full(len(x), -1, dtype=np.int64)
            if members.size == 0:  # a class without training lesions: nothing to draw from (draws say so)
                all_centres.append(np.zeros((0, bins)))
                all_assignments.append(assignments)
                continue
            xi = block[members]
            k_eff = min(k, len(np.unique(xi, axis=0)))
            # the same seed for every class: one class reproduces the single-class bank exactly
            centres, labels, _ = kmeans(xi, k_eff, seed=seed, n_init=n_init, max_iter=max_iter)
            order = np.argsort(centres @ np.arange(bins), kind="stable")
            remap = np.empty_like(order)
            remap[order] = np.arange(len(order))
            assignments[members] = remap[labels]
            all_centres.append(centres[order])
            all_assignments.append(assignments)
        return cls(
            class_centres=tuple(all_centres),
            histograms=x,
            class_assignments=tuple(all_assignments),
            bins=bins,
            n_classes=n_classes,
            value_range=_check_range(value_range),
            k_requested=k,
            seed=seed,
        )

    def _present(self, present: Sequence[bool] | np.ndarray | None) -> np.ndarray:
        if present is None:
            if self.n_classes != 1:
                raise ValueError(
                    f"a {self.n_classes}-class bank draws only for the classes the target mask contains: pass "
                    "present (one bool per class)"
                )
            return np.ones(1, dtype=bool)
        p = np.asarray(present, dtype=bool).reshape(-1)
        if p.size != self.n_classes or not p.any():
            raise ValueError(
                f"present must flag {self.n_classes} class(es) with at least one True, got {np.asarray(present)}"
            )
        return p

    def sample(
        self,
        mode: Mode,
        rng: np.random.Generator,
        *,
        present: Sequence[bool] | np.ndarray | None = None,
        cluster: int | None = None,
        index: int | None = None,
        explicit: Sequence[float] | np.ndarray | None = None,
        perturbation: float = PERTURBATION,
    ) -> HistogramDraw:
        """Draw a condition for a target whose class masks are non-empty where ``present`` (C bools; None = the one
        class of a one-class bank). Absent classes get the all-zero block (the training "absent" value); each
        present class ``i`` in order gets, by ``mode``: ``cluster``: centre ``cluster`` of class ``i`` (uniform if
        None) perturbed (:func:`perturb_histogram`) and renormalised; ``empirical``: block ``i`` of training
        lesion ``index`` (uniform among the lesions holding class ``i`` if None); ``explicit``: block ``i`` of the
        given vector, validated and renormalised (``rng`` unused). A present class without training lesions (or
        an explicit all-zero block for it) is a ValueError.
        """
        p = self._present(present)
        b = self.bins
        if mode == "explicit":
            if explicit is None:
                raise ValueError("explicit mode needs an explicit histogram")
            hist = validate_histogram(explicit, b, self.n_classes)
            blocks = hist.reshape(self.n_classes, b)
            missing = [i for i in range(self.n_classes) if p[i] and not blocks[i].any()]
            if missing:
                raise ValueError(
                    f"the explicit histogram has an all-zero block for class index(es) {missing}, which the target "
                    "mask contains; give every present class a histogram"
                )
            blocks[~p] = 0.0  # absent classes: the training "absent" value
            return HistogramDraw(histogram=blocks.reshape(-1), mode=mode)
        if mode not in ("cluster", "empirical"):
            raise ValueError(f"unknown histogram mode {mode!r} (cluster, empirical, explicit)")
        out = np.zeros(self.n_classes * b)
        picks: list[int | None] = [None] * self.n_classes
        for i in np.flatnonzero(p):
            if len(self.class_centres[i]) == 0:
                raise ValueError(
                    f"class index {i} has no training lesion, so the bank has no histogram for it; the target mask "
                    "contains it (add training lesions of that class)"
                )
            if mode == "cluster":
                centres = self.class_centres[i]
                c = int(rng.integers(len(centres))) if cluster is None else cluster
                if not 0 <= c < len(centres):
                    raise ValueError(f"cluster must be in 0..{len(centres) - 1}, got {c}")
                out[i * b : (i + 1) * b] = perturb_histogram(centres[c], rng, perturbation, bins=b)
                picks[i] = c
            else:
                members = self.members(int(i))
                j = int(members[rng.integers(len(members))]) if index is None else index
                if j not in members:
                    raise ValueError(
                        f"index must be one of the {len(members)} training lesions holding class index {i} "
                        f"(0..{len(self.histograms) - 1}), got {j}"
                    )
                out[i * b : (i + 1) * b] = self.histograms[j, i * b : (i + 1) * b]
                picks[i] = j
        if mode == "cluster":
            return HistogramDraw(histogram=out, mode=mode, cluster=_first(picks), clusters=tuple(picks))
        return HistogramDraw(histogram=out, mode=mode, source_index=_first(picks), sources=tuple(picks))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (floats written with full precision, so a round trip is exact); per-class lists."""
        return {
            "format": BANK_FORMAT,
            "bins": self.bins,
            "n_classes": self.n_classes,
            "value_range": list(self.value_range),
            "k_requested": self.k_requested,
            "seed": self.seed,
            "centres": [c.tolist() for c in self.class_centres],
            "histograms": self.histograms.tolist(),
            "assignments": [[int(a) for a in ca] for ca in self.class_assignments],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistogramBank:
        """Inverse of :meth:`to_dict` (also reads a one-class bank of the former joint format); raises ValueError
        on another format or inconsistent shapes."""
        fmt = data.get("format")
        if fmt not in (BANK_FORMAT, _SINGLE_BANK_FORMAT):
            raise ValueError(f"not a histogram bank: format {fmt!r} != {BANK_FORMAT!r}")
        bins, n_classes = int(data["bins"]), int(data["n_classes"])
        if fmt == _SINGLE_BANK_FORMAT:
            if n_classes != 1:
                raise ValueError(
                    f"the histogram bank has the joint {n_classes}-class format of an older lesionflow; rerun "
                    "`lesionflow stage train-generator` to fit per-class banks"
                )
            centres_in, assignments_in = [data["centres"]], [data["assignments"]]
        else:
            centres_in, assignments_in = list(data["centres"]), list(data["assignments"])
        hists = np.asarray(data["histograms"], dtype=np.float64)
        if hists.ndim != 2 or hists.shape[1] != bins * n_classes:
            raise ValueError(f"bank histograms must have {bins * n_classes} columns")
        if len(centres_in) != n_classes or len(assignments_in) != n_classes:
            raise ValueError(f"bank must hold centres and assignments for {n_classes} class(es)")
        centres = tuple(np.asarray(c, dtype=np.float64).reshape(-1, bins) for c in centres_in)
        assignments = tuple(np.asarray(a, dtype=np.int64).reshape(-1) for a in assignments_in)
        for c, a in zip(centres, assignments, strict=True):
            if a.shape != (len(hists),) or (a.size and not -1 <= a.min() <= a.max() < max(len(c), 1)):
                raise ValueError("bank assignments do not match histograms / centres")
        lo, hi = data["value_range"]
        return cls(
            class_centres=centres,
            histograms=hists,
            class_assignments=assignments,
            bins=bins,
            n_classes=n_classes,
            value_range=_check_range((lo, hi)),
            k_requested=int(data["k_requested"]),
            seed=int(data["seed"]),
        )
