"""DiffMask: a DDPM over lesion *masks*, steered by a bounding sphere.

References:

- [LeFusion] H. Zhang, Y. Liu, J. Yang, S. Wan, X. Wang, W. Peng, P. Fua, "LeFusion: Controllable Pathology
  Synthesis via Lesion-Focused Diffusion Models", ICLR 2025, https://arxiv.org/abs/2403.14066 -- DiffMask, its
  lesion mask diffusion controlled by a bounding sphere (size, location, boundary); authors' code
  https://github.com/M3DV/LeFusion (``DiffMask/``).
- Sampling: [DDPM] J. Ho, A. Jain, P. Abbeel, NeurIPS 2020, https://arxiv.org/abs/2006.11239, Algorithm 2, or
  [DDIM] J. Song, C. Meng, S. Ermon, ICLR 2021, https://arxiv.org/abs/2010.02502, Eq. 12 (see
  :mod:`lesionflow.diffusion.samplers`).

Contracts
- Arrays are (x, y, z); masks are bool; spheres (:class:`~lesionflow.synth.placement.Sphere`) are in voxels of
  the ROI they refer to. The model sees the mask mapped to {-1, 1} (False -> -1, True -> +1) plus one condition
  channel, :func:`~lesionflow.synth.placement.sphere_channel` of the lesion's bounding sphere (+1 inside, -1
  outside), concatenated to ``x_t`` at every step; it predicts eps of the mask channel only (in 2, out 1, no
  vector condition). Training uses the L1 eps loss over the whole volume, as the authors do.
- Every random draw takes an explicit generator: training batch ``i`` is a pure function of ``(seed, i)``,
  sampling draws only from the ``torch.Generator`` passed in (on the model's device), so the same generator
  seed gives the same masks.
- :func:`postprocess_mask` turns a raw sample (about [-1, 1]) into a bool mask of the **same shape**: threshold,
  hole filling, volume-dependent Gaussian smoothing, largest 26-connected component, optional zoom about a
  centre on the same voxel grid (our fix of the authors' 1.5x zoom that changed the ROI geometry,
  https://github.com/HINTLab/LeFusion/issues/10; default 1.0 = no zoom), intersection with the organ. The result
  is empty or one 26-connected component inside the organ; an empty result is returned, not raised (the caller
  reports it).
- :func:`generate_sized_mask` makes a *new* lesion's mask whose voxel count follows the training lesions' sizes
  (the gate's volume KS test, :func:`lesionflow.quality.synthetic_checks.volume_ks`): a target size drawn from the
  training sizes (clipped to their ``size_quantiles``), then rejection sampling -- up to ``size_tries`` batched
  chains of ``size_batch`` masks, try ``k`` seeded by ``(seed, "diffmask-size", k)`` -- accepting the first mask
  that is one component off the ROI border with a voxel count inside the quantile window and within
  ``size_tolerance`` of the target; when none is, the candidate nearest the target in log size is rescaled about
  the sphere centre to the target (zoom on the same grid). Counts of tries and rejections come back for the log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from lesionflow.diffusion.samplers import ddim_sample, ddpm_sample
from lesionflow.diffusion.schedules import NoiseSchedule, cosine_schedule
from lesionflow.diffusion.trainer import GeneratorTrainOutcome, eps_loss, train_generator
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig, make_eps_fn
from lesionflow.params_synth import DiffMaskParams
from lesionflow.seeding import derive_seed, rng_for, torch_generator
from lesionflow.seg.dice import dice
from lesionflow.synth.placement import Sphere, sphere_channel, sphere_mask
from lesionflow.synth.rois import Roi

__all__ = [
    "SMOOTHING_TABLE",
    "MaskSample",
    "SizeWindow",
    "SizedMask",
    "check_sphere_in_organ",
    "generate_masks",
    "generate_sized_mask",
    "make_diffmask_model",
    "mask_training_batches",
    "noise_schedule",
    "postprocess_mask",
    "sample_mask_raw",
    "train_diffmask",
]

# Volume-dependent smoothing, rows (upper voxel bound exclusive, sigma, threshold on the smoothed [0, 1] mask).
# Only the end rows are documented for the authors' table (< 20 voxels: sigma 0.5, thr 0.01; >= 10 000: sigma 2);
# the rows between are ours, interpolated. Tiny masks get a very low threshold so smoothing rounds them off
# (it grows them by about the 6-neighbourhood) instead of erasing them; larger masks use thresholds near 0.5,
# which keep the volume roughly unchanged while removing single-voxel spurs and staircase edges.
SMOOTHING_TABLE: tuple[tuple[float, float, float], ...] = (
    (20, 0.5, 0.01),
    (100, 0.75, 0.3),
    (1_000, 1.0, 0.4),
    (10_000, 1.5, 0.5),
    (math.inf, 2.0, 0.5),
)

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def noise_schedule(params: DiffMaskParams) -> NoiseSchedule:
    """The cosine schedule of ``params.timesteps`` steps (Nichol & Dhariwal https://arxiv.org/abs/2102.09672
    Eq. 17, s = 0.008; the authors' code: T = 300), for training and sampling alike."""
    return cosine_schedule(params.timesteps, s=0.008)


def make_diffmask_model(params: DiffMaskParams) -> ConditionalUNet3D:
    """The eps network: in = (noised mask, sphere channel), out = eps of the mask, no vector condition; the
    architecture (width, levels, attention) of ``params``."""
    config = UNetConfig(
        in_channels=2,
        out_channels=1,
        base_channels=params.base_channels,
        channel_mults=tuple(params.channel_mults),
        attention_levels=tuple(params.attention_levels),
        cond_dim=0,
    )
    return ConditionalUNet3D(config)


def _check_rois(rois: Sequence[Roi]) -> None:
    if not rois:
        raise ValueError("no lesion ROIs: the training cases have no labelled lesion")
    size = rois[0].mask.shape
    for r in rois:
        where = f"ROI case {r.case_id!r} lesion index {r.index}"
        if r.sphere is None:
            raise ValueError(f"{where} has no bounding sphere (a candidate ROI?); DiffMask trains on lesion ROIs")
        if not r.mask.any():
            raise ValueError(f"{where} has an empty mask; DiffMask needs at least one lesion voxel")
        if r.mask.shape != size:
            raise ValueError(f"{where} has shape {r.mask.shape}, the first ROI {size}; use one ROI size")


def mask_training_batches(rois: Sequence[Roi], batch_size: int, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(i)``: micro-batch ``i`` as a pure function of (seed, i): ROIs drawn uniformly, each flipped
    along x with probability 1/2, mask and sphere channel flipped together. Keys: ``image`` (B, 1, *size)
    float32 in {-1, 1} (the mask), ``channels`` (B, 1, *size) float32 (the sphere channel, +1 inside)."""
    _check_rois(rois)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = rois[0].mask.shape
    images = np.stack([np.where(r.mask, 1.0, -1.0).astype(np.float32) for r in rois])[:, None]
    spheres = np.stack([sphere_channel(size, r.sphere) for r in rois if r.sphere is not None])[:, None]

    def batches(i: int) -> dict[str, torch.Tensor]:
        rng = rng_for(seed, "diffmask-batch", i)
        pick = rng.integers(len(rois), size=batch_size)
        flip = rng.random(batch_size) < 0.5
        image, channels = images[pick].copy(), spheres[pick].copy()
        # Flipping the rendered channel is exact: the flipped sphere (centre n-1-c) renders to the flipped array,
        # so the control stays the bounding sphere of the flipped mask.
        image[flip] = image[flip][:, :, ::-1]
        channels[flip] = channels[flip][:, :, ::-1]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "channels": torch.from_numpy(np.ascontiguousarray(channels)),
        }

    return batches


def train_diffmask(
    rois: Sequence[Roi],
    params: DiffMaskParams,
    checkpoint_root: Path,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    warn: Callable[[str], None] = print,
) -> GeneratorTrainOutcome:
    """Train DiffMask on lesion ROIs (L1 eps loss over the whole volume; network, schedule and optimisation from
    ``params``); use ``outcome.best`` for sampling."""
    batches = mask_training_batches(rois, params.batch_size, seed)
    # Weight init is the only draw from torch's global RNG; fork it so callers' global state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "diffmask-init"))
        model = make_diffmask_model(params)
    schedule = noise_schedule(params)
    loss = partial(eps_loss, schedule=schedule, kind="l1")  # no "mask" key: mean over every voxel
    return train_generator(model, batches, loss, schedule, params, checkpoint_root, device, seed, warn)


def sample_mask_raw(
    model: ConditionalUNet3D,
    params: DiffMaskParams,
    shape: tuple[int, int, int],
    sphere: Sphere,
    generator: torch.Generator,
    batch: int = 1,
) -> np.ndarray:
    """``batch`` raw masks (batch, x, y, z) float32 in about [-1, 1], all steered by ``sphere``, in one batched
    reverse chain. ``generator`` must live on the model's device; the same generator state gives the same output."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints (x, y, z), got {shape}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = next(model.parameters()).device
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model on {device}; create it on {device}")
    control = torch.from_numpy(sphere_channel(shape, sphere)).to(device)
    channels = control[None, None].expand(batch, 1, *shape)
    eps_fn = make_eps_fn(model.eval(), channels=channels)
    out_shape = (batch, 1, *shape)
    # x0 is clipped to [-1, 1] at every step: the data are {-1, 1} masks, and clipping keeps an undertrained
    # model's chain from drifting (the default of the DDPM code the authors build on).
    if params.ddim_steps > 0:
        # DDIM, eta = 0 ([DDIM] Eq. 12, https://arxiv.org/abs/2010.02502)
        out = ddim_sample(
            eps_fn, out_shape, noise_schedule(params), steps=params.ddim_steps, generator=generator, clip_denoised=True
        )
    else:
        # ancestral DDPM over all T steps, as the authors ([DDPM] Algorithm 2, https://arxiv.org/abs/2006.11239)
        out = ddpm_sample(eps_fn, out_shape, noise_schedule(params), generator=generator, clip_denoised=True)
    return np.asarray(out[:, 0].float().cpu().numpy(), dtype=np.float32)


def _largest_component(mask: np.ndarray, centre: Sequence[float] | None) -> np.ndarray:
    """The largest 26-connected component; ties go to the one whose centroid is nearest ``centre`` (if given),
    then to the lowest label (raster-scan order)."""
    labels, n = ndimage.label(mask, structure=_FULL)
    if n <= 1:
        return np.asarray(labels > 0)
    sizes = np.bincount(labels.ravel())[1:]
    best = np.flatnonzero(sizes == sizes.max()) + 1
    if len(best) > 1 and centre is not None:
        centroids = np.array(ndimage.center_of_mass(mask, labels, best))
        best = best[[int(np.argmin(np.linalg.norm(centroids - np.asarray(centre, dtype=np.float64), axis=1)))]]
    return np.asarray(labels == best[0])


def _smooth(mask: np.ndarray) -> np.ndarray:
    voxels = int(mask.sum())
    sigma, thr = next((s, t) for bound, s, t in SMOOTHING_TABLE if voxels < bound)
    return np.asarray(ndimage.gaussian_filter(mask.astype(np.float32), sigma, mode="constant") > thr)


def _zoom(mask: np.ndarray, factor: float, centre: Sequence[float]) -> np.ndarray:
    """Scale the mask by ``factor`` about ``centre`` on the same voxel grid and shape: output voxel ``o`` reads
    the input at ``c + (o - c) / factor`` (trilinear on the 0/1 mask, then > 0.5)."""
    c = np.asarray(centre, dtype=np.float64)
    scaled = ndimage.affine_transform(
        mask.astype(np.float32),
        np.full(3, 1.0 / factor),
        offset=c - c / factor,
        order=1,
        mode="constant",
        cval=0.0,
    )
    return np.asarray(scaled > 0.5)


def postprocess_mask(
    raw: np.ndarray,
    organ: np.ndarray | None,
    params: DiffMaskParams,
    *,
    centre: Sequence[float] | None = None,
) -> np.ndarray:
    """Bool (x, y, z) mask of ``raw``'s shape: empty or one 26-connected component inside ``organ > 0``.

    Steps: threshold ``(raw + 1) / 2 > params.threshold``; fill holes; smooth with the
    :data:`SMOOTHING_TABLE` row of the mask's volume and re-threshold; keep the largest component (ties: nearest
    ``centre``); zoom by ``params.zoom`` about ``centre`` (default: the mask centroid) keeping the grid (1.0
    leaves the mask untouched); intersect with the organ; keep the largest component again (a zoom below 1 or
    the organ can split it).
    """
    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise ValueError(f"raw must be a 3D (x, y, z) array, got shape {raw.shape}")
    if organ is not None and np.shape(organ) != raw.shape:
        raise ValueError(f"organ shape {np.shape(organ)} != raw shape {raw.shape}")
    mask = (raw.astype(np.float64) + 1.0) / 2.0 > params.threshold
    mask = np.asarray(ndimage.binary_fill_holes(mask))
    if not mask.any():
        return mask
    mask = _largest_component(_smooth(mask), centre)
    if params.zoom != 1.0 and mask.any():
        about = centre if centre is not None else tuple(float(v) for v in np.argwhere(mask).mean(axis=0))
        mask = _zoom(mask, params.zoom, about)
    if organ is not None:
        mask &= np.asarray(organ) > 0
    return _largest_component(mask, centre)


@dataclass(frozen=True, eq=False)
class MaskSample:
    """One generated mask: ``mask`` bool (x, y, z), the ``sphere`` that steered it, its voxel count and
    ``sphere_dice`` = :func:`lesionflow.seg.dice.dice` (mask, voxels of the sphere) (0 for an empty mask, the
    sphere being non-empty), a realism statistic (§9.7 item 9)."""

    mask: np.ndarray
    sphere: Sphere
    voxels: int
    sphere_dice: float


def generate_masks(
    model: ConditionalUNet3D,
    params: DiffMaskParams,
    shape: tuple[int, int, int],
    sphere: Sphere,
    organ: np.ndarray | None,
    generator: torch.Generator,
    count: int = 1,
) -> list[MaskSample]:
    """``count`` masks for ``sphere`` from one batched chain, each post-processed about the sphere centre.
    Masks may be empty (``voxels == 0``); the caller decides what to report or redraw."""
    raw = sample_mask_raw(model, params, shape, sphere, generator, batch=count)
    ball = sphere_mask(shape, sphere.centre, sphere.radius)
    out = []
    for r in raw:
        mask = postprocess_mask(r, organ, params, centre=sphere.centre)
        out.append(MaskSample(mask=mask, sphere=sphere, voxels=int(mask.sum()), sphere_dice=dice(mask, ball)))
    return out


@dataclass(frozen=True)
class SizeWindow:
    """Voxel counts a new mask may have: ``[low, high]``, the ``size_quantiles`` of the training lesion sizes
    ``sizes`` (sorted voxel counts, as the gate's real side: :attr:`lesionflow.synth.rois.Roi.voxels`)."""

    low: int
    high: int
    sizes: tuple[int, ...]

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], quantiles: tuple[float, float]) -> SizeWindow:
        values = np.sort(np.asarray([int(v) for v in sizes if int(v) > 0], dtype=np.int64))
        if values.size == 0:
            raise ValueError("no training lesion sizes: DiffMask size matching needs the lesion ROIs (data/rois)")
        low, high = (float(v) for v in np.quantile(values, quantiles))
        return cls(math.floor(low), math.ceil(high), tuple(int(v) for v in values))

    def target(self, rng: np.random.Generator) -> int:
        """A training lesion size drawn uniformly, clipped into the window."""
        return int(np.clip(self.sizes[int(rng.integers(len(self.sizes)))], self.low, self.high))


