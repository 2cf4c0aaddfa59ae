"""DDPM inpainting with RePaint: an unconditional 3D DDPM trained on the user's patches,
sampled with the RePaint jump schedule inside a mask. Two uses: lesion *removal* (fill a lesion, grown by a rim,
with healthy-looking tissue) and lesion *insertion* into a given mask (the baseline LeFusion is compared with).

References:

- RePaint: A. Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", CVPR 2022,
  https://arxiv.org/abs/2201.09865 -- Algorithm 1 and Eqs. 8a-8c (sampling inside the mask), Sec. 4.2 (resampling
  with jump length ``j`` and ``r`` repeats); authors' code https://github.com/andreas128/RePaint. The loop itself
  is :func:`lesionflow.diffusion.samplers.repaint_sample`.
- The model is a DDPM: J. Ho, A. Jain, P. Abbeel, NeurIPS 2020, https://arxiv.org/abs/2006.11239 -- trained with
  the simplified eps loss (Algorithm 1, Eq. 14), sampled as in Algorithm 2.
- Respacing: A. Nichol, P. Dhariwal, ICML 2021, https://arxiv.org/abs/2102.09672 -- Sec. 4; RePaint's configs
  sample a T = 1000 model on 250 evenly spread steps (``timestep_respacing: '250'``), j = r = 10: 2,410 network
  evaluations per ROI instead of 9,910.
- LeFusion (the method the insertion baseline is compared with): H. Zhang et al., ICLR 2025,
  https://arxiv.org/abs/2403.14066.

Conventions
- Images are (c, x, y, z) float arrays in the store's normalised units, masks (x, y, z) bool; batches put B first.
- **Mask: True / 1 = generate, False / 0 = keep.** RePaint's own mask files use the inverse (255 or 1 = keep,
  0 = generate): convert one with ``mask = (repaint_mask == 0)``.
- Exactness: every voxel outside the mask equals the input bit for bit (the sampler's final hard paste plus a
  paste from the input array itself, so non-float32 inputs make no float round trip either). An empty mask
  returns the input unchanged without calling the network.
- Training: eps MSE over the whole patch (no mask, no condition; RePaint needs no inpainting-specific training),
  on lesion ROIs and lesion-free candidate ROIs alike. Micro-batch ``i`` is a pure function of ``(seed, i)``;
  weight initialisation is seeded inside a forked torch RNG (the global state is left as it was).
- Sampling draws only from the caller's ``torch.Generator``, which must live on the model's device. A batch draws
  its noise jointly, so item ``b`` of a batch differs from a single call with the same generator.
- Sampling steps: ``params.sample_steps = N`` samples on ``N`` of the ``T`` training steps, evenly spread with both
  ends kept (improved-diffusion's ``"N"`` rule, :func:`lesionflow.diffusion.schedules.space_timesteps`); the jump
  schedule runs over the ``N`` steps, so each ROI costs :func:`network_evaluations` forward passes. ``0`` (the toy
  default) samples on all ``T`` steps, bit-identical to sampling without respacing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from lesionflow.diffusion.samplers import count_network_evaluations, repaint_sample
from lesionflow.diffusion.schedules import (
    NoiseSchedule,
    RespacedSchedule,
    cosine_schedule,
    linear_schedule,
    respace_schedule,
)
from lesionflow.diffusion.trainer import GeneratorTrainOutcome, eps_loss, train_generator
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig, make_eps_fn
from lesionflow.params_synth import DdpmParams
from lesionflow.seeding import rng_for
from lesionflow.synth.rois import Roi

__all__ = [
    "CLIP_RANGE",
    "inpaint",
    "inpaint_batch",
    "insert_lesion",
    "make_ddpm_model",
    "network_evaluations",
    "noise_schedule",
    "patch_batches",
    "removal_mask",
    "remove_lesion",
    "sampling_schedule",
    "train_ddpm",
]


CLIP_RANGE: tuple[float, float] = (-5.0, 5.0)  # x0_hat clamp while sampling, in the data's (z-scored) units


def noise_schedule(params: DdpmParams) -> NoiseSchedule:
    """The ``params.schedule`` of ``params.timesteps`` steps, for training and sampling alike (RePaint's configs
    in https://github.com/andreas128/RePaint: T = 1000 respaced to 250, j = r = 10). The linear schedule needs
    ``timesteps > 20`` (its betas are scaled by ``1000 / T``)."""
    return cosine_schedule(params.timesteps) if params.schedule == "cosine" else linear_schedule(params.timesteps)


def sampling_schedule(params: DdpmParams) -> RespacedSchedule:
    """:func:`noise_schedule` respaced to ``params.sample_steps`` evenly spread steps (0 = all T, the identity):
    improved-diffusion's ``"N"`` rule, as RePaint's ``timestep_respacing: '250'``
    (https://arxiv.org/abs/2102.09672 Sec. 4)."""
    return respace_schedule(noise_schedule(params), params.sample_steps or params.timesteps)


def network_evaluations(params: DdpmParams) -> int:
    """Forward passes RePaint makes per ROI (per batch): the jump schedule over the kept steps,
    ``N + (N/j - 1)(r - 1) j`` (RePaint's preset: N = 250, j = r = 10 -> 2,410)."""
    steps = params.sample_steps or params.timesteps
    return count_network_evaluations(steps, params.jump_length, params.jump_n_sample)


# --------------------------------------------------------------------------- training


def patch_batches(rois: Sequence[Roi], batch_size: int, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(i)``: micro-batch ``i`` as a pure function of (seed, i): patches drawn uniformly from ``rois``
    (lesion and candidate ROIs alike), each flipped along x with probability 1/2. Key: image (B, c, *size)
    float32."""
    if not rois:
        raise ValueError("no ROIs to train the inpainting DDPM on")
    shapes = {r.image.shape for r in rois}
    if len(shapes) != 1:
        raise ValueError(f"all ROI images must have one shape (c, x, y, z), got {sorted(shapes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = np.stack([r.image.astype(np.float32) for r in rois])

    def batches(i: int) -> dict[str, torch.Tensor]:
        rng = rng_for(seed, "ddpm-batch", i)
        pick = rng.integers(len(images), size=batch_size)
        flip = rng.random(batch_size) < 0.5
        image = images[pick].copy()
        image[flip] = image[flip][:, :, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(image))}

    return batches


def make_ddpm_model(image_channels: int, params: DdpmParams) -> ConditionalUNet3D:
    """The unconditional UNet: ``image_channels`` in and out, no vector condition (``cond_dim = 0``), the
    architecture (width, levels, attention) of ``params``."""
    config = UNetConfig(
        in_channels=image_channels,
        out_channels=image_channels,
        base_channels=params.base_channels,
        channel_mults=tuple(params.channel_mults),
        attention_levels=tuple(params.attention_levels),
        cond_dim=0,
    )
    return ConditionalUNet3D(config)


def train_ddpm(
    rois: Sequence[Roi],
    params: DdpmParams,
    checkpoint_root: Path,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    warn: Callable[[str], None] = print,
) -> GeneratorTrainOutcome:
    """Train the unconditional DDPM (eps MSE over the whole patch; network, schedule and optimisation from
    ``params``) on ``rois``; resumes from ``checkpoint_root`` like every generator. Use ``outcome.ema`` for
    sampling."""
    batches = patch_batches(rois, params.batch_size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init only; every draw of the loop takes its own generator
        model = make_ddpm_model(rois[0].image.shape[0], params)
    schedule = noise_schedule(params)
    loss = partial(eps_loss, schedule=schedule, kind="l2")
    return train_generator(model, batches, loss, schedule, params, checkpoint_root, device, seed, warn)


# --------------------------------------------------------------------------- sampling


def _check_model(model: ConditionalUNet3D, channels: int) -> None:
    cfg = model.config
    if cfg.in_channels != channels or cfg.out_channels != channels or cfg.cond_dim != 0:
        raise ValueError(
            f"model takes {cfg.in_channels} channels (cond_dim {cfg.cond_dim}); "
            f"an unconditional model of {channels} image channels is needed"
        )


def inpaint_batch(
    model: ConditionalUNet3D,
    params: DdpmParams,
    image_rois: np.ndarray,
    masks: np.ndarray,
    generator: torch.Generator,
) -> np.ndarray:
    """RePaint for B patches in one run (one forward pass per step for the items with a non-empty mask).

    ``image_rois`` (B, c, x, y, z), ``masks`` (B, x, y, z) (True = generate). Returns (B, c, x, y, z), float32 for
    float32 input (the dtype that holds the input exactly otherwise); outside each mask the input bit for bit.
    Items with an empty mask are returned unchanged and do not enter the network (none: no network call).
    """
    images = np.asarray(image_rois)
    if images.ndim != 5:
        raise ValueError(f"image_rois must be (B, c, x, y, z), got shape {images.shape}")
    m = np.asarray(masks) > 0
    if m.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks shape {m.shape} does not match (B, x, y, z) = {(images.shape[0], *images.shape[2:])}")
    _check_model(model, images.shape[1])
    dtype = np.result_type(np.float32, images.dtype)
    out = images.astype(dtype, copy=True)
    todo = np.flatnonzero(m.reshape(len(m), -1).any(axis=1))
    if todo.size == 0:
        return out
    device = next(model.parameters()).device
    known = torch.from_numpy(np.ascontiguousarray(images[todo], dtype=np.float32)).to(device)
    where = torch.from_numpy(np.ascontiguousarray(m[todo]))[:, None].to(device).expand_as(known)
    generated = repaint_sample(
        make_eps_fn(model.eval()),
        known,
        where,
        sampling_schedule(params),  # the kept steps; the network is fed training indices
        jump_length=params.jump_length,
        jump_n_sample=params.jump_n_sample,
        generator=generator,
        clip_denoised=CLIP_RANGE,
    )
    # The background comes from the input array itself: exact whatever the input dtype.
    inside = m[todo][:, None]
    out[todo] = np.where(inside, generated.float().cpu().numpy(), out[todo])
    return out


def inpaint(
    model: ConditionalUNet3D,
    params: DdpmParams,
    image_roi: np.ndarray,
    mask: np.ndarray,
    generator: torch.Generator,
) -> np.ndarray:
    """RePaint inside ``mask`` (x, y, z; True = generate) of ``image_roi`` (c, x, y, z); exact outside the mask,
    the input itself for an empty mask (no network call). Same as :func:`inpaint_batch` with a batch of one."""
    image = np.asarray(image_roi)
    if image.ndim != 4:
        raise ValueError(f"image_roi must be (c, x, y, z), got shape {image.shape}")
    m = np.asarray(mask)
    if m.shape != image.shape[1:]:
        raise ValueError(f"mask shape {m.shape} does not match the ROI {image.shape[1:]}")
    return inpaint_batch(model, params, image[None], m[None], generator)[0]


def removal_mask(lesion_mask: np.ndarray, dilation: int) -> np.ndarray:
    """The region regenerated to remove a lesion: ``lesion_mask`` (x, y, z) grown by ``dilation`` voxels
    (binary dilation, 26-neighbourhood, clipped to the ROI). Contains the lesion, so it is never empty for a
    non-empty lesion; ``dilation = 0`` is the lesion itself."""
    lesion = np.asarray(lesion_mask) > 0
    if lesion.ndim != 3:
        raise ValueError(f"lesion_mask must be (x, y, z), got shape {lesion.shape}")
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    if dilation == 0 or not lesion.any():
        return lesion.copy()
    structure = ndimage.generate_binary_structure(3, 3)
    return np.asarray(ndimage.binary_dilation(lesion, structure=structure, iterations=dilation))


def remove_lesion(
    model: ConditionalUNet3D,
    params: DdpmParams,
    image_roi: np.ndarray,
    lesion_mask: np.ndarray,
    generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the lesion (grown by ``params.removal_dilation``) with tissue sampled by the DDPM. Returns
    (image, the mask actually regenerated); outside that mask the image is the input bit for bit."""
    lesion = np.asarray(lesion_mask)
    if lesion.shape != np.shape(image_roi)[1:]:
        raise ValueError(f"lesion_mask shape {lesion.shape} does not match the ROI {np.shape(image_roi)[1:]}")
    if not lesion.any():
        raise ValueError("the lesion mask is empty: there is no lesion to remove")
    region = removal_mask(lesion, params.removal_dilation)
    return inpaint(model, params, image_roi, region, generator), region


def insert_lesion(
    model: ConditionalUNet3D,
    params: DdpmParams,
    image_roi: np.ndarray,
    mask: np.ndarray,
    generator: torch.Generator,
) -> np.ndarray:
    """The RePaint insertion baseline (the "RePaint" rows of LeFusion's results, https://arxiv.org/abs/2403.14066):
    sample inside ``mask`` exactly as given (no dilation). An unconditional model fills the mask with whatever its
    training patches make likely there, which is why LeFusion adds the lesion-focused loss and histogram control.
    Empty mask: the input unchanged."""
    return inpaint(model, params, image_roi, mask, generator)
