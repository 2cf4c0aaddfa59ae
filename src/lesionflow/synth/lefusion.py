"""LeFusion (generative.md §2): a lesion-focused, histogram-conditioned DDPM, trained on lesion ROIs and sampled
with RePaint inside a lesion mask.

Conventions: ROI images are (c, x, y, z) float32 in the store's normalized units; masks (x, y, z) bool, True =
lesion (= generate). The model predicts eps of the image channels from ``x_t`` alone; the condition is the
lesion's intensity histogram (``bins`` values per class, §2.3), added to the time embedding. The loss is the
masked eps loss (§2.2: L1, normalized over all voxels as the authors do, or over lesion voxels). Sampling runs
the RePaint jump schedule with the background re-injected at every step and ends with the exact paste, so
every voxel outside the mask equals the input ROI bit for bit (§2.6, our fix of the authors' blurry background).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lesionflow.diffusion.samplers import repaint_sample
from lesionflow.diffusion.schedules import NoiseSchedule, cosine_schedule
from lesionflow.diffusion.trainer import GeneratorTrainConfig, GeneratorTrainOutcome, eps_loss, train_generator
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig, make_eps_fn
from lesionflow.seeding import rng_for
from lesionflow.synth.histograms import HistogramBank, lesion_histogram
from lesionflow.synth.rois import Roi


@dataclass(frozen=True)
class LeFusionSettings:
    """Diffusion and conditioning settings (toy defaults; the authors': T=300 cosine, j=r=5, 16 bins)."""

    timesteps: int = 50
    bins: int = 16
    value_range: tuple[float, float] = (-3.0, 3.0)  # z-scored units: the histogram's support
    loss_normalize: Literal["all", "mask"] = "all"
    jump_length: int = 2
    jump_n_sample: int = 2
    bank_k: int = 3

    def schedule(self) -> NoiseSchedule:
        return cosine_schedule(self.timesteps)


def lesion_conditions(rois: Sequence[Roi], settings: LeFusionSettings) -> np.ndarray:
    """(n, bins) histograms of the lesions' first channel inside their masks (the training conditions)."""
    if not rois:
        raise ValueError("no lesion ROIs: the training cases have no labelled lesion")
    return np.stack([lesion_histogram(r.image, r.mask, settings.bins, settings.value_range) for r in rois])


def training_batches(
    rois: Sequence[Roi], conditions: np.ndarray, batch_size: int, seed: int
) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(i)``: micro-batch ``i`` as a pure function of (seed, i): ROIs drawn uniformly, each flipped
    along x with probability 1/2 (the authors' one in-plane flip). Keys: image (B, c, *size) float32, mask
    (B, 1, *size) float32, cond (B, bins) float32."""
    images = np.stack([r.image.astype(np.float32) for r in rois])
    masks = np.stack([r.mask.astype(np.float32) for r in rois])[:, None]
    conds = conditions.astype(np.float32)

    def batches(i: int) -> dict[str, torch.Tensor]:
        rng = rng_for(seed, "lefusion-batch", i)
        pick = rng.integers(len(rois), size=batch_size)
        flip = rng.random(batch_size) < 0.5
        image, mask = images[pick].copy(), masks[pick].copy()
        image[flip] = image[flip][:, :, ::-1]
        mask[flip] = mask[flip][:, :, ::-1]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "cond": torch.from_numpy(conds[pick]),
        }

    return batches


def make_model(image_channels: int, settings: LeFusionSettings, base_channels: int = 8) -> ConditionalUNet3D:
    config = UNetConfig(
        in_channels=image_channels,
        out_channels=image_channels,
        base_channels=base_channels,
        channel_mults=(1, 2),
        attention_levels=(False, False),
        cond_dim=settings.bins,
    )
    return ConditionalUNet3D(config)


def train_lefusion(
    rois: Sequence[Roi],
    settings: LeFusionSettings,
    config: GeneratorTrainConfig,
    checkpoint_root: Path,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    warn: Callable[[str], None] = print,
    base_channels: int = 8,
) -> tuple[GeneratorTrainOutcome, HistogramBank]:
    """Train LeFusion on lesion ROIs; return the outcome (EMA weights for sampling) and the histogram bank."""
    conditions = lesion_conditions(rois, settings)
    torch.manual_seed(seed)  # weight init only; every draw of the loop takes its own generator
    model = make_model(rois[0].image.shape[0], settings, base_channels)
    schedule = settings.schedule()
    loss = partial(eps_loss, schedule=schedule, kind="l1", normalize=settings.loss_normalize)
    batches = training_batches(rois, conditions, config.batch_size, seed)
    outcome = train_generator(model, batches, loss, schedule, config, checkpoint_root, device, seed, warn)
    bank = HistogramBank.fit(
        conditions, settings.bank_k, seed=seed, bins=settings.bins, value_range=settings.value_range
    )
    return outcome, bank


def synthesize_in_roi(
    model: ConditionalUNet3D,
    settings: LeFusionSettings,
    image_roi: np.ndarray,
    mask: np.ndarray,
    histogram: np.ndarray,
    generator: torch.Generator,
) -> np.ndarray:
    """A lesion with texture ``histogram`` generated inside ``mask`` of ``image_roi`` (c, x, y, z); every voxel
    outside the mask is returned unchanged (bitwise)."""
    if mask.shape != image_roi.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} does not match the ROI {image_roi.shape[1:]}")
    if not mask.any():
        raise ValueError("the lesion mask is empty: nothing to generate")
    known = torch.from_numpy(np.ascontiguousarray(image_roi, dtype=np.float32))[None]
    where = torch.from_numpy(np.ascontiguousarray(mask))[None, None].expand_as(known)
    cond = torch.from_numpy(np.asarray(histogram, dtype=np.float32))[None]
    out = repaint_sample(
        make_eps_fn(model.eval(), cond=cond),
        known,
        where,
        settings.schedule(),
        jump_length=settings.jump_length,
        jump_n_sample=settings.jump_n_sample,
        generator=generator,
    )
    return np.asarray(out[0].numpy(), dtype=np.float32)
