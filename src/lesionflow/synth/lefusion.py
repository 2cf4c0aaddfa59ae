"""LeFusion: a lesion-focused, histogram-conditioned DDPM, trained on lesion ROIs and sampled
with RePaint inside a lesion mask, for one or several lesion classes (multi-channel decomposition).

References:

- [LeFusion] H. Zhang, Y. Liu, J. Yang, S. Wan, X. Wang, W. Peng, P. Fua, "LeFusion: Controllable Pathology
  Synthesis via Lesion-Focused Diffusion Models", ICLR 2025, https://arxiv.org/abs/2403.14066 -- the
  lesion-focused loss, background-preserving sampling (forward-diffused background merged into the reverse
  process), histogram-based texture control and multi-channel decomposition; authors' code
  https://github.com/M3DV/LeFusion (``LeFusion/ddpm/diffusion.py``: ``p_losses``, ``p_sample_loop_repaint``).
- [RePaint] A. Lugmayr et al., CVPR 2022, https://arxiv.org/abs/2201.09865 -- Algorithm 1 and the jump schedule
  of Sec. 4.2, used for sampling (:func:`lesionflow.diffusion.samplers.repaint_sample`).
- [DDPM] J. Ho, A. Jain, P. Abbeel, NeurIPS 2020, https://arxiv.org/abs/2006.11239 -- the eps objective
  (Algorithm 1) that the lesion-focused loss masks.

Conventions: ROI images are (c, x, y, z) float32 in the store's normalized units; masks (x, y, z) bool, True =
lesion (= generate). ``C = len(class_values)`` lesion classes give the network ``C * c`` image channels:
block ``k`` (channels ``k*c .. (k+1)*c - 1``) is a copy of the image that is trained and generated for class
``class_values[k]`` only. The condition is the concatenation of the C per-class intensity histograms (``bins``
values each, zeros for a class absent from the lesion; [LeFusion] histogram-based texture control), added to the
time embedding; at sampling only the classes the target mask holds get a histogram, the others the zeros they had
at training (:meth:`lesionflow.synth.histograms.HistogramBank.sample` with ``present``). The histogram support is
also the x0 clamp of sampling: ``params.value_range`` when set, else derived from the training lesions
(:func:`lesion_value_range`), and recorded in the bank saved with the generator (:func:`sampling_settings` reads
it back), so lesions brighter than any fixed range stay reachable.

- Loss ([LeFusion] lesion-focused loss, multi-channel decomposition): the masked eps loss, L1, with block ``k``
  masked by class mask ``k``. ``loss_normalize="all"`` is the authors' ``sum_k mean(|M_k ⊙ (eps_k - eps_hat_k)|)``
  (each block's mean over all its voxels, summed over blocks); ``"mask"`` divides the summed error by the number
  of class-mask voxels of all blocks.
- Sampling ([LeFusion] background-preserving inference, i.e. [RePaint] Algorithm 1; multi-channel merge): the
  known image is the ROI tiled C times, every block is generated inside the *union* of the class masks with the
  RePaint jump schedule and the final hard paste, then the blocks are merged per image
  channel by :func:`lesionflow.synth.placement.merge_class_channels` (``out = sum_k ch_k M_k + ch_0 (1 - union)``,
  the later class wins where masks overlap). Every voxel outside the union equals the input ROI bit for bit.
- ``C = 1`` is the binary model and behaves as before the multi-class generalisation: its single class is the
  whole lesion component, whatever its label value (see :func:`class_masks`).
- Randomness: training batches are a pure function of ``(seed, i)``; weight initialisation is seeded inside a
  forked torch RNG (the global state is left as it was); sampling draws only from the caller's generator, which
  must live on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lesionflow.diffusion.samplers import repaint_sample
from lesionflow.diffusion.schedules import NoiseSchedule, cosine_schedule, respace_schedule
from lesionflow.diffusion.trainer import GeneratorTrainOutcome, eps_loss, train_generator
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig, make_eps_fn
from lesionflow.params_synth import LeFusionParams
from lesionflow.seeding import rng_for
from lesionflow.synth.histograms import HistogramBank, lesion_histogram
from lesionflow.synth.placement import merge_class_channels
from lesionflow.synth.rois import Roi

__all__ = [
    "checked_classes",
    "class_masks",
    "classes_without_lesions",
    "lesion_conditions",
    "lesion_value_range",
    "make_model",
    "noise_schedule",
    "rois_with_classes",
    "sampling_settings",
    "synthesize_batch",
    "synthesize_in_roi",
    "train_lefusion",
    "training_batches",
]


def checked_classes(class_values: Sequence[int]) -> tuple[int, ...]:
    """The lesion classes as ints, in order: one channel block and one histogram block per class (EMIDEC:
    ``(3, 4)`` = MI, PMO). They come from the plan's label values, not from params, so every function that needs
    them takes them as an argument; they must be distinct label values in 1..255."""
    values = tuple(int(v) for v in class_values)
    if not values or len(set(values)) != len(values) or any(not 0 < v <= 255 for v in values):
        raise ValueError(f"class_values must be distinct label values in 1..255, got {class_values!r}")
    return values


def noise_schedule(params: LeFusionParams) -> NoiseSchedule:
    """The cosine schedule of ``params.timesteps`` steps (s = 0.008), for training and sampling alike."""
    return cosine_schedule(params.timesteps)


# --------------------------------------------------------------------------- classes and conditions


def class_masks(label_roi: np.ndarray, lesion_mask: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    """(C, x, y, z) bool: mask ``k`` = ``(label_roi == class_values[k]) & lesion_mask``.

    With a single class value the one mask is ``lesion_mask`` itself (the binary model: every label value of the
    lesion counts), so a single-class model trains on whole lesion components as it always did.
    """
    label, lesion = np.asarray(label_roi), np.asarray(lesion_mask) > 0
    if label.shape != lesion.shape or lesion.ndim != 3:
        raise ValueError(f"label shape {label.shape} != lesion mask shape {lesion.shape} (both (x, y, z))")
    if len(class_values) == 0:
        raise ValueError("class_values must not be empty")
    if len(class_values) == 1:
        return lesion[None].copy()
    return np.stack([(label == v) & lesion for v in class_values])


def classes_without_lesions(rois: Sequence[Roi], class_values: Sequence[int]) -> list[int]:
    """The class values (in the given order) that no ROI's lesion mask contains (per :func:`class_masks`)."""
    present = np.zeros(len(class_values), dtype=bool)
    for roi in rois:
        present |= class_masks(roi.label, roi.mask, class_values).any(axis=(1, 2, 3))
    return [int(v) for v, seen in zip(class_values, present, strict=True) if not seen]