@dataclass(frozen=True, eq=False)
class SizedMask:
    """A new lesion mask from :func:`generate_sized_mask`: the ``sample``, the ``target`` voxel count, the
    ``candidates`` drawn, how many were ``rejected`` and whether the kept one was ``rescaled`` to the target."""

    sample: MaskSample
    target: int
    candidates: int
    rejected: int
    rescaled: bool

    @property
    def note(self) -> str:
        how = "rescaled to the target" if self.rescaled else "accepted"
        return (
            f"diffmask size: {self.rejected} of {self.candidates} candidate(s) rejected, target {self.target} "
            f"voxels, {how} ({self.sample.voxels} voxels)"
        )


def _touches_border(mask: np.ndarray) -> bool:
    return bool(
        mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any() or mask[..., 0].any()
        or mask[..., -1].any()
    )  # fmt: skip


def _rescale(mask: np.ndarray, target: int, centre: Sequence[float], organ: np.ndarray | None) -> np.ndarray:
    """``mask`` zoomed about ``centre`` on its grid so its voxel count approaches ``target`` (volume scales with
    the cube of the zoom; three refinements absorb the voxelization), cut to the organ, largest component kept."""
    factor, best = 1.0, mask
    for _ in range(3):
        factor *= (target / max(int(best.sum()), 1)) ** (1.0 / 3.0)
        scaled = _zoom(mask, factor, centre)
        if organ is not None:
            scaled &= np.asarray(organ) > 0
        scaled = _largest_component(scaled, centre)
        if scaled.any():
            best = scaled
        if abs(math.log(max(int(best.sum()), 1) / target)) < 0.1:
            break
    return best


