"""Distribution-level checks of the synthetic gate (issue 16): feature MMD, nearest-neighbour copy rate, seed diversity.

The per-sample checks (:mod:`lesionflow.quality.synthetic_checks`) judge one lesion at a time and cannot see a
generator that is faithful lesion by lesion but wrong as a population: one that collapses to a few textures,
or one that hands back its training lesions. Three statistics look at the set:

- **MMD ratio** (:func:`mmd_ratio`): kernel maximum mean discrepancy (RBF kernel, median-heuristic bandwidth;
  Gretton et al., "A Kernel Two-Sample Test", JMLR 13, 2012) between encoder features of the synthetic lesion
  ROIs and of the real *training* lesion ROIs, divided by the same quantity between two seeded halves of the real
  training ROIs (the scale a real-vs-real comparison of this size gives). ~1 = as close as real data is to
  itself; >> 1 = a different population. The test split never enters: the ROI store holds training ROIs only.
- **copy rate** (:func:`max_shift_flip_ncc`): share of lesions whose texture matches some real training lesion
  with normalized cross-correlation >= ``copy_ncc`` over integer shifts of up to :data:`MAX_SHIFT` voxels and
  the 8 axis flips (a copy that moved one voxel or was mirrored is still a copy).
- **seed diversity** (:func:`seed_diversity`): for lesions generated more than once for the *same* ROI and
  condition with different seeds, the mean pairwise ``1 - NCC`` inside the lesion (0 = every seed gives the
  same texture: mode collapse). Lesions of different ROIs are never compared (anatomy, not the generator,
  would make them differ).

Features (:func:`encoder_features`): the global average pool of the deepest encoder level of the project's own
segmenter network (:mod:`lesionflow.seg.networks`): the acceptance segmenter when the run has one, else a
seeded random-initialised UNet (:func:`random_encoder`). No pretrained 3D medical network is available offline;
random convolutional features are a recognised embedding for distribution distances on such data (Naeem et al.,
"Reliable Fidelity and Diversity Metrics for Generative Models", ICML 2020, Sec. 5: randomly initialised
embeddings; the UNet's instance norms make them blind to a global intensity offset, which the histogram W1 of
the per-sample checks covers).

Pure numpy/scipy/torch, no I/O; images are (c, x, y, z) float ROI crops in the store's axis order, masks (x, y, z).
A statistic that cannot be computed from its inputs is NaN; :func:`distribution_stats` says why in
``not_measured`` only where too few lesions exist (that NaN passes the gate); non-finite features or intensities
give a NaN without a reason, which fails it (never fail open).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial.distance import cdist

from lesionflow.quality.synthetic_checks import normalized_cross_correlation
from lesionflow.seeding import derive_seed, rng_for

if TYPE_CHECKING:
    import torch

#: largest integer shift (voxels, per axis) of the copy search
MAX_SHIFT = 2
#: the 8 axis flips of the copy search: which of the (x, y, z) axes are mirrored
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    tuple(a for a, f in enumerate(flags) if f) for flags in itertools.product((False, True), repeat=3)
)
#: fewest real ROIs for the baseline (two halves of at least 2: the unbiased estimate's minimum; the averaged
#: halvings keep the ratio's spread small even then) and synthetic ROIs for the MMD
MIN_REAL_ROIS = 4
MIN_SYNTHETIC_ROIS = 4
#: seeded halvings of the real ROIs the baseline is averaged over (one halving alone is a noisy denominator)
BASELINE_SPLITS = 16
#: widths of the random-initialised UNet encoder (its deepest level gives a 64-dim feature)
RANDOM_ENCODER_CHANNELS = (16, 32, 64)

FeatureFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------- MMD


@dataclass(frozen=True)
class MmdResult:
    """Kernel MMD of synthetic vs real-train features, with the real-train halves as the baseline.

    ``mmd2`` and ``baseline_mmd2`` are the unbiased estimates (U-statistics; 0 in expectation for the same
    distribution, so either may be slightly negative). ``ratio`` is what the gate bounds: the size-normalised
    biased estimates, ``MMD_b^2(S, R) / (1/m + 1/n)`` over ``MMD_b^2(A, B) / (1/a + 1/b)``. A ratio of the two
    unbiased estimates would be a ratio of two zero-mean noises under a healthy generator (and a negative
    baseline would let any synthetic set pass); the biased estimate is a squared RKHS norm (>= 0) whose
    expectation for the same distribution is ``(1/m + 1/n) (1 - E k(x, x'))``, so the normalised ratio is ~1
    for a synthetic set drawn like the real one whatever the set sizes, and grows with the discrepancy.
    """

    mmd2: float
    baseline_mmd2: float  # mean over the BASELINE_SPLITS halvings
    ratio: float
    bandwidth: float  # RBF sigma: median pairwise distance of the real features
    n_synthetic: int
    n_real: int


def median_bandwidth(features: np.ndarray) -> float:
    """The median heuristic: median Euclidean distance over the pairs of rows of ``features`` (NaN if < 2 rows)."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    d = cdist(x, x)
    return float(np.median(d[np.triu_indices(len(x), 1)]))


def _kernel(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-cdist(a, b, "sqeuclidean") / (2.0 * sigma * sigma))


def _mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> tuple[float, float]:
    """(unbiased MMD², size-normalised biased MMD²) of two feature sets (each >= 2 rows)."""
    kxx, kyy, kxy = _kernel(x, x, sigma), _kernel(y, y, sigma), _kernel(x, y, sigma)
    m, n = len(x), len(y)
    unbiased = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    unbiased -= 2.0 * kxy.mean()
    biased = kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    return float(unbiased), float(biased / (1.0 / m + 1.0 / n))


def mmd_ratio(synthetic: np.ndarray, real: np.ndarray, seed: int) -> MmdResult:
    """:class:`MmdResult` of ``synthetic`` (m, f) vs ``real`` (n, f) features. The baseline is the mean over
    :data:`BASELINE_SPLITS` halvings of the real rows, each a permutation from ``rng_for(seed, "mmd-halves", k)``
    (averaging narrows the spread of the ratio under a healthy generator: a single halving that happens to give a
    small baseline would fail a good set). The bandwidth comes from the real features only, so the synthetic set
    cannot move the scale it is judged on. Every value is NaN when a feature is not finite, a set is too small
    (< 2 synthetic, < 4 real) or the real features are all equal (no scale)."""
    s, r = np.asarray(synthetic, dtype=np.float64), np.asarray(real, dtype=np.float64)
    if s.ndim != 2 or r.ndim != 2 or s.shape[1] != r.shape[1]:
        raise ValueError(f"features must be (n, f) with the same f, got {s.shape} and {r.shape}")
    nan = float("nan")
    if len(s) < 2 or len(r) < 4 or not (np.all(np.isfinite(s)) and np.all(np.isfinite(r))):
        return MmdResult(nan, nan, nan, nan, len(s), len(r))
    sigma = median_bandwidth(r)
    if not sigma > 0:
        return MmdResult(nan, nan, nan, sigma, len(s), len(r))
    mmd2, normalised = _mmd2(s, r, sigma)
    halvings = []
    for k in range(BASELINE_SPLITS):
        order = rng_for(seed, "mmd-halves", k).permutation(len(r))
        halvings.append(_mmd2(r[order[: len(r) // 2]], r[order[len(r) // 2 :]], sigma))
    baseline, baseline_normalised = (float(v) for v in np.mean(halvings, axis=0))
    ratio = normalised / baseline_normalised if baseline_normalised > 0 else nan
    return MmdResult(mmd2, baseline, float(ratio), sigma, len(s), len(r))


# ----------------------------------------------------------------------------------- encoder features


def deepest_encoder_module(network: torch.nn.Module) -> torch.nn.Module:
    """The deepest encoder block of a :mod:`lesionflow.seg.networks` network: MONAI UNet's innermost skip
    connection's submodule (its bottom block), DynUNet's ``bottleneck``, SwinUNETR's ``encoder10``."""
    from monai.networks.layers import SkipConnection

    for name in ("bottleneck", "encoder10"):
        block = getattr(network, name, None)
        if block is not None:
            return block
    skips = [m for m in network.modules() if isinstance(m, SkipConnection)]
    if not skips:
        raise ValueError(f"no encoder bottom found in {type(network).__name__} (UNet, DynUNet, SwinUNETR expected)")
    return skips[-1].submodule  # modules() is depth-first: the last is innermost


def random_encoder(in_channels: int, seed: int) -> tuple[torch.nn.Module, int]:
    """(network, downsampling): a UNet of :data:`RANDOM_ENCODER_CHANNELS` with weights drawn from ``seed`` (a
    forked torch RNG: the global stream is untouched), in eval mode on CPU. Only its encoder is used."""
    import torch

    from lesionflow.seg.networks import NetworkConfig, build_network

    factor = 2 ** (len(RANDOM_ENCODER_CHANNELS) - 1)
    config = NetworkConfig("unet", in_channels, 2, RANDOM_ENCODER_CHANNELS, 1, (2 * factor,) * 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(config)
    return network.eval(), config.downsampling


def _padded(rois: np.ndarray, factor: int) -> np.ndarray:
    """``rois`` (n, c, x, y, z) edge-padded (both sides) so every edge is a multiple of ``factor``, at least 2x."""
    pads = [(0, 0), (0, 0)]
    for edge in rois.shape[2:]:
        target = max(2 * factor, -(-edge // factor) * factor)
        pads.append(((target - edge) // 2, target - edge - (target - edge) // 2))
    return np.pad(rois, pads, mode="edge") if any(p != (0, 0) for p in pads) else rois


def encoder_features(
    network: torch.nn.Module, rois: np.ndarray, downsampling: int, *, device: str = "cpu", batch: int = 16
) -> np.ndarray:
    """(n, f) float64: the global average pool of :func:`deepest_encoder_module`'s output for each ROI of ``rois``
    (n, c, x, y, z), edge-padded to fit the network's downsampling. One forward pass per ``batch`` ROIs."""
    import torch

    x = np.asarray(rois, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"rois must be (n, c, x, y, z), got shape {x.shape}")
    if len(x) == 0:
        return np.zeros((0, 0))
    x = _padded(x, downsampling)
    captured: list[torch.Tensor] = []
    hook = deepest_encoder_module(network).register_forward_hook(
        lambda _m, _i, out: captured.append(out.mean(dim=(2, 3, 4)).detach().cpu())
    )
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                network(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(device))
    finally:
        hook.remove()
    return torch.cat(captured).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------- copies


def _spatial_bool(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask) != 0
    if m.ndim != 3:
        raise ValueError(f"mask must be (x, y, z), got shape {m.shape}")
    return m


def max_shift_flip_ncc(
    sample: np.ndarray,
    mask: np.ndarray,
    references: np.ndarray,
    max_shift: int = MAX_SHIFT,
    flips: Sequence[tuple[int, ...]] = FLIPS,
) -> float:
    """Highest :func:`~lesionflow.quality.synthetic_checks.normalized_cross_correlation` between ``sample``'s
    voxels in ``mask`` and any of ``references`` (n, c, x, y, z; same shape as ``sample`` (c, x, y, z)), each
    flipped by any of ``flips`` (the mirrored axes; default all 8 of :data:`FLIPS`) and shifted by up to
    ``max_shift`` voxels per axis.

    The correlation is over the lesion's own voxels (all channels), read from the mask's bounding box moved by the
    shift in the flipped reference; a shift that leaves the reference is skipped. Lesion voxels only, not the
    whole box: a re-textured lesion keeps its real mask and anatomy, and the box's background would make every
    one of them look like its original. NaN for an empty mask, no reference, or non-finite lesion voxels;
    0.0 for a constant lesion (no evidence of a copy, as the pairwise function).
    """
    img = np.asarray(sample, dtype=np.float64)
    m = _spatial_bool(mask)
    refs = np.asarray(references, dtype=np.float64)
    if img.ndim != 4 or img.shape[1:] != m.shape:
        raise ValueError(f"sample shape {img.shape} does not match mask {m.shape} ((c, x, y, z))")
    if refs.ndim != 5 or refs.shape[1:] != img.shape:
        raise ValueError(f"references must be (n, *{img.shape}), got {refs.shape}")
    values = img[:, m].ravel()
    if not m.any() or len(refs) == 0 or not np.all(np.isfinite(values)):
        return float("nan")
    x = values - values.mean()
    if values.size < 2 or not float(x @ x) > 0:
        return 0.0
    x /= np.sqrt(float(x @ x))
    lo = np.argwhere(m).min(axis=0)
    hi = np.argwhere(m).max(axis=0) + 1
    inner = m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    best = -np.inf
    shape = np.asarray(m.shape)
    start = np.maximum(lo - max_shift, 0)  # the shifted boxes that stay inside the reference
    stop = np.minimum(hi + max_shift, shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    box = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    for axes in flips:
        flipped = np.flip(refs, axis=tuple(a + 2 for a in axes)) if axes else refs
        windows = np.lib.stride_tricks.sliding_window_view(flipped[(slice(None), slice(None), *region)], box, (2, 3, 4))
        picked = windows[..., inner]  # (n, c, sx, sy, sz, voxels): the lesion's voxels at every shift
        channels, voxels = picked.shape[1], picked.shape[-1]
        y = np.moveaxis(picked, 1, -2).reshape(len(refs), -1, channels * voxels)  # (n, shifts, c * voxels)
        y = y - y.mean(axis=-1, keepdims=True)
        norm = np.sqrt(np.einsum("...v,...v->...", y, y))
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc = np.where(norm > 0, (y @ x) / norm, 0.0)
        ncc = np.where(np.isfinite(ncc), ncc, -np.inf)  # a non-finite reference voxel: that alignment is skipped
        best = max(best, float(ncc.max()))
    return float(np.clip(best, -1.0, 1.0)) if np.isfinite(best) else float("nan")


# ----------------------------------------------------------------------------------- diversity


def seed_diversity(images: Sequence[np.ndarray], mask: np.ndarray) -> float:
    """Mean pairwise ``1 - NCC`` inside ``mask`` of ``images`` (each (c, x, y, z)): the same ROI and condition
    generated with different seeds. 0 = identical samples (mode collapse); NaN with fewer than 2 images."""
    if len(images) < 2:
        return float("nan")
    m = _spatial_bool(mask)
    pairs = itertools.combinations(range(len(images)), 2)
    return float(np.mean([1.0 - normalized_cross_correlation(images[i], images[j], m) for i, j in pairs]))


# ----------------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class SyntheticLesion:
    """One generated lesion as the distribution checks see it."""

    image: np.ndarray  # (c, x, y, z) ROI crop of the synthetic case around the lesion
    mask: np.ndarray  # (x, y, z) bool: the generated voxels
    new_texture: bool  # claims a new texture (LeFusion, DDPM/RePaint, DiffMask); False for a pasted copy
    #: (source case, ROI origin, condition) of a lesion that may be generated again with another seed; None = never
    group: Hashable | None = None
    name: str = ""  # the gate table's sample_id of this lesion (keys DistributionStats.nearest_ncc)


@dataclass(frozen=True)
class DistributionStats:
    """The distribution-level statistics of one synthetic set (NaN = not measured or not finite)."""

    mmd: MmdResult
    copy_rate: float  # share of new-texture lesions with max NCC >= copy_ncc (a non-finite NCC counts as a copy)
    n_copy_checked: int
    n_copies: int
    paste_copy_rate: float  # the same for pasted lesions: copies by construction, reported, never gated
    n_pasted: int
    seed_diversity: float  # mean over repeated (ROI, condition) groups of the mean pairwise 1 - NCC
    n_seed_groups: int
    copy_ncc: float
    encoder: str  # which features the MMD used
    #: SyntheticLesion.name -> its max NCC over the training lesions, shifts and flips (the copy search)
    nearest_ncc: Mapping[str, float] = field(default_factory=dict)
    #: statistic name (mmd_ratio, copy_rate, seed_diversity) -> why it was not measured (its NaN then passes)
    not_measured: Mapping[str, str] = field(default_factory=dict)

    @property
    def mmd_ratio(self) -> float:
        return self.mmd.ratio

    def summary(self) -> dict[str, float | int | str]:
        """The measured values for the stage summary."""
        return {
            "mmd_ratio": self.mmd.ratio,
            "mmd2": self.mmd.mmd2,
            "mmd2_baseline": self.mmd.baseline_mmd2,
            "mmd_encoder": self.encoder,
            "copy_rate": self.copy_rate,
            "n_copies": self.n_copies,
            "n_copy_checked": self.n_copy_checked,
            "paste_copy_rate": self.paste_copy_rate,
            "seed_diversity": self.seed_diversity,
            "n_seed_groups": self.n_seed_groups,
        }


def _copies(nccs: Sequence[float], threshold: float) -> int:
    return sum(not (v < threshold) for v in nccs)  # NaN is not below the threshold: it does not clear


def distribution_stats(
    synthetic: Sequence[SyntheticLesion],
    real_images: np.ndarray,
    features: FeatureFn,
    *,
    copy_ncc: float,
    seed: int,
    encoder: str,
) -> DistributionStats:
    """Every distribution statistic of ``synthetic`` against the real training lesion ROIs ``real_images``
    (n, c, x, y, z), with ``features`` mapping ROIs (k, c, x, y, z) to (k, f) features."""
    real = np.asarray(real_images)
    not_measured: dict[str, str] = {}
    if len(synthetic) < MIN_SYNTHETIC_ROIS or len(real) < MIN_REAL_ROIS:
        nan = float("nan")
        mmd = MmdResult(nan, nan, nan, nan, len(synthetic), len(real))
        not_measured["mmd_ratio"] = (
            f"{len(synthetic)} synthetic vs {len(real)} real training lesion ROIs: the MMD needs at least "
            f"{MIN_SYNTHETIC_ROIS} synthetic and {MIN_REAL_ROIS} real (two baseline halves of {MIN_REAL_ROIS // 2})"
        )
    else:
        mmd = mmd_ratio(features(np.stack([s.image for s in synthetic])), features(real), seed)
    found = [max_shift_flip_ncc(s.image, s.mask, real) if len(real) else float("nan") for s in synthetic]
    checked = [v for s, v in zip(synthetic, found, strict=True) if s.new_texture]
    pasted = [v for s, v in zip(synthetic, found, strict=True) if not s.new_texture]
    n_copies = _copies(checked, copy_ncc)
    copy_rate = n_copies / len(checked) if checked and len(real) else float("nan")
    paste_rate = _copies(pasted, copy_ncc) / len(pasted) if pasted else float("nan")
    if not checked:
        not_measured["copy_rate"] = "no lesion claims a new texture (pasted copies are copies by construction)"
    elif not len(real):
        not_measured["copy_rate"] = "no real training lesion to compare with"
    groups: dict[Hashable, list[SyntheticLesion]] = defaultdict(list)
    for s in synthetic:
        if s.group is not None:
            groups[s.group].append(s)
    repeated = [g for g in groups.values() if len(g) > 1]
    values = [seed_diversity([s.image for s in g], np.logical_or.reduce([s.mask for s in g])) for g in repeated]
    diversity = float(np.mean(values)) if values else float("nan")
    if not repeated:
        not_measured["seed_diversity"] = (
            "not measurable: no ROI was generated twice with the same condition (synth.relesion_per_case >= 2 "
            "re-textures each real lesion once per sample, with its own seed)"
        )
    return DistributionStats(
        mmd=mmd,
        copy_rate=float(copy_rate),
        n_copy_checked=len(checked),
        n_copies=n_copies,
        paste_copy_rate=float(paste_rate),
        n_pasted=len(pasted),
        seed_diversity=diversity,
        n_seed_groups=len(repeated),
        copy_ncc=copy_ncc,
        encoder=encoder,
        nearest_ncc={s.name: v for s, v in zip(synthetic, found, strict=True) if s.name},
        not_measured=not_measured,
    )


def gate_seed(*parts: int | str) -> int:
    """The seed of the gate's random choices (encoder weights, baseline halves), derived from ``parts``."""
    return derive_seed("validate-synthetic", *parts)