def rois_with_classes(rois: Sequence[Roi], class_values: Sequence[int]) -> list[Roi]:
    """The ROIs whose lesion mask holds at least one voxel of some class (the ones LeFusion can train on)."""
    return [r for r in rois if class_masks(r.label, r.mask, class_values).any()]


VALUE_PERCENTILES = (0.5, 99.5)  # of the training lesions' voxels: robust to a few extreme voxels
VALUE_MARGIN = 0.1  # the percentile span is widened by this fraction on each side (room beyond the training tails)


def lesion_value_range(rois: Sequence[Roi], class_values: Sequence[int]) -> tuple[float, float]:
    """The value range derived from the training lesions: the 0.5th and 99.5th percentiles of every channel's
    voxels inside the ROIs' class masks (normalised units), widened by 10 % of their span on each side (at least
    0.05). It is both the histogram support and the x0 clamp, so it must hold every channel the clamp acts on."""
    classes = checked_classes(class_values)
    values = [r.image[:, class_masks(r.label, r.mask, classes).any(axis=0)].ravel() for r in rois]
    flat = np.concatenate(values).astype(np.float64) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise ValueError(
            f"no finite lesion voxel of classes {list(classes)} to derive synth.lefusion.value_range from; "
            "set it explicitly or add labelled lesions"
        )
    lo, hi = (float(v) for v in np.percentile(flat, VALUE_PERCENTILES))
    margin = max(VALUE_MARGIN * (hi - lo), 0.05)
    return lo - margin, hi + margin


def sampling_settings(params: LeFusionParams, value_range: Sequence[float]) -> LeFusionParams:
    """``params`` with the value range recorded with a trained generator (its bank's ``value_range``): sampling
    clamps to the range the model was trained with, whatever params say now."""
    return params.model_copy(update={"value_range": (float(value_range[0]), float(value_range[1]))})