def generate_sized_mask(
    model: ConditionalUNet3D,
    params: DiffMaskParams,
    shape: tuple[int, int, int],
    sphere: Sphere,
    organ: np.ndarray | None,
    window: SizeWindow,
    seed: int,
) -> SizedMask:
    """One new lesion mask for ``sphere`` whose voxel count follows the training sizes (module docstring).

    A pure function of the model, the inputs and ``seed``: the target comes from ``rng_for(seed,
    "diffmask-target")``, try ``k``'s chain from ``torch_generator(seed, "diffmask-size", k)`` on the model's
    device. With ``params.size_tries == 0`` it is the first mask of one chain, unchecked (the unmatched
    behaviour). The mask is empty only when every candidate was; otherwise one 26-connected component inside
    ``organ``.
    """
    device = next(model.parameters()).device
    target = window.target(rng_for(seed, "diffmask-target"))
    ball = sphere_mask(shape, sphere.centre, sphere.radius)
    low = max(window.low, math.floor(target / params.size_tolerance))
    high = min(window.high, math.ceil(target * params.size_tolerance))
    tries, batch = (params.size_tries, params.size_batch) if params.size_tries else (1, 1)
    drawn: list[np.ndarray] = []
    for k in range(tries):
        generator = torch_generator(seed, "diffmask-size", k, device=device)
        for sample in generate_masks(model, params, shape, sphere, organ, generator, count=batch):
            drawn.append(sample.mask)
            ok = low <= sample.voxels <= high and not _touches_border(sample.mask)
            if ok or not params.size_tries:
                return SizedMask(sample, target, len(drawn), len(drawn) - 1, rescaled=False)
    # No candidate of the target size: rescale the nearest one (off the border first, then in log size).
    usable = [m for m in drawn if m.any()]
    if not usable:
        empty = MaskSample(mask=drawn[0], sphere=sphere, voxels=0, sphere_dice=0.0)
        return SizedMask(empty, target, len(drawn), len(drawn), rescaled=False)
    nearest = min(usable, key=lambda m: (_touches_border(m), abs(math.log(int(m.sum()) / target))))
    mask = _rescale(nearest, target, sphere.centre, organ)
    sample = MaskSample(mask=mask, sphere=sphere, voxels=int(mask.sum()), sphere_dice=dice(mask, ball))
    return SizedMask(sample, target, len(drawn), len(drawn), rescaled=True)


def check_sphere_in_organ(sphere: Sphere, organ: np.ndarray, case_id: str = "") -> None:
    """Raise ValueError (one line: case, sphere, fix) unless every voxel of the sphere (voxel centres within
    ``radius`` of ``centre``, as :func:`~lesionflow.synth.placement.sphere_mask`) is an organ voxel inside the
    volume."""
    organ = np.asarray(organ)
    if organ.ndim != 3:
        raise ValueError(f"organ must be a 3D (x, y, z) array, got shape {organ.shape}")
    c = np.asarray(sphere.centre, dtype=np.float64)
    r = float(sphere.radius)
    if c.shape != (3,) or not np.all(np.isfinite(c)) or not math.isfinite(r) or r < 0:
        raise ValueError(f"invalid sphere {sphere}: need a finite (x, y, z) centre and a finite radius >= 0")
    # Lattice points of the sphere's bounding box, then those within the radius (may reach outside the volume).
    lo, hi = np.floor(c - r).astype(int), np.ceil(c + r).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
    points = grid.reshape(-1, 3)
    points = points[((points - c) ** 2).sum(axis=1) <= r * r]
    inside = np.all((points >= 0) & (points < np.array(organ.shape)), axis=1)
    outside_volume = int((~inside).sum())
    outside_organ = int((organ[tuple(points[inside].T)] <= 0).sum())
    if outside_volume or outside_organ:
        centre = ", ".join(f"{v:.2f}" for v in c)
        raise ValueError(
            f"case {case_id or '?'}: sphere (centre ({centre}), radius {r:.2f} voxels) has {outside_organ} voxel(s) "
            f"outside the organ mask and {outside_volume} outside the volume {organ.shape}; fix: draw spheres with "
            "synth.placement.sample_spheres (it accepts only spheres inside the organ) or move/shrink this one"
        )