def lesion_conditions(
    rois: Sequence[Roi],
    params: LeFusionParams,
    class_values: Sequence[int],
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """(n, C * bins) training conditions: per class, the histogram of the ROI's first channel inside the class
    mask (a block of zeros for a class absent from the lesion), concatenated in ``class_values`` order. The
    support is ``value_range``, else ``params.value_range``, else :func:`lesion_value_range` of ``rois``."""
    if not rois:
        raise ValueError("no lesion ROIs: the training cases have no labelled lesion")
    classes = checked_classes(class_values)
    value_range = value_range or params.value_range or lesion_value_range(rois, classes)
    rows = []
    for roi in rois:
        masks = class_masks(roi.label, roi.mask, classes)
        if not masks.any():
            raise ValueError(
                f"ROI {roi.case_id}/lesion {roi.index} has no voxel of classes {list(classes)} "
                "(filter the ROIs with rois_with_classes)"
            )
        blocks = [
            lesion_histogram(roi.image, m, params.bins, value_range) if m.any() else np.zeros(params.bins)
            for m in masks
        ]
        rows.append(np.concatenate(blocks))
    return np.stack(rows)


# --------------------------------------------------------------------------- training


def training_batches(
    rois: Sequence[Roi],
    conditions: np.ndarray,
    batch_size: int,
    seed: int,
    params: LeFusionParams | None = None,
    class_values: Sequence[int] = (1,),
) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(i)``: micro-batch ``i`` as a pure function of (seed, i): ROIs drawn uniformly, each flipped
    along x with probability 1/2 (the authors' one in-plane flip). Keys: image (B, C*c, *size) float32 (the ROI
    image tiled C times, block k for class k), mask (B, C*c, *size) float32 (block k = class mask k), cond
    (B, C*bins) float32. ``params`` None = the defaults (``bins``); one class unless ``class_values`` say more."""
    bins = (params or LeFusionParams()).bins
    classes = checked_classes(class_values)
    cond_dim = len(classes) * bins
    if len(conditions) != len(rois) or np.shape(conditions)[1:] != (cond_dim,):
        raise ValueError(f"conditions shape {np.shape(conditions)} does not match {len(rois)} ROIs x {cond_dim} values")
    images = np.stack([r.image.astype(np.float32) for r in rois])
    c_img = images.shape[1]
    # Class masks repeated per image channel: (n, C*c, *size), block k = class k (uint8 keeps it 4x smaller).
    masks = np.stack([np.repeat(class_masks(r.label, r.mask, classes), c_img, axis=0) for r in rois])
    masks = masks.astype(np.uint8)
    conds = conditions.astype(np.float32)
    tiles = len(classes)

    def batches(i: int) -> dict[str, torch.Tensor]:
        # Same draws, in the same order, as the single-class version: the batches do not depend on C.
        rng = rng_for(seed, "lefusion-batch", i)
        pick = rng.integers(len(rois), size=batch_size)
        flip = rng.random(batch_size) < 0.5
        image, mask = images[pick].copy(), masks[pick].astype(np.float32)
        image[flip] = image[flip][:, :, ::-1]
        mask[flip] = mask[flip][:, :, ::-1]
        if tiles > 1:
            image = np.concatenate([image] * tiles, axis=1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "cond": torch.from_numpy(conds[pick]),
        }

    return batches


def make_model(image_channels: int, params: LeFusionParams, class_values: Sequence[int]) -> ConditionalUNet3D:
    """The LeFusion UNet: ``C * image_channels`` in and out, condition of ``C * bins`` values, the architecture
    (width, levels, attention) of ``params``."""
    n_classes = len(checked_classes(class_values))
    config = UNetConfig(
        in_channels=n_classes * image_channels,
        out_channels=n_classes * image_channels,
        base_channels=params.base_channels,
        channel_mults=tuple(params.channel_mults),
        attention_levels=tuple(params.attention_levels),
        cond_dim=n_classes * params.bins,
    )
    return ConditionalUNet3D(config)


def _blockwise_loss(
    model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, *, schedule: NoiseSchedule, blocks: int
) -> Tensor:
    # masked_eps_loss("all") divides by every element of all C blocks; the authors sum one mean per block, which
    # is C times that.
    return blocks * eps_loss(model, batch, generator, schedule=schedule, kind="l1", normalize="all")


def train_lefusion(
    rois: Sequence[Roi],
    params: LeFusionParams,
    class_values: Sequence[int],
    checkpoint_root: Path,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    warn: Callable[[str], None] = print,
) -> tuple[GeneratorTrainOutcome, HistogramBank]:
    """Train LeFusion on lesion ROIs (network, schedule and optimisation from ``params``, one channel block per
    class of ``class_values``); return the outcome (EMA weights for sampling) and the histogram bank fitted on the
    (n, C * bins) training conditions. The bank records the value range (``params.value_range``, or derived from
    ``rois`` when None): save it with the generator and sample with :func:`sampling_settings`."""
    classes = checked_classes(class_values)
    value_range = params.value_range or lesion_value_range(rois, classes)
    conditions = lesion_conditions(rois, params, classes, value_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init only; every draw of the loop takes its own generator
        model = make_model(rois[0].image.shape[0], params, classes)
    schedule = noise_schedule(params)
    loss: Callable[[nn.Module, dict[str, Tensor], torch.Generator], Tensor]
    if params.loss_normalize == "all" and len(classes) > 1:
        loss = partial(_blockwise_loss, schedule=schedule, blocks=len(classes))
    else:
        loss = partial(eps_loss, schedule=schedule, kind="l1", normalize=params.loss_normalize)
    batches = training_batches(rois, conditions, params.batch_size, seed, params, classes)
    outcome = train_generator(model, batches, loss, schedule, params, checkpoint_root, device, seed, warn)
    bank = HistogramBank.fit(conditions, params.bank_k, seed=seed, bins=params.bins, value_range=value_range)
    return outcome, bank


# --------------------------------------------------------------------------- sampling


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def synthesize_batch(
    model: ConditionalUNet3D,
    params: LeFusionParams,
    class_values: Sequence[int],
    image_rois: np.ndarray,
    masks: np.ndarray,
    histograms: np.ndarray,
    generator: torch.Generator,
) -> np.ndarray:
    """Lesions for B ROIs in one RePaint run (one forward pass per step for the whole batch).

    ``image_rois`` (B, c, x, y, z); ``masks`` (B, C, x, y, z) bool class masks (or (B, x, y, z) when C = 1);
    ``histograms`` (B, C * bins). Returns (B, c, x, y, z), float32 for float32 input (the dtype that holds the
    input exactly otherwise): each item's voxels outside the union of its class masks equal the input bitwise.
    The generator must live on the model's device; the batch draws its noise jointly, so item ``b`` differs from a
    single-item call with the same generator.
    """
    images = np.asarray(image_rois)
    n_classes, bins = len(checked_classes(class_values)), params.bins
    if images.ndim != 5:
        raise ValueError(f"image_rois must be (B, c, x, y, z), got shape {images.shape}")
    b, c_img, *size = images.shape
    m = np.asarray(masks) > 0
    if n_classes == 1 and m.shape == (b, *size):
        m = m[:, None]
    if m.shape != (b, n_classes, *size):
        raise ValueError(f"masks shape {m.shape} does not match (B, C, x, y, z) = {(b, n_classes, *size)}")
    hist = np.asarray(histograms, dtype=np.float32)
    if hist.shape != (b, n_classes * bins):
        raise ValueError(f"histograms must have shape (B, C*bins): expected {(b, n_classes * bins)}, got {hist.shape}")
    expected = n_classes * c_img
    if model.config.in_channels != expected or model.config.cond_dim != n_classes * bins:
        raise ValueError(
            f"model expects {model.config.in_channels} channels / cond {model.config.cond_dim}; "
            f"{n_classes} classes x {c_img} image channels need {expected} / {n_classes * bins}"
        )
    union = np.asarray(m.any(axis=1))  # (B, x, y, z): every block is generated here
    empty = [i for i in range(b) if not union[i].any()]
    if empty:
        raise ValueError(
            f"the lesion mask (union of the class masks) is empty for item(s) {empty}: nothing to generate"
        )
    # an absent class's condition must be the training "absent" value, the zero block (draw with ``present``)
    stray = np.argwhere(hist.reshape(b, n_classes, bins).any(axis=2) & ~m.any(axis=(2, 3, 4)))
    if stray.size:
        i, k = (int(v) for v in stray[0])
        raise ValueError(
            f"item {i}: the histogram block of class {class_values[k]} is non-zero but its class mask is empty; an "
            "absent class takes the zero block it had at training (HistogramBank.sample(..., present=...))"
        )
    if params.value_range is None:
        raise ValueError(
            "synth.lefusion.value_range is None at sampling: sample with the range recorded with the generator "
            "(sampling_settings(params, bank.value_range))"
        )
    device = _model_device(model)
    # 1. known = the ROI tiled C times (block k for class k); the generation region is the union for every block
    known_np = np.ascontiguousarray(images, dtype=np.float32)
    if n_classes > 1:
        known_np = np.concatenate([known_np] * n_classes, axis=1)
    known = torch.from_numpy(known_np).to(device)
    where = torch.from_numpy(np.ascontiguousarray(union))[:, None].to(device).expand_as(known)
    cond = torch.from_numpy(hist).to(device)
    # 2. RePaint with the jump schedule and the final hard paste ([RePaint] Algorithm 1 + Sec. 4.2 jumps, as the
    #    authors' ``p_sample_loop_repaint``), on params.sample_steps steps of stride T/N (DDIM-style respacing,
    #    https://arxiv.org/abs/2102.09672 Sec. 4; 0 = all T): the background is merged in at every kept step
    out = repaint_sample(
        make_eps_fn(model.eval(), cond=cond),
        known,
        where,
        respace_schedule(noise_schedule(params), f"ddim{params.sample_steps or params.timesteps}"),
        jump_length=params.jump_length,
        jump_n_sample=params.jump_n_sample,
        generator=generator,
        clip_denoised=params.value_range,  # x0_hat clamped to the histogram support recorded with the generator
    )
    generated = out.float().cpu().numpy().reshape(b, n_classes, c_img, *size)
    # 3. merge the class blocks per image channel ([LeFusion] multi-channel decomposition): block k inside class
    #    mask k, block 0 elsewhere
    merged = np.stack(
        [np.stack([merge_class_channels(generated[i, :, ch], m[i]) for ch in range(c_img)]) for i in range(b)]
    )
    # 4. the background straight from the input (no float round trip even for non-float32 ROIs)
    dtype = np.result_type(np.float32, images.dtype)
    return np.where(union[:, None], merged, images).astype(dtype, copy=False)


def synthesize_in_roi(
    model: ConditionalUNet3D,
    params: LeFusionParams,
    class_values: Sequence[int],
    image_roi: np.ndarray,
    masks: np.ndarray,
    histogram: np.ndarray,
    generator: torch.Generator,
) -> np.ndarray:
    """A lesion with texture ``histogram`` (C * bins values) generated inside the class ``masks`` (C, x, y, z)
    (or one (x, y, z) mask when C = 1) of ``image_roi`` (c, x, y, z); every voxel outside the union of the masks
    is returned unchanged (bitwise). Same as :func:`synthesize_batch` with a batch of one."""
    image = np.asarray(image_roi)
    if image.ndim != 4:
        raise ValueError(f"image_roi must be (c, x, y, z), got shape {image.shape}")
    n_classes = len(checked_classes(class_values))
    cond_dim = n_classes * params.bins
    m = np.asarray(masks)
    if m.shape != image.shape[1:] and m.shape != (n_classes, *image.shape[1:]):
        raise ValueError(
            f"mask shape {m.shape} does not match the ROI: expected {(n_classes, *image.shape[1:])}"
            + (f" or {image.shape[1:]}" if n_classes == 1 else "")
        )
    if m.ndim == 3 and n_classes != 1:
        raise ValueError(f"{n_classes} classes need (C, x, y, z) class masks, got one mask {m.shape}")
    hist = np.asarray(histogram)
    if hist.shape != (cond_dim,):
        raise ValueError(f"histogram must have {cond_dim} values (C*bins): expected {cond_dim}, got {hist.shape}")
    return synthesize_batch(model, params, class_values, image[None], m[None], hist[None], generator)[0]
